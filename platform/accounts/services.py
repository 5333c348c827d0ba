"""Writes for accounts: organizations, members, projects, API keys; each audited."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts import emails, keys, throttle
from accounts.models import (
    ApiKey,
    AuditLog,
    BudgetMode,
    Invitation,
    Membership,
    Organization,
    Project,
    User,
)
from accounts.permissions import Perm, Role, Scope, key_scopes_allowed, role_allows
from accounts.principal import Principal
from core.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from core.redis import get_redis

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
    region = region or settings.MANTLE_DEFAULT_REGION
    if region not in settings.MANTLE_REGIONS:
        # Only the regions the platform runs (MANTLE_REGIONS): a made-up one would leave the
        # organization with no pool to place an endpoint on.
        raise InvalidInput(
            f"region must be one of {', '.join(settings.MANTLE_REGIONS)}", param="region"
        )
    org = Organization.objects.create(name=name, region=region)
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


@transaction.atomic
def organization_mfa_set(
    *, principal: Principal, org: Organization, required: bool
) -> Organization:
    """Turns "require MFA for owners and admins" on or off: owners only, and only an
    owner who has an authenticator themselves may turn it on (so that the one who
    decides is not the first one locked out). Audited."""
    from accounts.selectors import mfa_enrolled, role_in

    if principal.user is None or role_in(principal, org.id) != Role.OWNER:
        raise PermissionDenied("only an owner may change the organization's MFA requirement")
    org = Organization.objects.select_for_update().get(pk=org.pk)
    if required and not mfa_enrolled(principal.user):
        raise Conflict(
            "enrol an authenticator on your account page before requiring one of others",
            param="mfa_required",
        )
    if org.mfa_required == required:
        return org
    org.mfa_required = required
    org.save(update_fields=["mfa_required"])
    audit_record(
        principal=principal,
        action="organization.mfa_required" if required else "organization.mfa_not_required",
        target=org,
        organization=org,
        metadata={"mfa_required": required},
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
def member_invite(*, principal: Principal, org: Organization, email: str, role: Role) -> Invitation:
    """Invites `email` as `role`: nobody joins until the link mailed to `email` is accepted.

    Nothing is granted here, not even to an existing account with that address: whoever
    registered an address first need not be the one who reads its mail, and only the
    link (sent to that mailbox, never shown to the inviter) proves that.
    """
    check_signed_in_person(principal)
    email = email.strip().lower()
    _check_may_grant(principal, org, role)
    if principal.user is not None and not principal.user.email_verified:
        # An invitation names its sender: an unproven address must not send one.
        raise PermissionDenied(
            "confirm your own email address before inviting people", param="email"
        )
    if Membership.objects.filter(organization=org, user__email=email).exists():
        raise Conflict(f"{email} is already a member", param="email")
    now = timezone.now()
    open_ones = Invitation.objects.select_for_update().filter(
        organization=org, email=email, accepted_at__isnull=True, revoked_at__isnull=True
    )
    for stale in open_ones:
        if stale.expires_at > now:
            raise Conflict(
                f"{email} already has a pending invitation; resend or revoke it", param="email"
            )
        # An expired one gives way to the new one (one open invitation per address).
        stale.revoked_at = now
        stale.save(update_fields=["revoked_at"])
    throttle.invitation_mail_throttle_hit(organization_id=org.id, email=email)
    link = emails.link_new(ttl_s=settings.MANTLE_INVITATION_TTL_S, now=now)
    invitation = Invitation.objects.create(
        organization=org,
        email=email,
        role=role,
        invited_by=principal.user,
        token_digest=link.digest,
        sent_at=now,
        expires_at=link.expires_at,
    )
    audit_record(
        principal=principal,
        action="member.invited",
        target=invitation,
        organization=org,
        metadata={"email": email, "role": str(role)},
    )
    _mail_invitation_on_commit(invitation, link.secret, principal)
    return invitation


@transaction.atomic
def invitation_resend(*, principal: Principal, invitation: Invitation) -> Invitation:
    """A fresh link (the old one stops working) and a fresh expiry, mailed again."""
    check_signed_in_person(principal)
    locked = Invitation.objects.select_for_update().get(pk=invitation.pk)
    _check_may_grant(principal, locked.organization, Role(locked.role))
    if locked.accepted_at is not None or locked.revoked_at is not None:
        raise Conflict(f"this invitation was already {locked.status()}", param="invitation_id")
    throttle.invitation_mail_throttle_hit(
        organization_id=locked.organization_id, email=locked.email
    )
    now = timezone.now()
    link = emails.link_new(ttl_s=settings.MANTLE_INVITATION_TTL_S, now=now)
    locked.token_digest, locked.sent_at, locked.expires_at = link.digest, now, link.expires_at
    locked.save(update_fields=["token_digest", "sent_at", "expires_at"])
    audit_record(
        principal=principal,
        action="member.invitation_resent",
        target=locked,
        organization=locked.organization,
        metadata={"email": locked.email},
    )
    _mail_invitation_on_commit(locked, link.secret, principal)
    return locked


@transaction.atomic
def invitation_revoke(*, principal: Principal, invitation: Invitation) -> Invitation:
    check_signed_in_person(principal)
    locked = Invitation.objects.select_for_update().get(pk=invitation.pk)
    if locked.accepted_at is not None:
        raise Conflict("this invitation was already accepted", param="invitation_id")
    if locked.revoked_at is None:
        locked.revoked_at = timezone.now()
        locked.save(update_fields=["revoked_at"])
        audit_record(
            principal=principal,
            action="member.invitation_revoked",
            target=locked,
            organization=locked.organization,
            metadata={"email": locked.email},
        )
    return locked


def invitation_by_token(token: str) -> Invitation:
    """The open invitation a link's secret names; NotFound for anything else.

    Used, revoked, expired, tampered and unknown links get the same answer, so a link
    tells its holder nothing beyond what it was sent for.
    """
    found = (
        Invitation.objects.select_related("organization", "invited_by")
        .filter(token_digest=emails.link_digest(token))
        .first()
    )
    if found is None or found.status() != "pending":
        raise NotFound("this invitation link is not valid: it was used, revoked or expired")
    return found


@transaction.atomic
def invitation_accept(*, token: str, user: User, ip_address: str | None = None) -> Membership:
    """`user` joins through the link; their verified email must be the invited one.

    The link proves control of the mailbox, the session proves the account: both name the
    same address, and that address was proven to be the account's. Single use: the row is
    locked and marked accepted in the same transaction as the membership.
    """
    pending = invitation_by_token(token)
    invitation = Invitation.objects.select_for_update().get(pk=pending.pk)
    if invitation.status() != "pending":
        raise NotFound("this invitation link is not valid: it was used, revoked or expired")
    if user.email.lower() != invitation.email:
        raise PermissionDenied(
            f"this invitation is for {invitation.email}; you are signed in as {user.email}"
        )
    if not user.email_verified:
        raise PermissionDenied(
            "your account's email address is not confirmed yet: reset your password "
            "(the reset link confirms it), then open this invitation again"
        )
    org = invitation.organization
    _check_inviter_still_may(invitation)
    if Membership.objects.filter(organization=org, user=user).exists():
        raise Conflict(f"{user.email} is already a member of {org.name}", param="email")
    membership = Membership.objects.create(organization=org, user=user, role=invitation.role)
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    audit_record(
        principal=Principal(user=user, ip_address=ip_address),
        action="member.joined",
        target=membership,
        organization=org,
        metadata={"email": user.email, "role": invitation.role, "invitation": invitation.id},
    )
    logger.info("%s joined %s as %s", user.pk, org.id, invitation.role)
    return membership


@transaction.atomic
def invitation_accept_new_account(
    *, token: str, password: str, full_name: str, ip_address: str | None = None
) -> Membership:
    """Someone without an account accepts: the link verifies the address it was sent to."""
    invitation = invitation_by_token(token)
    if User.objects.filter(email=invitation.email).exists():
        raise Conflict(f"an account for {invitation.email} exists: log in to accept", param="email")
    candidate = User(email=invitation.email, full_name=full_name.strip())
    try:
        validate_password(password, user=candidate)
    except ValidationError as exc:
        raise InvalidInput(" ".join(exc.messages), param="password") from exc
    try:
        with transaction.atomic():
            user = User.objects.create_user(
                email=invitation.email,
                password=password,
                full_name=full_name.strip(),
                email_verified_at=timezone.now(),
            )
    except IntegrityError as exc:  # created meanwhile (a sign-up link, a second tab)
        raise Conflict(
            f"an account for {invitation.email} exists: log in to accept", param="email"
        ) from exc
    return invitation_accept(token=token, user=user, ip_address=ip_address)


def _check_inviter_still_may(invitation: Invitation) -> None:
    """An invitation is worth no more than its sender's current power: one sent by a
    since-removed or demoted member is void."""
    from accounts.selectors import role_in

    inviter = invitation.invited_by
    if inviter is None:  # sent by the system (operators, seed data)
        return
    role = role_in(Principal(user=inviter), invitation.organization_id)
    allowed = role is not None and role_allows(role, Perm.MEMBERS_INVITE)
    if allowed and invitation.role == Role.OWNER:
        allowed = role == Role.OWNER
    if not allowed:
        raise PermissionDenied(
            "this invitation is no longer valid: whoever sent it may no longer invite; "
            "ask the organization for a new one"
        )


def _mail_invitation_on_commit(invitation: Invitation, secret: str, principal: Principal) -> None:
    org_name = invitation.organization.name
    inviter = principal.label if principal.user is not None else f"The {org_name} team"

    def send() -> None:
        emails.send_invitation(
            email=invitation.email,
            organization_name=org_name,
            role=invitation.role,
            inviter=inviter,
            token=secret,
            expires_at=invitation.expires_at,
        )

    transaction.on_commit(send)


@transaction.atomic
def member_change_role(*, principal: Principal, membership: Membership, role: Role) -> Membership:
    """Changes a member's role; their keys are narrowed to what the new role may hold.

    A key that keeps no scope is revoked. Both happen in this transaction, and every
    gateway's cache entry of a changed key is rewritten once it commits.
    """
    check_signed_in_person(principal)
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
    _restrict_member_keys(principal=principal, membership=membership, role=role)
    return membership


@transaction.atomic
def member_remove(*, principal: Principal, membership: Membership) -> None:
    """Removes a member and revokes, at once and at every gateway, every key they created."""
    check_signed_in_person(principal)
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
    _restrict_member_keys(principal=principal, membership=membership, role=None)
    membership.delete()


def check_signed_in_person(principal: Principal) -> None:
    """People are managed by a signed-in person (or the system), never by an API key.

    A key is a long-lived bearer secret that outlives sessions and password resets; if it
    could invite, promote or remove members, one leaked key would take the organization.
    """
    if principal.api_key is not None:
        raise PermissionDenied(
            "members are invited, changed and removed by a signed-in person, not an API key"
        )


def _restrict_member_keys(
    *, principal: Principal, membership: Membership, role: Role | None
) -> None:
    """Narrows the keys `membership`'s person created in its organization to `role`.

    `role` None (the member is being removed) revokes them all. A key keeps only the
    scopes the role may hand out (`key_scopes_allowed`); one left with none is revoked.
    Runs inside the caller's transaction; the cache entries are rewritten after commit
    through the same write-through as `api_key_revoke`, so no gateway accepts a revoked
    key, or an inference call from a narrowed one, once the change is visible.
    """
    org = membership.organization
    allowed = {s.value for s in key_scopes_allowed(role)}
    reason = "member.removed" if role is None else "member.role_changed"
    live = (
        ApiKey.objects.select_for_update(of=("self",))
        .select_related("project")
        .filter(organization=org, created_by_id=membership.user_id, revoked_at__isnull=True)
        .order_by("created_at")
    )
    changed: list[ApiKey] = []
    for key in live:
        kept = [s for s in key.scopes if s in allowed]
        if kept == list(key.scopes):
            continue
        if kept:
            metadata = {"prefix": key.prefix, "from": list(key.scopes), "to": kept}
            key.scopes = kept
            key.save(update_fields=["scopes"])
            action = "api_key.narrowed"
        else:
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])
            metadata, action = {"prefix": key.prefix}, "api_key.revoked"
        audit_record(
            principal=principal,
            action=action,
            target=key,
            organization=org,
            metadata={**metadata, "because": reason, "member": membership.user.email},
        )
        changed.append(key)
    if changed:
        transaction.on_commit(lambda: _cache_keys(changed, org))
        logger.info(
            "%d API keys of %s in %s narrowed or revoked (%s)",
            len(changed),
            membership.user_id,
            org.id,
            reason,
        )


def _cache_keys(changed: Sequence[ApiKey], org: Organization) -> None:
    for key in changed:
        keys.cache_put(_identity(key, org))


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


def limits_within_organization(*, rpm_limit: int | None, tpm_limit: int | None) -> None:
    """A key's or project's limits may not exceed its organization's share of an endpoint
    (MANTLE_ORG_ENDPOINT_RPM/TPM): such a limit would promise what admission never gives.
    Limits set before (or by the back office) are clamped when served
    (gateway.pipeline.limits_for)."""
    for value, cap, param in (
        (rpm_limit, settings.MANTLE_ORG_ENDPOINT_RPM, "rpm_limit"),
        (tpm_limit, settings.MANTLE_ORG_ENDPOINT_TPM, "tpm_limit"),
    ):
        if value is not None and value > cap:
            raise InvalidInput(
                f"{param} may be at most {cap}, the organization's limit per endpoint",
                param=param,
            )


def api_key_create(
    *,
    principal: Principal,
    project: Project,
    name: str,
    scopes: Sequence[str],
    expires_at: datetime | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    secret: str | None = None,
) -> tuple[ApiKey, str]:
    """Creates a key and returns it with its secret, which is never available again.

    The key records the person it acts for: the signed-in creator, or, for a key made by
    an admin key, that key's own creator (so removing the person revokes both). It may
    carry only the scopes that person's role hands out (`key_scopes_allowed`); the
    system (no person) makes keys without `admin`. `secret`, when given, is one the
    caller derived itself (the console's playground); otherwise a fresh random one.
    """
    name = _clean_name(name, param="name")
    clean_scopes = _clean_scopes(scopes)
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("expires_at must be in the future", param="expires_at")
    limits_within_organization(rpm_limit=rpm_limit, tpm_limit=tpm_limit)
    if Scope.ADMIN in clean_scopes and principal.api_key is not None:
        # A leaked admin key must not be able to mint fresh ones that outlive its revocation.
        raise PermissionDenied("an API key cannot create admin-scoped keys", param="scopes")
    org = project.organization
    creator = _check_key_scopes(principal, org, clean_scopes)
    if secret is not None and not keys.looks_like_secret(secret):
        raise InvalidInput("a given secret must have the API key format", param="secret")
    secret = secret or keys.generate_secret()
    digest = keys.secret_digest(secret)
    with transaction.atomic():
        key = ApiKey.objects.create(
            organization=org,
            project=project,
            name=name,
            prefix=keys.display_prefix(secret),
            digest=digest,
            scopes=clean_scopes,
            created_by=creator,
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


MAX_ALLOWED_MODELS = 100
MAX_KEY_BUDGET = Decimal("1000000000")


def api_key_controls_set(
    *,
    principal: Principal,
    key: ApiKey,
    monthly_budget: Decimal | None,
    budget_mode: str,
    allowed_models: Sequence[str],
) -> ApiKey:
    """Sets a key's monthly budget (None: none), its mode (hard or soft) and the models it
    may use (empty: all), already checked by the caller against the catalog
    (billing.key_budgets). Written through to the identity cache on commit, so every
    gateway enforces the new allowlist at once."""
    if budget_mode not in BudgetMode.values:
        raise InvalidInput(
            f"budget_mode must be one of {sorted(BudgetMode.values)}", param="budget_mode"
        )
    if monthly_budget is not None:
        if monthly_budget.as_tuple().exponent < -2:  # type: ignore[operator]
            raise InvalidInput(
                "monthly_budget has at most 2 decimal places", param="monthly_budget"
            )
        if not Decimal(0) <= monthly_budget <= MAX_KEY_BUDGET:
            raise InvalidInput(
                f"monthly_budget must be in [0, {MAX_KEY_BUDGET}]", param="monthly_budget"
            )
        monthly_budget = monthly_budget.quantize(Decimal("0.01"))
    names = sorted(set(allowed_models))
    if len(names) > MAX_ALLOWED_MODELS:
        raise InvalidInput(
            f"allowed_models names at most {MAX_ALLOWED_MODELS} models", param="allowed_models"
        )
    with transaction.atomic():
        key = (
            ApiKey.objects.select_for_update()
            .select_related("organization", "project")
            .get(pk=key.pk)
        )
        before = {
            "monthly_budget": None if key.monthly_budget is None else str(key.monthly_budget),
            "budget_mode": key.budget_mode,
            "allowed_models": list(key.allowed_models or ()),
        }
        key.monthly_budget = monthly_budget
        key.budget_mode = budget_mode
        key.allowed_models = names
        key.save(update_fields=["monthly_budget", "budget_mode", "allowed_models"])
        after = {
            "monthly_budget": None if monthly_budget is None else str(monthly_budget),
            "budget_mode": budget_mode,
            "allowed_models": names,
        }
        audit_record(
            principal=principal,
            action="api_key.controls_set",
            target=key,
            organization=key.organization,
            metadata={"prefix": key.prefix, "before": before, "after": after},
        )
        org = key.organization
        changed = key
        transaction.on_commit(lambda: keys.cache_put(_identity(changed, org)))
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
        allowed_models=list(key.allowed_models or ()),
    )


def _check_key_scopes(
    principal: Principal, org: Organization, scopes: Sequence[str]
) -> User | None:
    """The person a new key acts for, once the scopes are within that person's role."""
    if principal.user is None and principal.api_key is None:
        if Scope.ADMIN in scopes:
            raise PermissionDenied(
                "admin-scoped keys are created by an owner or admin of the organization",
                param="scopes",
            )
        return None
    from accounts.selectors import role_in

    role = role_in(principal, org.id)
    allowed = key_scopes_allowed(role)
    beyond = [s for s in scopes if s not in allowed]
    if beyond:
        who = f"the {role} role" if role is not None else "this caller"
        raise PermissionDenied(
            f"{who} may not create keys with the {beyond[0]!r} scope; "
            f"allowed: {sorted(s.value for s in allowed)}",
            param="scopes",
        )
    if principal.api_key is not None:
        return principal.api_key.created_by
    return principal.user


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
