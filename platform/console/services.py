"""Console writes that are not a single accounts service: sign-up, the playground's key,
and batches (the gateway's Files and Batch API services, audited)."""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pydantic
from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.crypto import salted_hmac

from accounts import emails, keys, selectors, services, throttle
from accounts.models import Organization, PendingSignup, Project, User
from accounts.permissions import Perm, Scope
from accounts.principal import Principal
from core.errors import Conflict, DomainError, InvalidInput, NotFound
from gateway import batches, files
from gateway.errors import OpenAIError
from gateway.models import Batch, File
from gateway.protocol_batches import BatchCreateRequest

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
) -> None:
    """Mails a link that creates the account; nothing exists until it is followed.

    The answer is the same whether or not the address is registered (a registered one
    gets a "someone tried to sign up" email instead of a link), so the form does not
    reveal who has an account; attempts are throttled per address and per client.
    """
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
    throttle.signup_throttle_hit(email=email, address=ip_address)
    # Hashed on both paths, so the time taken does not tell the two apart either.
    password_hash = make_password(password)
    now = timezone.now()
    with transaction.atomic():
        PendingSignup.objects.filter(expires_at__lte=now).delete()
        if User.objects.filter(email=email).exists():
            transaction.on_commit(lambda: emails.send_signup_existing(email=email))
            logger.info("sign-up for a registered address from %s", ip_address or "unknown")
            return
        link = emails.link_new(ttl_s=settings.MANTLE_SIGNUP_LINK_TTL_S, now=now)
        pending = PendingSignup.objects.create(
            email=email,
            full_name=full_name.strip(),
            organization_name=organization_name.strip(),
            password=password_hash,
            token_digest=link.digest,
            ip_address=ip_address,
            expires_at=link.expires_at,
        )
        transaction.on_commit(
            lambda: emails.send_signup_verification(
                email=email, token=link.secret, expires_at=link.expires_at
            )
        )
    logger.info("sign-up link sent (pending sign-up %s)", pending.pk)


def signup_verify(*, token: str, ip_address: str | None = None) -> SignedUp:
    """Follows a sign-up link: the account (verified) and its organization, once."""
    now = timezone.now()
    with transaction.atomic():
        pending = (
            PendingSignup.objects.select_for_update()
            .filter(token_digest=emails.link_digest(token), expires_at__gt=now)
            .first()
        )
        if pending is None:
            raise NotFound("this sign-up link is not valid: it was used or it expired")
        if User.objects.filter(email=pending.email).exists():
            # Another sign-up (or an invitation) for this address was completed first.
            PendingSignup.objects.filter(email=pending.email).delete()
            raise Conflict("this address already has an account: log in", param="email")
        try:
            with transaction.atomic():
                user = User.objects.create_user(
                    email=pending.email, full_name=pending.full_name, email_verified_at=now
                )
        except IntegrityError as exc:  # another link of the address, followed meanwhile
            raise Conflict("this address already has an account: log in", param="email") from exc
        # The hash chosen at sign-up, set as is: the password itself was never stored.
        user.password = pending.password
        user.save(update_fields=["password"])
        principal = Principal(user=user, ip_address=ip_address)
        org = services.organization_create(
            principal=principal, name=pending.organization_name, owner=user
        )
        # Every other pending sign-up of the address dies with this one.
        PendingSignup.objects.filter(email=pending.email).delete()
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
    key is an ordinary, audited key (its name says whose playground it is), reused by
    the session until shortly before it expires.

    No usable secret is kept at rest: the database-backed session holds only the key's
    id and a random seed, and the secret is derived from the seed under a key that is
    not in the database (`playground_secret`). A copy of the session table, a backup
    or a read-only SQL injection yields nothing the gateway accepts.
    """
    now = now or timezone.now()
    # Checked here too, not only by the view: the key spends the organization's money.
    org_checked = selectors.organization_for(principal, org.id, Perm.KEYS_CREATE)
    if project.organization_id != org_checked.id:
        raise NotFound(f"project {project.id!r} not found", param="project_id")
    # Entries written before secrets were derived held the secret itself: dropped.
    cache: dict[str, dict[str, str]] = {
        slot: entry
        for slot, entry in (session.get(SESSION_PLAYGROUND_KEYS) or {}).items()
        if "seed" in entry and "secret" not in entry
    }
    slot = f"{org_checked.id}:{project.id}"
    found = cache.get(slot)
    if found is not None:
        key = selectors.api_keys(org_checked).filter(id=found["key_id"]).first()
        secret = playground_secret(found["seed"])
        # The digest check also catches a rotated SECRET_KEY (the seed no longer
        # derives this key's secret): a fresh key is minted instead.
        if (
            key is not None
            and key.is_usable(now + PLAYGROUND_KEY_MIN_LEFT)
            and keys.constant_time_equal(key.digest, keys.secret_digest(secret))
        ):
            assert key.expires_at is not None
            return PlaygroundKey(key.id, secret, project.id, key.expires_at)
    expires_at = now + timedelta(seconds=settings.MANTLE_PLAYGROUND_KEY_TTL_S)
    seed = secrets.token_urlsafe(32)
    key, secret = services.api_key_create(
        principal=principal,
        project=project,
        name=f"Playground · {principal.label}",
        scopes=[Scope.INFERENCE.value],
        expires_at=expires_at,
        secret=playground_secret(seed),
    )
    cache[slot] = {"key_id": key.id, "seed": seed, "expires_at": expires_at.isoformat()}
    session[SESSION_PLAYGROUND_KEYS] = cache
    return PlaygroundKey(key.id, secret, project.id, expires_at)


_PLAYGROUND_SALT = "mantle.console.playground-key"
_BASE62 = string.ascii_letters + string.digits


def playground_secret(seed: str) -> str:
    """The playground key's secret for `seed`: HMAC-SHA512 under Django's SECRET_KEY.

    SECRET_KEY lives in the environment (or a mounted file), never in the database, so
    the seed in a session row is useless alone. Whoever holds SECRET_KEY can already
    forge a session cookie for any user (and so mint keys); deriving from it adds no
    new secret to guard. The 512-bit MAC is written as the usual 48 base62 characters.
    """
    mac = salted_hmac(_PLAYGROUND_SALT, seed, algorithm="sha512").digest()
    number = int.from_bytes(mac, "big")
    chars = []
    for _ in range(keys.SECRET_LENGTH):
        number, digit = divmod(number, len(_BASE62))
        chars.append(_BASE62[digit])
    return keys.SECRET_PREFIX + "".join(chars)


# --- Batches: the gateway's Files and Batch API services, audited ---------------------------

# The Batch API's parameter names, as the console's batch form calls them.
_BATCH_FORM_FIELDS = {"input_file_id": "input_file", "file": "file"}


def _console_error(exc: OpenAIError) -> DomainError:
    """The batches service's OpenAI-shaped error as the console shows errors."""
    if exc.status == 404:
        return NotFound(exc.message, param=_BATCH_FORM_FIELDS.get(exc.param or ""))
    error = DomainError(exc.message, param=_BATCH_FORM_FIELDS.get(exc.param or ""), code=exc.code)
    error.status = exc.status
    return error


def batch_file_upload(
    *, principal: Principal, org: Organization, filename: str, chunks: Iterable[bytes]
) -> File:
    """A batch's input file uploaded in the console: the Files API's own upload (streamed to
    the store, the file limit and the organization's quotas), purpose `batch`; audited, as
    the console's person is not on the file's row (no key uploaded it)."""
    uploaded = files.file_upload(
        owner=files.Owner(org.id, "", ""),
        purpose=files.PURPOSE_BATCH,
        filename=filename,
        chunks=chunks,
        expires_after_s=None,
    )
    services.audit_record(
        principal=principal,
        action="file.uploaded",
        target=uploaded,
        organization=org,
        metadata={"filename": uploaded.filename, "bytes": uploaded.bytes, "purpose": "batch"},
    )
    return uploaded


def batch_create(
    *,
    principal: Principal,
    org: Organization,
    api_key_id: str,
    input_file_id: str,
    endpoint: str,
    description: str = "",
) -> Batch:
    """A batch created in the console, exactly as POST /v1/batches would with the key
    `api_key_id`: the batch runs (and its lines are billed) under that key and its project.
    The key must be the organization's, usable and scoped for inference; audited."""
    key = selectors.api_key_get(org, api_key_id)
    if not key.is_usable() or Scope.INFERENCE not in key.scopes:
        raise InvalidInput(
            f"the key {key.name} ({key.prefix}…) is revoked, expired or not scoped for "
            "inference; a batch runs its lines as that key's requests",
            param="api_key",
        )
    try:
        body = BatchCreateRequest(
            input_file_id=input_file_id,
            endpoint=endpoint,  # type: ignore[arg-type]  # validated by the model
            completion_window="24h",
            metadata={"description": description} if description else None,
        )
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        raise InvalidInput(first["msg"], param=_BATCH_FORM_FIELDS.get(field or "", field)) from exc
    with transaction.atomic():
        try:
            batch = batches.batch_create(batches.Creator(org.id, key.project_id, key.id), body)
        except OpenAIError as exc:
            raise _console_error(exc) from exc
        services.audit_record(
            principal=principal,
            action="batch.created",
            target=batch,
            organization=org,
            metadata={
                "endpoint": batch.endpoint,
                "input_file_id": batch.input_file_id,
                "api_key_id": key.id,
                "api_key_prefix": key.prefix,
            },
        )
    logger.info("batch %s created in %s from the console", batch.id, org.id)
    return batch


def batch_cancel(*, principal: Principal, org: Organization, batch_id: str) -> Batch:
    """Cancels the organization's batch as POST /v1/batches/{id}/cancel does (NotFound for
    another's; 409 once it is past cancelling); audited when this call cancelled it."""
    with transaction.atomic():
        # Locked first, so two cancels in a row record one cancellation.
        before = (
            Batch.objects.select_for_update()
            .filter(organization=org, id=batch_id)
            .values_list("status", flat=True)
            .first()
        )
        try:
            batch = batches.batch_cancel(org.id, batch_id)
        except OpenAIError as exc:
            raise _console_error(exc) from exc
        if before != batch.status:
            services.audit_record(
                principal=principal,
                action="batch.cancelled",
                target=batch,
                organization=org,
                metadata={"status_before": before},
            )
    return batch
