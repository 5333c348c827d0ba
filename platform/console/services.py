"""Console writes that are not a single accounts service: sign-up and the playground's key."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.utils import timezone

from accounts import selectors, services
from accounts.models import Organization, Project, User
from accounts.permissions import Perm, Scope
from accounts.principal import Principal
from config.errors import Conflict, InvalidInput, NotFound

logger = logging.getLogger(__name__)

SESSION_PLAYGROUND_KEYS = "console_playground_keys"
# A cached playground key is replaced when less than this is left, so a chat that has
# just started never runs into the key's expiry.
PLAYGROUND_KEY_MIN_LEFT = timedelta(minutes=5)


@dataclass(frozen=True)
class SignedUp:
    user: User
    organization: Organization


def user_signup(
    *,
    email: str,
    password: str,
    full_name: str,
    organization_name: str,
    ip_address: str | None = None,
) -> SignedUp:
    """A new person with their own organization (they own it) and its default project."""
    email = email.strip().lower()
    try:
        validate_email(email)
    except ValidationError as exc:
        raise InvalidInput("enter a valid email address", param="email") from exc
    candidate = User(email=email, full_name=full_name.strip())
    try:
        validate_password(password, user=candidate)
    except ValidationError as exc:
        raise InvalidInput(" ".join(exc.messages), param="password") from exc
    if not organization_name.strip():
        raise InvalidInput("organization name must not be empty", param="organization_name")
    with transaction.atomic():
        if User.objects.filter(email=email).exists():
            raise Conflict(
                "an account with this email already exists; log in, or reset its password",
                param="email",
            )
        user = User.objects.create_user(email=email, password=password, full_name=full_name.strip())
        principal = Principal(user=user, ip_address=ip_address)
        org = services.organization_create(principal=principal, name=organization_name, owner=user)
    logger.info("sign-up: %s with organization %s", user.pk, org.id)
    return SignedUp(user=user, organization=org)


@dataclass(frozen=True)
class PlaygroundKey:
    key_id: str
    secret: str
    project_id: str
    expires_at: datetime


def playground_key(
    *,
    principal: Principal,
    org: Organization,
    project: Project,
    session: MutableMapping[str, Any],
    now: datetime | None = None,
) -> PlaygroundKey:
    """A short-lived, inference-only key of `project` for this browser session.

    The playground calls the real /v1 gateway from the browser like any client, so its
    requests are admitted, limited and metered exactly like the customer's own. The
    key is an ordinary, audited key (its name says whose playground it is), kept in the
    server-side session and reused until shortly before it expires.
    """
    now = now or timezone.now()
    # Checked here too, not only by the view: the key spends the organization's money.
    org_checked = selectors.organization_for(principal, org.id, Perm.KEYS_CREATE)
    if project.organization_id != org_checked.id:
        raise NotFound(f"project {project.id!r} not found", param="project_id")
    cache: dict[str, dict[str, str]] = dict(session.get(SESSION_PLAYGROUND_KEYS) or {})
    slot = f"{org_checked.id}:{project.id}"
    found = cache.get(slot)
    if found is not None:
        expires_at = datetime.fromisoformat(found["expires_at"])
        key = selectors.api_keys(org_checked).filter(id=found["key_id"]).first()
        if key is not None and key.is_usable(now + PLAYGROUND_KEY_MIN_LEFT):
            return PlaygroundKey(found["key_id"], found["secret"], project.id, expires_at)
    expires_at = now + timedelta(seconds=settings.MANTLE_PLAYGROUND_KEY_TTL_S)
    key, secret = services.api_key_create(
        principal=principal,
        project=project,
        name=f"Playground · {principal.label}",
        scopes=[Scope.INFERENCE.value],
        expires_at=expires_at,
    )
    cache[slot] = {"key_id": key.id, "secret": secret, "expires_at": expires_at.isoformat()}
    session[SESSION_PLAYGROUND_KEYS] = cache
    return PlaygroundKey(key.id, secret, project.id, expires_at)
