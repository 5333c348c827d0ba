"""Writes for accounts: organizations, members, projects, API keys; each audited."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts import keys
from accounts.models import ApiKey, AuditLog, Membership, Organization, Project, User
from accounts.permissions import Role, Scope
from accounts.principal import Principal
from config.errors import Conflict, InvalidInput, PermissionDenied
from config.redis import get_redis

logger = logging.getLogger(__name__)

DEFAULT_PROJECT_NAME = "Default project"


def audit_record(
    *,
    principal: Principal,
    action: str,
    target: Any,
    organization: Organization | None,
    metadata: Mapping[str, Any] | None = None,
) -> AuditLog:
    return AuditLog.objects.create(
        organization=organization,
        actor_user=principal.user,
        actor_api_key=principal.api_key,
        actor_label=principal.label,
        action=action,
        target_type=type(target).__name__.lower(),
        target_id=str(target.pk),
        ip_address=principal.ip_address,
        metadata=dict(metadata or {}),
    )


# --- Organizations ------------------------------------------------------------------


@transaction.atomic
def organization_create(
    *, principal: Principal, name: str, owner: User, region: str | None = None
) -> Organization:
    name = _clean_name(name, param="name")
    org = Organization.objects.create(name=name, region=region or settings.MANTLE_DEFAULT_REGION)
    Membership.objects.create(organization=org, user=owner, role=Role.OWNER)
    Project.objects.create(organization=org, name=DEFAULT_PROJECT_NAME, is_default=True)
    audit_record(principal=principal, action="organization.created", target=org, organization=org)
    return org


@transaction.atomic
def organization_update(*, principal: Principal, org: Organization, name: str) -> Organization:
    org.name = _clean_name(name, param="name")
    org.save(update_fields=["name"])
    audit_record(
        principal=principal,
        action="organization.updated",
        target=org,
        organization=org,
        metadata={"name": org.name},
    )
    return org


def organization_set_status(
    *, principal: Principal, org: Organization, status: str, reason: str
) -> Organization:
    """Suspends or reactivates an organization, audited with the reason.

    Every API key's cache entry is rewritten once the change commits, so every gateway
    refuses (or accepts again) the organization's keys at once, without a database read.
    Setting the status it already has changes and records nothing.
    """
    try:
        new_status = Organization.Status(status)
    except ValueError as exc:
        allowed = [s.value for s in Organization.Status]
        raise InvalidInput(f"status must be one of {allowed}", param="status") from exc
    reason = reason.strip()
    if not reason:
        raise InvalidInput("reason must not be empty", param="reason")
    with transaction.atomic():
        locked = Organization.objects.select_for_update().get(pk=org.pk)
        old_status = locked.status
        if old_status != new_status:
            locked.status = new_status
            locked.save(update_fields=["status"])
            action = (
                "organization.suspended"
                if new_status == Organization.Status.SUSPENDED
                else "organization.reactivated"
            )
            audit_record(
                principal=principal,
                action=action,
                target=locked,
                organization=locked,
                metadata={"from": old_status, "to": str(new_status), "reason": reason},
            )
            transaction.on_commit(lambda: _cache_organization_keys(locked.id))
            logger.info("organization %s is now %s: %s", locked.id, new_status, reason)
    org.status = new_status
    return org


def _cache_organization_keys(organization_id: str) -> None:
    # The status is read again after commit: of two quick changes, whichever callback
    # runs last still writes the status that is current.
    org = Organization.objects.get(pk=organization_id)
    for key in ApiKey.objects.filter(organization=org).select_related("project").iterator():
        keys.cache_put(_identity(key, org))


# --- Members -----------------------------------------------------------------------------


@transaction.atomic
def member_invite(*, principal: Principal, org: Organization, email: str, role: Role) -> Membership:
    """Adds a person to the organization; a new person gets an account and an email."""
    email = email.strip().lower()
    _check_may_grant(principal, org, role)
    user = User.objects.filter(email=email).first()
    created = user is None
    if user is None:
        user = User.objects.create_user(email=email, password=None)  # unusable until reset
    if Membership.objects.filter(organization=org, user=user).exists():
        raise Conflict(f"{email} is already a member", param="email")
    membership = Membership.objects.create(organization=org, user=user, role=role)
    audit_record(
        principal=principal,
        action="member.invited",
        target=membership,
        organization=org,
        metadata={"email": email, "role": str(role)},
    )
    transaction.on_commit(lambda: _send_invitation(org, email, new_account=created))
    return membership


@transaction.atomic
def member_change_role(*, principal: Principal, membership: Membership, role: Role) -> Membership:
    org = membership.organization
    old = Role(membership.role)
    if old == role:
        return membership
    _check_may_grant(principal, org, role)
    if old == Role.OWNER:
        _check_may_grant(principal, org, old)
        _ensure_another_owner(membership)
    membership.role = role
    membership.save(update_fields=["role"])
    audit_record(
        principal=principal,
        action="member.role_changed",
        target=membership,
        organization=org,
        metadata={"email": membership.user.email, "from": str(old), "to": str(role)},
    )
    return membership


@transaction.atomic
def member_remove(*, principal: Principal, membership: Membership) -> None:
    org = membership.organization
    if membership.role == Role.OWNER:
        _check_may_grant(principal, org, Role.OWNER)
        _ensure_another_owner(membership)
    audit_record(
        principal=principal,
        action="member.removed",
        target=membership,
        organization=org,
        metadata={"email": membership.user.email, "role": membership.role},
    )
    membership.delete()


def _check_may_grant(principal: Principal, org: Organization, role: Role) -> None:
    """Only owners hand out (or take away) ownership."""
    if role != Role.OWNER:
        return
    from accounts.selectors import role_in

    if role_in(principal, org.id) != Role.OWNER:
        raise PermissionDenied("only an owner can grant or revoke the owner role", param="role")


def _ensure_another_owner(membership: Membership) -> None:
    owners = Membership.objects.select_for_update().filter(
        organization_id=membership.organization_id, role=Role.OWNER
    )
    if owners.exclude(id=membership.id).count() == 0:
        raise Conflict("an organization must keep at least one owner", param="role")


def _send_invitation(org: Organization, email: str, *, new_account: bool) -> None:
    action = "set a password at" if new_account else "sign in at"
    send_mail(
        subject=f"You have been added to {org.name} on Mantle",
        message=f"You are now a member of {org.name}. To start, {action} "
        f"{settings.PUBLIC_BASE_URL}/console/",
        from_email=None,
        recipient_list=[email],
    )


# --- Projects ------------------------------------------------------------------------


def project_create(*, principal: Principal, org: Organization, name: str) -> Project:
    name = _clean_name(name, param="name")
    try:
        with transaction.atomic():
            project = Project.objects.create(organization=org, name=name)
            audit_record(
                principal=principal, action="project.created", target=project, organization=org
            )
    except IntegrityError as exc:
        raise Conflict(f"a project named {name!r} already exists", param="name") from exc
    return project


def project_update(*, principal: Principal, project: Project, name: str) -> Project:
    name = _clean_name(name, param="name")
    try:
        with transaction.atomic():
            project.name = name
            project.save(update_fields=["name"])
            audit_record(
                principal=principal,
                action="project.updated",
                target=project,
                organization=project.organization,
                metadata={"name": name},
            )
    except IntegrityError as exc:
        raise Conflict(f"a project named {name!r} already exists", param="name") from exc
    return project


# --- API keys ------------------------------------------------------------------------------


def api_key_create(
    *,
    principal: Principal,
    project: Project,
    name: str,
    scopes: Sequence[str],
    expires_at: datetime | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
) -> tuple[ApiKey, str]:
    """Creates a key and returns it with its secret, which is never available again."""
    name = _clean_name(name, param="name")
    clean_scopes = _clean_scopes(scopes)
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("expires_at must be in the future", param="expires_at")
    if Scope.ADMIN in clean_scopes and principal.api_key is not None:
        # A leaked admin key must not be able to mint fresh ones that outlive its revocation.
        raise PermissionDenied("an API key cannot create admin-scoped keys", param="scopes")
    secret = keys.generate_secret()
    digest = keys.secret_digest(secret)
    org = project.organization
    with transaction.atomic():
        key = ApiKey.objects.create(
            organization=org,
            project=project,
            name=name,
            prefix=keys.display_prefix(secret),
            digest=digest,
            scopes=clean_scopes,
            created_by=principal.user,
            expires_at=expires_at,
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
        )
        audit_record(
            principal=principal,
            action="api_key.created",
            target=key,
            organization=org,
            metadata={"name": name, "scopes": clean_scopes, "prefix": key.prefix},
        )
        transaction.on_commit(lambda: keys.cache_put(_identity(key, org)))
    logger.info("API key %s created in %s", key.id, org.id)
    return key, secret


def api_key_revoke(*, principal: Principal, key: ApiKey) -> ApiKey:
    """Revokes at once: the cache entry is overwritten, so no gateway accepts it again."""
    if key.revoked_at is not None:
        return key
    with transaction.atomic():
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
        audit_record(
            principal=principal,
            action="api_key.revoked",
            target=key,
            organization=key.organization,
            metadata={"prefix": key.prefix},
        )
    # Written after commit and outside it: a crash in between is covered by the
    # entry's TTL, and the next cache miss reads the revoked row.
    keys.cache_put(_identity(key, key.organization))
    logger.info("API key %s revoked", key.id)
    return key


def api_key_identity_load(digest: str) -> keys.KeyIdentity | None:
    """The gateway's cache-miss path: the identity of a key from the database."""
    key = ApiKey.objects.select_related("organization", "project").filter(digest=digest).first()
    if key is None:
        return None
    return _identity(key, key.organization)


def api_keys_flush_last_used() -> int:
    """Moves the last-used times recorded in Redis to the database, in one batch."""
    client = get_redis()
    staging = f"{keys.LAST_USED_HASH}:flushing"
    try:
        client.rename(keys.LAST_USED_HASH, staging)
    except redis.ResponseError:  # no such key: nothing used since the last flush
        return 0
    entries: dict[str, str] = client.hgetall(staging)  # type: ignore[assignment]
    client.delete(staging)
    by_key = {k: datetime.fromtimestamp(float(ts), tz=UTC) for k, ts in entries.items()}
    rows = list(ApiKey.objects.filter(id__in=by_key))
    for row in rows:
        row.last_used_at = by_key[row.id]
    ApiKey.objects.bulk_update(rows, ["last_used_at"], batch_size=500)
    return len(rows)


def _identity(key: ApiKey, org: Organization) -> keys.KeyIdentity:
    return keys.identity_of(
        digest=key.digest,
        key_id=key.id,
        organization_id=org.id,
        project_id=key.project_id,
        scopes=list(key.scopes),
        expires_at=key.expires_at,
        revoked=key.revoked_at is not None,
        organization_active=org.status == Organization.Status.ACTIVE,
        limits=(
            key.rpm_limit or settings.MANTLE_DEFAULT_KEY_RPM,
            key.tpm_limit or settings.MANTLE_DEFAULT_KEY_TPM,
            key.project.rpm_limit or settings.MANTLE_DEFAULT_PROJECT_RPM,
            key.project.tpm_limit or settings.MANTLE_DEFAULT_PROJECT_TPM,
        ),
    )


def _clean_scopes(scopes: Sequence[str]) -> list[str]:
    if not scopes:
        raise InvalidInput("scopes must name at least one scope", param="scopes")
    allowed = {s.value for s in Scope}
    unknown = [s for s in scopes if s not in allowed]
    if unknown:
        raise InvalidInput(
            f"unknown scope {unknown[0]!r}; expected one of {sorted(allowed)}", param="scopes"
        )
    return sorted(set(scopes))


def _clean_name(value: str, *, param: str) -> str:
    cleaned = value.strip()
    if not cleaned:
        raise InvalidInput(f"{param} must not be empty", param=param)
    if len(cleaned) > 120:
        raise InvalidInput(f"{param} must be at most 120 characters", param=param)
    return cleaned
