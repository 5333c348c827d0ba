"""Tenant-scoped reads for accounts; every customer-reachable query filters by organization."""

from __future__ import annotations

from django.db.models import QuerySet
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import ApiKey, Invitation, Membership, Organization, Project, User
from accounts.permissions import (
    Perm,
    Role,
    Scope,
    admin_key_role,
    key_scopes_allowed,
    role_allows,
)
from accounts.principal import Principal
from core.errors import NotFound, PermissionDenied

# The roles an organization's "require MFA" setting applies to.
MFA_ROLES = frozenset({Role.OWNER, Role.ADMIN})


class MfaRequired(PermissionDenied):
    """A person who must enrol an authenticator before reaching this organization."""

    code = "mfa_required"


def mfa_enrolled(user: User) -> bool:
    """Whether `user` has a confirmed authenticator (django-otp TOTP device)."""
    return TOTPDevice.objects.filter(user=user, confirmed=True).exists()


def mfa_enrolment_required(org: Organization, role: Role | None, user: User) -> bool:
    """Whether the organization's MFA requirement holds `user` (of `role` there) back."""
    return org.mfa_required and role in MFA_ROLES and not mfa_enrolled(user)


def mfa_organizations_requiring(user: User) -> QuerySet[Organization]:
    """The organizations that require `user` to have an authenticator (owner or admin)."""
    return Organization.objects.filter(
        mfa_required=True,
        memberships__user=user,
        memberships__role__in=[r.value for r in MFA_ROLES],
    ).order_by("created_at")


def organizations_for(principal: Principal) -> QuerySet[Organization]:
    if principal.api_key is not None:
        return Organization.objects.filter(id=principal.api_key.organization_id)
    if principal.user is None:
        return Organization.objects.none()
    return Organization.objects.filter(memberships__user=principal.user).order_by("created_at")


def role_in(principal: Principal, organization_id: str) -> Role | None:
    """The principal's role in the organization; None: no standing there at all.

    An admin-scoped key acts with min(ADMIN, its creator's role *now*), read on every
    call: a key never outranks the person who made it, and demoting or removing that
    person takes the power away even before their keys are narrowed or revoked.
    """
    if principal.api_key is not None:
        key = principal.api_key
        if key.organization_id != organization_id or Scope.ADMIN not in key.scopes:
            return None
        if key.created_by_id is None:
            return None  # nobody vouches for it: no power to manage anything
        return admin_key_role(_member_role(organization_id, key.created_by_id))
    if principal.user is None:
        return None
    return _member_role(organization_id, principal.user.pk)


def _member_role(organization_id: str, user_id: int) -> Role | None:
    role = (
        Membership.objects.filter(organization_id=organization_id, user_id=user_id)
        .values_list("role", flat=True)
        .first()
    )
    return Role(role) if role else None


def organization_for(principal: Principal, organization_id: str, perm: Perm) -> Organization:
    """The organization, if the principal belongs to it and holds `perm` there.

    Outsiders get NotFound, never PermissionDenied: another organization's id
    must not even be confirmed to exist.
    """
    role = role_in(principal, organization_id)
    if role is None:
        raise NotFound(f"organization {organization_id!r} not found", param="organization_id")
    if not role_allows(role, perm):
        raise PermissionDenied(f"the {role} role may not do {perm}")
    org = Organization.objects.filter(id=organization_id).first()
    if org is None:
        raise NotFound(f"organization {organization_id!r} not found", param="organization_id")
    # A person (never a key: keys are unaffected) whom the organization requires to have
    # an authenticator reaches nothing of it until they enrol one.
    user = principal.user
    if principal.api_key is None and user is not None and mfa_enrolment_required(org, role, user):
        raise MfaRequired(
            f"{org.name} requires multi-factor authentication for owners and admins: "
            "enrol an authenticator on your account page (/console/account/) first"
        )
    return org


def organization_for_usage(principal: Principal, organization_id: str) -> Organization:
    """The organization whose usage and costs the principal may read (the usage API).

    A person: a member holding billing.view there. A key: one of the organization's own
    (another's gets NotFound, as everywhere), carrying `read-usage`, or `admin` acting
    with a role that holds billing.view (`role_in`, as for every billing read). A
    `read-usage` key never outranks its maker either: made by a person, that person must
    still be a member whose role hands the scope out (`key_scopes_allowed`); made by the
    system, the scope is what the system gave it.
    """
    key = principal.api_key
    if key is None:
        return organization_for(principal, organization_id, Perm.BILLING_VIEW)
    if key.organization_id != organization_id:
        raise NotFound(f"organization {organization_id!r} not found", param="organization_id")
    if Scope.READ_USAGE in key.scopes:
        maker = (
            None if key.created_by_id is None else _member_role(organization_id, key.created_by_id)
        )
        if key.created_by_id is not None and Scope.READ_USAGE not in key_scopes_allowed(maker):
            raise PermissionDenied(
                "this API key's read-usage scope is void: the person who made it no longer "
                "holds a role that may hand that scope out"
            )
    elif Scope.ADMIN in key.scopes:
        return organization_for(principal, organization_id, Perm.BILLING_VIEW)
    else:
        raise PermissionDenied(
            "this API key lacks the 'read-usage' scope: usage and costs are read with a key "
            "that has the read-usage (or admin) scope, or by a signed-in member with billing "
            "view"
        )
    org = Organization.objects.filter(id=organization_id).first()
    if org is None:
        raise NotFound(f"organization {organization_id!r} not found", param="organization_id")
    return org


def memberships(org: Organization) -> QuerySet[Membership]:
    return Membership.objects.filter(organization=org).select_related("user").order_by("created_at")


def membership_get(org: Organization, membership_id: str) -> Membership:
    found = memberships(org).filter(id=membership_id).first()
    if found is None:
        raise NotFound(f"member {membership_id!r} not found", param="membership_id")
    return found


def projects(org: Organization) -> QuerySet[Project]:
    return Project.objects.filter(organization=org).order_by("created_at")


def project_get(org: Organization, project_id: str) -> Project:
    found = projects(org).filter(id=project_id).first()
    if found is None:
        raise NotFound(f"project {project_id!r} not found", param="project_id")
    return found


def api_keys(org: Organization, project: Project | None = None) -> QuerySet[ApiKey]:
    qs = ApiKey.objects.filter(organization=org).select_related("created_by")
    if project is not None:
        qs = qs.filter(project=project)
    return qs.order_by("-created_at")


def api_key_get(org: Organization, key_id: str) -> ApiKey:
    found = api_keys(org).filter(id=key_id).first()
    if found is None:
        raise NotFound(f"API key {key_id!r} not found", param="key_id")
    return found


def invitations_open(org: Organization) -> QuerySet[Invitation]:
    """Neither accepted nor revoked (expired ones included, to be resent or revoked)."""
    return (
        Invitation.objects.filter(
            organization=org, accepted_at__isnull=True, revoked_at__isnull=True
        )
        .select_related("invited_by")
        .order_by("-created_at")
    )


def invitation_get(org: Organization, invitation_id: str) -> Invitation:
    found = (
        Invitation.objects.filter(organization=org, id=invitation_id)
        .select_related("organization", "invited_by")
        .first()
    )
    if found is None:
        raise NotFound(f"invitation {invitation_id!r} not found", param="invitation_id")
    return found
