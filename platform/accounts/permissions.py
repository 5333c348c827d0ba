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
    USAGE_VIEW = "usage.view"
    BILLING_VIEW = "billing.view"
    BILLING_MANAGE = "billing.manage"
    AUDIT_VIEW = "audit.view"


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
    Role.BILLING: frozenset(_VIEW | {Perm.BILLING_VIEW, Perm.BILLING_MANAGE}) - {Perm.KEYS_VIEW},
    Role.VIEWER: frozenset(_VIEW),
}


def role_allows(role: Role | str, perm: Perm) -> bool:
    return perm in ROLE_PERMISSIONS[Role(role)]


class Scope(enum.StrEnum):
    """What an API key may be used for."""

    INFERENCE = "inference"
    READ_USAGE = "read-usage"
    ADMIN = "admin"
