"""Roles, and the permission each role grants for each action."""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    DEVELOPER = "developer"
    BILLING = "billing"
    VIEWER = "viewer"


class Perm(enum.StrEnum):
    ORG_VIEW = "org.view"
    ORG_UPDATE = "org.update"
    MEMBERS_VIEW = "members.view"
    MEMBERS_INVITE = "members.invite"
    MEMBERS_CHANGE_ROLE = "members.change_role"
    MEMBERS_REMOVE = "members.remove"
    PROJECTS_VIEW = "projects.view"
    PROJECTS_MANAGE = "projects.manage"
    KEYS_VIEW = "keys.view"
    KEYS_CREATE = "keys.create"
    KEYS_REVOKE = "keys.revoke"
    ENDPOINTS_VIEW = "endpoints.view"
    ENDPOINTS_MANAGE = "endpoints.manage"
    # The organization's own upstream providers (their credentials: owners and admins).
    PROVIDERS_MANAGE = "providers.manage"
    USAGE_VIEW = "usage.view"
    BILLING_VIEW = "billing.view"
    BILLING_MANAGE = "billing.manage"
    AUDIT_VIEW = "audit.view"
    # Alert webhooks and billing contacts (owners, admins, billing).
    ALERTS_MANAGE = "alerts.manage"


_VIEW = {
    Perm.ORG_VIEW,
    Perm.MEMBERS_VIEW,
    Perm.PROJECTS_VIEW,
    Perm.KEYS_VIEW,
    Perm.ENDPOINTS_VIEW,
    Perm.USAGE_VIEW,
}

ROLE_PERMISSIONS: dict[Role, frozenset[Perm]] = {
    Role.OWNER: frozenset(Perm),
    # Admins run the organization but do not move money.
    Role.ADMIN: frozenset(Perm) - {Perm.BILLING_MANAGE},
    Role.DEVELOPER: frozenset(
        _VIEW | {Perm.KEYS_CREATE, Perm.KEYS_REVOKE, Perm.ENDPOINTS_MANAGE, Perm.PROJECTS_MANAGE}
    ),
    Role.BILLING: frozenset(_VIEW | {Perm.BILLING_VIEW, Perm.BILLING_MANAGE, Perm.ALERTS_MANAGE})
    - {Perm.KEYS_VIEW},
    Role.VIEWER: frozenset(_VIEW),
}


def role_allows(role: Role | str, perm: Perm) -> bool:
    return perm in ROLE_PERMISSIONS[Role(role)]


class Scope(enum.StrEnum):
    """What an API key may be used for."""

    INFERENCE = "inference"
    READ_USAGE = "read-usage"
    ADMIN = "admin"


# The scopes a member of each role may put on a key: a key never carries more than the
# person who made it. `admin` lets a key manage the organization, so only the roles that
# manage it may hand it out; roles that cannot create keys hold no scope at all, which is
# also what a member's keys are narrowed to when they are demoted to such a role.
ROLE_KEY_SCOPES: dict[Role, frozenset[Scope]] = {
    Role.OWNER: frozenset(Scope),
    Role.ADMIN: frozenset(Scope),
    Role.DEVELOPER: frozenset({Scope.INFERENCE, Scope.READ_USAGE}),
    Role.BILLING: frozenset(),
    Role.VIEWER: frozenset(),
}


def key_scopes_allowed(role: Role | str | None) -> frozenset[Scope]:
    """The scopes a key made by a member of `role` may carry (none for a non-member)."""
    return ROLE_KEY_SCOPES[Role(role)] if role is not None else frozenset()


def _meet(a: Role, b: Role) -> Role | None:
    """The strongest role whose permissions lie within both `a`'s and `b`'s."""
    both = ROLE_PERMISSIONS[a] & ROLE_PERMISSIONS[b]
    within = [r for r in Role if ROLE_PERMISSIONS[r] <= both]
    return max(within, key=lambda r: len(ROLE_PERMISSIONS[r]), default=None)


# An admin-scoped key acts with min(ADMIN, its creator's current role): an owner's or an
# admin's key acts as an admin, a developer's (made before the scope was restricted) only
# as a developer. Billing's permissions overlap an admin's in no whole role, so a billing
# member's key gets none.
_KEY_ROLE: dict[Role, Role | None] = {role: _meet(Role.ADMIN, role) for role in Role}


def admin_key_role(creator_role: Role | str | None) -> Role | None:
    """The role an admin-scoped key acts with, given its creator's role now (None: none)."""
    return _KEY_ROLE[Role(creator_role)] if creator_role is not None else None
