"""A key never outranks its creator: scopes by role, admin keys' power, people by a person only.

The attack (issue 13, item 2): a developer mints an `admin`-scoped key, and the key, acting
as an admin, promotes its own creator or invites new admins. Here every role creates every
scope through the console and the management API, and the keys that result are tried
against what an admin key may and may not do. What removal and demotion do to keys at a
real gateway process is in test_privileges_e2e.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core import mail
from django.test import Client

from accounts import keys, services
from accounts.models import ApiKey, AuditLog, Membership, User
from accounts.permissions import (
    Perm,
    Role,
    Scope,
    admin_key_role,
    key_scopes_allowed,
    role_allows,
)
from accounts.principal import SYSTEM, Principal
from core.errors import PermissionDenied
from tests.conftest import OrgWorld
from tests.console.support import org_url
from tests.factories import add_member, default_project, make_api_key

pytestmark = pytest.mark.django_db

ROLES = list(Role)
SCOPES = list(Scope)
MANAGES = {Role.OWNER, Role.ADMIN}


def api(client: Client, method: str, path: str, body: Any = None) -> Any:
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs = {"data": json.dumps(body), "content_type": "application/json"}
    return getattr(client, method)(f"/api/v1{path}", **kwargs)


def bearer(secret: str) -> Client:
    return Client(headers={"authorization": f"Bearer {secret}"})


def org_path(world: OrgWorld, suffix: str = "") -> str:
    return f"/organizations/{world.org.id}{suffix}"


def membership(world: OrgWorld, role: Role) -> Membership:
    return Membership.objects.get(organization=world.org, user=world.users[role])


def legacy_admin_key(world: OrgWorld, creator: User) -> str:
    """An admin-scoped key made by `creator` before the scope was restricted to managers."""
    secret = keys.generate_secret()
    ApiKey.objects.create(
        organization=world.org,
        project=default_project(world.org),
        name="minted before the fix",
        prefix=keys.display_prefix(secret),
        digest=keys.secret_digest(secret),
        scopes=["admin", "inference"],
        created_by=creator,
    )
    return secret


def expected_creation(role: Role, scope: Scope) -> str:
    if not role_allows(role, Perm.KEYS_CREATE):
        return "no-permission"
    return "created" if scope in key_scopes_allowed(role) else "scope-refused"


def test_the_scope_table() -> None:
    assert {r: key_scopes_allowed(r) for r in Role} == {
        Role.OWNER: frozenset(Scope),
        Role.ADMIN: frozenset(Scope),
        Role.DEVELOPER: frozenset({Scope.INFERENCE, Scope.READ_USAGE}),
        Role.BILLING: frozenset(),
        Role.VIEWER: frozenset(),
    }
    # min(ADMIN, creator's role): never above an admin, never above the creator.
    assert {r: admin_key_role(r) for r in Role} == {
        Role.OWNER: Role.ADMIN,
        Role.ADMIN: Role.ADMIN,
        Role.DEVELOPER: Role.DEVELOPER,
        Role.BILLING: None,
        Role.VIEWER: Role.VIEWER,
    }
    assert admin_key_role(None) is None


# --- creating keys: every role, every scope, console and management API -------------------


@pytest.mark.parametrize("role", ROLES)
def test_console_offers_only_the_scopes_the_role_may_grant(world: OrgWorld, role: Role) -> None:
    response = world.client_for(role).get(org_url("console-keys", world.org.id))
    assert response.status_code == (200 if role_allows(role, Perm.KEYS_VIEW) else 403)
    page = response.content.decode()
    if not role_allows(role, Perm.KEYS_CREATE):
        assert 'name="scopes"' not in page
        return
    offered = [value for value, _ in response.context["form"].fields["scopes"].choices]
    assert offered == [s.value for s in Scope if s in key_scopes_allowed(role)]
    assert ('name="scopes" value="admin"' in page) == (role in MANAGES)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("role", ROLES)
def test_console_creation_by_role_and_scope(world: OrgWorld, role: Role, scope: Scope) -> None:
    before = ApiKey.objects.count()
    response = world.client_for(role).post(
        org_url("console-keys", world.org.id),
        {
            "name": "matrix",
            "project": default_project(world.org).id,
            "scopes": [scope.value],
            "expiry": "30",
        },
    )
    outcome = expected_creation(role, scope)
    if outcome == "created":
        assert response.status_code == 201, response.content
        key = ApiKey.objects.get(name="matrix")
        assert key.scopes == [scope.value]
        assert key.created_by == world.users[role]
        return
    # Not offered: the form refuses the choice; no permission at all: the 403 page.
    assert response.status_code == (403 if outcome == "no-permission" else 400)
    assert ApiKey.objects.count() == before


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("role", ROLES)
def test_api_creation_by_role_and_scope(world: OrgWorld, role: Role, scope: Scope) -> None:
    before = ApiKey.objects.count()
    project = default_project(world.org)
    response = api(
        world.client_for(role),
        "post",
        org_path(world, f"/projects/{project.id}/api-keys"),
        {"name": "matrix", "scopes": [scope.value]},
    )
    if expected_creation(role, scope) == "created":
        assert response.status_code == 201, response.content
        key = ApiKey.objects.get(id=response.json()["id"])
        assert (key.scopes, key.created_by) == ([scope.value], world.users[role])
        return
    assert response.status_code == 403, response.content
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "permission_denied")
    if expected_creation(role, scope) == "scope-refused":
        assert error["param"] == "scopes"
    assert ApiKey.objects.count() == before


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("creator", sorted(MANAGES))
def test_api_creation_by_an_admin_key(world: OrgWorld, creator: Role, scope: Scope) -> None:
    """A key's keys are its creator's: removing that person revokes them all."""
    _, secret = make_api_key(world.org, scopes=["admin"], by=world.users[creator])
    project = default_project(world.org)
    before = ApiKey.objects.count()
    response = api(
        bearer(secret),
        "post",
        org_path(world, f"/projects/{project.id}/api-keys"),
        {"name": "from a key", "scopes": [scope.value]},
    )
    if scope == Scope.ADMIN:
        assert response.status_code == 403
        assert response.json()["error"]["param"] == "scopes"
        assert ApiKey.objects.count() == before
        return
    assert response.status_code == 201, response.content
    assert ApiKey.objects.get(id=response.json()["id"]).created_by == world.users[creator]


def test_the_system_cannot_create_an_admin_key_nobody_vouches_for(world: OrgWorld) -> None:
    before = ApiKey.objects.count()
    with pytest.raises(PermissionDenied):
        services.api_key_create(
            principal=SYSTEM, project=default_project(world.org), name="x", scopes=["admin"]
        )
    assert ApiKey.objects.count() == before


def test_a_non_member_cannot_create_keys_through_the_service(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    stranger = other_world.users[Role.OWNER]
    with pytest.raises(PermissionDenied):
        services.api_key_create(
            principal=Principal(user=stranger),
            project=default_project(world.org),
            name="x",
            scopes=["inference"],
        )
    assert not ApiKey.objects.filter(name="x").exists()


# --- what an admin key can do: min(ADMIN, its creator's current role) ----------------------

# One operation per permission an admin key's role may or may not have.
KEY_OPS: list[tuple[str, str, dict[str, Any] | None, Perm, int]] = [
    ("get", "", None, Perm.ORG_VIEW, 200),
    ("patch", "", {"name": "Renamed"}, Perm.ORG_UPDATE, 200),
    ("post", "/projects", {"name": "New"}, Perm.PROJECTS_MANAGE, 201),
    ("get", "/audit-log", None, Perm.AUDIT_VIEW, 200),
    ("get", "/billing/balance", None, Perm.BILLING_VIEW, 200),
    ("put", "/billing/budgets", {"budgets": [{"monthly_amount": "5"}]}, Perm.BILLING_MANAGE, 200),
]


@pytest.mark.parametrize("op", KEY_OPS, ids=lambda op: f"{op[0]} {op[3]}")
@pytest.mark.parametrize("creator", ROLES)
def test_admin_key_acts_with_min_of_admin_and_its_creators_role(
    world: OrgWorld, creator: Role, op: tuple[str, str, dict[str, Any] | None, Perm, int]
) -> None:
    """Keys made before the restriction too: a developer's admin key acts as a developer."""
    method, suffix, body, perm, ok = op
    secret = legacy_admin_key(world, world.users[creator])
    response = api(bearer(secret), method, org_path(world, suffix), body)
    acting = admin_key_role(creator)
    if acting is None:
        assert response.status_code == 401  # a billing member's key holds no role at all
    elif role_allows(acting, perm):
        assert response.status_code == ok, response.content
    else:
        assert response.status_code == 403, response.content
        assert response.json()["error"]["code"] == "permission_denied"


def test_admin_key_follows_its_creators_role_as_it_changes(world: OrgWorld) -> None:
    """Checked on every call, even where the role changed without the service (no narrowing)."""
    admin = membership(world, Role.ADMIN)
    secret = legacy_admin_key(world, admin.user)
    rename = ("patch", org_path(world), {"name": "By key"})
    assert api(bearer(secret), *rename).status_code == 200
    Membership.objects.filter(id=admin.id).update(role=Role.DEVELOPER)
    assert api(bearer(secret), *rename).status_code == 403
    Membership.objects.filter(id=admin.id).delete()
    assert api(bearer(secret), "get", org_path(world)).status_code == 401


def test_admin_key_without_a_creator_has_no_power(world: OrgWorld) -> None:
    secret = legacy_admin_key(world, world.users[Role.OWNER])
    ApiKey.objects.filter(digest=keys.secret_digest(secret)).update(created_by=None)
    assert api(bearer(secret), "get", org_path(world)).status_code == 401


# --- people management: a signed-in person only --------------------------------------------


def people_ops(world: OrgWorld) -> list[tuple[str, str, dict[str, Any] | None]]:
    target = membership(world, Role.VIEWER)
    return [
        ("post", org_path(world, "/members"), {"email": "new@example.com", "role": "admin"}),
        ("patch", org_path(world, f"/members/{target.id}"), {"role": "admin"}),
        ("delete", org_path(world, f"/members/{target.id}"), None),
    ]


@pytest.mark.parametrize("which", ["invite", "change role", "remove"])
@pytest.mark.parametrize("creator", sorted(MANAGES))
def test_people_management_refuses_any_key(world: OrgWorld, creator: Role, which: str) -> None:
    _, secret = make_api_key(world.org, scopes=["admin"], by=world.users[creator])
    op = people_ops(world)[["invite", "change role", "remove"].index(which)]
    members = sorted(Membership.objects.values_list("id", "role"))
    audited = AuditLog.objects.count()
    response = api(bearer(secret), *op)
    assert response.status_code == 403
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "permission_denied")
    assert "signed-in person" in error["message"]
    assert sorted(Membership.objects.values_list("id", "role")) == members
    assert AuditLog.objects.count() == audited
    assert mail.outbox == []


@pytest.mark.parametrize("which", ["change role", "remove"])
def test_the_services_refuse_a_key_too(world: OrgWorld, which: str) -> None:
    target = membership(world, Role.VIEWER)
    principal = Principal(api_key=world.admin_key)
    with pytest.raises(PermissionDenied):
        if which == "remove":
            services.member_remove(principal=principal, membership=target)
        else:
            services.member_change_role(principal=principal, membership=target, role=Role.ADMIN)
    target.refresh_from_db()
    assert target.role == Role.VIEWER


def test_attack_developer_mints_an_admin_key_and_promotes_itself(world: OrgWorld) -> None:
    """The reported sequence, step by step: every step is refused and nothing changes."""
    developer = world.users[Role.DEVELOPER]
    me = membership(world, Role.DEVELOPER)
    client = world.client_for(Role.DEVELOPER)
    project = default_project(world.org)
    keys_before = ApiKey.objects.count()

    # 1. Mint an admin key: the console does not offer it, and refuses it when posted...
    console = client.post(
        org_url("console-keys", world.org.id),
        {"name": "escalate", "project": project.id, "scopes": ["admin"], "expiry": "30"},
    )
    assert console.status_code == 400
    # ...and so does the management API.
    minted = api(
        client,
        "post",
        org_path(world, f"/projects/{project.id}/api-keys"),
        {"name": "escalate", "scopes": ["admin", "inference"]},
    )
    assert minted.status_code == 403
    assert ApiKey.objects.count() == keys_before

    # 2. A key minted before the fix acts only as a developer, and no key manages people.
    secret = legacy_admin_key(world, developer)
    promote = api(bearer(secret), "patch", org_path(world, f"/members/{me.id}"), {"role": "admin"})
    invite = api(
        bearer(secret), "post", org_path(world, "/members"), {"email": "ally@evil.example"}
    )
    assert [promote.status_code, invite.status_code] == [403, 403]
    # 3. Nor can the developer's own session do it.
    assert (
        api(client, "patch", org_path(world, f"/members/{me.id}"), {"role": "admin"}).status_code
        == 403
    )

    me.refresh_from_db()
    assert me.role == Role.DEVELOPER
    assert not User.objects.filter(email="ally@evil.example").exists()
    assert not AuditLog.objects.filter(action__startswith="member.").exists()
    assert mail.outbox == []


def test_an_admins_session_still_manages_people(world: OrgWorld) -> None:
    target = membership(world, Role.VIEWER)
    client = world.client_for(Role.ADMIN)
    changed = api(client, "patch", org_path(world, f"/members/{target.id}"), {"role": "developer"})
    assert changed.status_code == 200
    assert api(client, "delete", org_path(world, f"/members/{target.id}")).status_code == 204


# --- removal and demotion: the member's keys are revoked or narrowed ------------------------


def keys_of(user: User, world: OrgWorld, **data: Any) -> dict[str, ApiKey]:
    found = ApiKey.objects.filter(organization=world.org, created_by=user)
    return {k.name: k for k in found.filter(**data)}


def make_keys(world: OrgWorld, role: Role) -> dict[str, ApiKey]:
    user = world.users[role]
    made = {}
    for name, scopes in {
        "admin+inference": ["admin", "inference"],
        "admin": ["admin"],
        "inference": ["inference"],
        "usage": ["read-usage", "inference"],
    }.items():
        if set(scopes) <= key_scopes_allowed(role):
            made[name], _ = services.api_key_create(
                principal=Principal(user=user),
                project=default_project(world.org),
                name=name,
                scopes=scopes,
            )
    return made


def test_removal_revokes_every_key_the_member_created(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    admin = world.users[Role.ADMIN]
    made = make_keys(world, Role.ADMIN)
    # A key made by the admin's key is the admin's key too.
    _, admin_secret = services.api_key_create(
        principal=Principal(user=admin),
        project=default_project(world.org),
        name="manager",
        scopes=["admin"],
    )
    created = api(
        bearer(admin_secret),
        "post",
        org_path(world, f"/projects/{default_project(world.org).id}/api-keys"),
        {"name": "child"},
    )
    assert created.status_code == 201
    others = make_keys(world, Role.DEVELOPER)

    with django_capture_on_commit_callbacks(execute=True):
        services.member_remove(
            principal=Principal(user=world.users[Role.OWNER]),
            membership=membership(world, Role.ADMIN),
        )

    assert set(keys_of(admin, world, revoked_at__isnull=False)) == {*made, "manager", "child"}
    assert keys_of(admin, world, revoked_at__isnull=True) == {}
    assert all(k.revoked_at is None for k in keys_of(world.users[Role.DEVELOPER], world).values())
    assert set(others) == set(keys_of(world.users[Role.DEVELOPER], world))
    revoked = AuditLog.objects.filter(action="api_key.revoked", metadata__because="member.removed")
    assert revoked.count() == len(made) + 2
    assert api(bearer(admin_secret), "get", org_path(world)).status_code == 401


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # name -> scopes afterwards; None: revoked
        (
            Role.ADMIN,
            Role.DEVELOPER,
            {
                "admin+inference": ["inference"],
                "admin": None,
                "inference": ["inference"],
                "usage": ["inference", "read-usage"],
            },
        ),
        (
            Role.OWNER,
            Role.ADMIN,
            {
                "admin+inference": ["admin", "inference"],
                "admin": ["admin"],
                "inference": ["inference"],
                "usage": ["inference", "read-usage"],
            },
        ),
        (Role.DEVELOPER, Role.VIEWER, {"inference": None, "usage": None}),
        (Role.DEVELOPER, Role.BILLING, {"inference": None, "usage": None}),
        (
            Role.DEVELOPER,
            Role.ADMIN,
            {"inference": ["inference"], "usage": ["inference", "read-usage"]},
        ),
    ],
    ids=lambda v: str(v) if isinstance(v, Role) else "",
)
def test_role_change_narrows_the_members_keys(
    world: OrgWorld, old: Role, new: Role, expected: dict[str, list[str] | None]
) -> None:
    actor = world.users[Role.OWNER]
    if old == Role.OWNER:
        actor = add_member(world.org, Role.OWNER)  # the organization keeps an owner
    made = make_keys(world, old)
    assert set(made) == set(expected)
    services.member_change_role(
        principal=Principal(user=actor), membership=membership(world, old), role=new
    )
    after = {}
    for name, key in made.items():
        key.refresh_from_db()
        after[name] = None if key.revoked_at is not None else key.scopes
    assert after == expected
