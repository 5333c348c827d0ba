"""The management API: every endpoint's happy path, role checks, and other-organization 404s."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core import mail
from django.test import Client

from accounts.models import (
    ApiKey,
    AuditLog,
    Invitation,
    Membership,
    Organization,
    Project,
    User,
)
from accounts.permissions import Role
from tests.conftest import OrgWorld
from tests.factories import default_project

pytestmark = pytest.mark.django_db


def call(client: Client, method: str, path: str, body: Any = None) -> Any:
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs = {"data": json.dumps(body), "content_type": "application/json"}
    return getattr(client, method)(f"/api/v1{path}", **kwargs)


def org_path(world: OrgWorld, suffix: str = "") -> str:
    return f"/organizations/{world.org.id}{suffix}"


# --- authentication --------------------------------------------------------------------


def test_anonymous_gets_401_with_openai_shaped_error() -> None:
    response = Client().get("/api/v1/organizations")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_inference_only_key_is_not_a_management_credential(world: OrgWorld) -> None:
    from tests.factories import make_api_key

    _, secret = make_api_key(world.org, scopes=["inference"])
    client = Client(headers={"authorization": f"Bearer {secret}"})
    assert client.get("/api/v1/organizations").status_code == 401


def test_me_lists_my_organizations(world: OrgWorld, other_world: OrgWorld) -> None:
    body = call(world.client_for(Role.VIEWER), "get", "/me").json()
    assert [o["id"] for o in body["organizations"]] == [world.org.id]


# --- organizations ------------------------------------------------------------------------


def test_create_organization_makes_caller_owner_with_default_project(world: OrgWorld) -> None:
    user = world.users[Role.DEVELOPER]
    response = call(world.client_for(Role.DEVELOPER), "post", "/organizations", {"name": "New Co"})
    assert response.status_code == 201
    org = Organization.objects.get(id=response.json()["id"])
    assert Membership.objects.get(organization=org, user=user).role == Role.OWNER
    assert Project.objects.filter(organization=org, is_default=True).count() == 1


def test_api_key_cannot_create_organizations(world: OrgWorld) -> None:
    before = Organization.objects.count()
    response = call(world.key_client(), "post", "/organizations", {"name": "Shadow"})
    assert response.status_code == 403
    assert Organization.objects.count() == before


def test_list_organizations_by_key_is_only_its_own(world: OrgWorld, other_world: OrgWorld) -> None:
    body = call(world.key_client(), "get", "/organizations").json()
    assert [o["id"] for o in body] == [world.org.id]


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 200),
        (Role.ADMIN, 200),
        (Role.DEVELOPER, 403),
        (Role.BILLING, 403),
        (Role.VIEWER, 403),
    ],
)
def test_rename_organization_by_role(world: OrgWorld, role: Role, status: int) -> None:
    response = call(world.client_for(role), "patch", org_path(world), {"name": "Renamed"})
    assert response.status_code == status
    world.org.refresh_from_db()
    assert (world.org.name == "Renamed") == (status == 200)


@pytest.mark.parametrize("role", list(Role))
def test_every_role_can_view_its_organization(world: OrgWorld, role: Role) -> None:
    response = call(world.client_for(role), "get", org_path(world))
    assert response.status_code == 200
    assert response.json()["id"] == world.org.id


# --- members ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 201),
        (Role.ADMIN, 201),
        (Role.DEVELOPER, 403),
        (Role.BILLING, 403),
        (Role.VIEWER, 403),
    ],
)
def test_invite_member_by_role(
    world: OrgWorld, role: Role, status: int, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = call(
            world.client_for(role),
            "post",
            org_path(world, "/members"),
            {"email": "New.Person@Example.com", "role": "developer"},
        )
    assert response.status_code == status
    # Nobody joins until the emailed link is accepted (tests/accounts/test_invitations.py).
    assert not Membership.objects.filter(
        organization=world.org, user__email="new.person@example.com"
    ).exists()
    invited = Invitation.objects.filter(organization=world.org, email="new.person@example.com")
    assert invited.exists() == (status == 201)
    assert len(mail.outbox) == (1 if status == 201 else 0)
    if status == 201:
        body = response.json()
        assert (body["email"], body["role"], body["status"]) == (
            "new.person@example.com",
            "developer",
            "pending",
        )
        assert body["id"] == invited.get().id
        # The link's secret goes to the mailbox only, never to the inviter.
        link = mail.outbox[0].body.split("/console/invitations/")[1].split("/")[0]
        assert link not in response.content.decode()


def test_invite_existing_member_conflicts(world: OrgWorld) -> None:
    email = world.users[Role.VIEWER].email
    response = call(
        world.client_for(Role.OWNER),
        "post",
        org_path(world, "/members"),
        {"email": email, "role": "admin"},
    )
    assert response.status_code == 409
    assert response.json()["error"]["param"] == "email"


def test_admin_cannot_grant_owner(world: OrgWorld) -> None:
    response = call(
        world.client_for(Role.ADMIN),
        "post",
        org_path(world, "/members"),
        {"email": "x@example.com", "role": "owner"},
    )
    assert response.status_code == 403
    assert not User.objects.filter(email="x@example.com").exists()
    assert not Invitation.objects.exists()


def test_list_members(world: OrgWorld) -> None:
    body = call(world.client_for(Role.VIEWER), "get", org_path(world, "/members")).json()
    assert sorted(m["role"] for m in body) == sorted(r.value for r in Role)


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 200),
        (Role.ADMIN, 200),
        (Role.DEVELOPER, 403),
        (Role.BILLING, 403),
        (Role.VIEWER, 403),
    ],
)
def test_change_role_by_role(world: OrgWorld, role: Role, status: int) -> None:
    target = Membership.objects.get(organization=world.org, user=world.users[Role.VIEWER])
    response = call(
        world.client_for(role),
        "patch",
        org_path(world, f"/members/{target.id}"),
        {"role": "billing"},
    )
    assert response.status_code == status
    target.refresh_from_db()
    assert target.role == ("billing" if status == 200 else "viewer")
    audited = AuditLog.objects.filter(action="member.role_changed", target_id=target.id).exists()
    assert audited == (status == 200)


def test_last_owner_cannot_be_demoted_or_removed(world: OrgWorld) -> None:
    owner = Membership.objects.get(organization=world.org, role=Role.OWNER)
    client = world.client_for(Role.OWNER)
    assert (
        call(
            client, "patch", org_path(world, f"/members/{owner.id}"), {"role": "admin"}
        ).status_code
        == 409
    )
    assert call(client, "delete", org_path(world, f"/members/{owner.id}")).status_code == 409
    owner.refresh_from_db()
    assert owner.role == Role.OWNER


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 204),
        (Role.ADMIN, 204),
        (Role.DEVELOPER, 403),
        (Role.BILLING, 403),
        (Role.VIEWER, 403),
    ],
)
def test_remove_member_by_role(world: OrgWorld, role: Role, status: int) -> None:
    target_user = world.users[Role.VIEWER] if role != Role.VIEWER else world.users[Role.BILLING]
    target = Membership.objects.get(organization=world.org, user=target_user)
    response = call(world.client_for(role), "delete", org_path(world, f"/members/{target.id}"))
    assert response.status_code == status
    assert Membership.objects.filter(id=target.id).exists() == (status != 204)


# --- projects -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 201),
        (Role.ADMIN, 201),
        (Role.DEVELOPER, 201),
        (Role.BILLING, 403),
        (Role.VIEWER, 403),
    ],
)
def test_create_project_by_role(world: OrgWorld, role: Role, status: int) -> None:
    response = call(
        world.client_for(role), "post", org_path(world, "/projects"), {"name": "Search"}
    )
    assert response.status_code == status
    assert Project.objects.filter(organization=world.org, name="Search").exists() == (status == 201)


def test_project_name_unique_per_organization(world: OrgWorld, other_world: OrgWorld) -> None:
    client = world.client_for(Role.OWNER)
    assert call(client, "post", org_path(world, "/projects"), {"name": "A"}).status_code == 201
    dup = call(client, "post", org_path(world, "/projects"), {"name": "A"})
    assert dup.status_code == 409
    assert dup.json()["error"]["param"] == "name"
    other = other_world.client_for(Role.OWNER)
    assert call(other, "post", org_path(other_world, "/projects"), {"name": "A"}).status_code == 201


def test_get_list_and_rename_project(world: OrgWorld) -> None:
    client = world.client_for(Role.DEVELOPER)
    project = default_project(world.org)
    assert call(client, "get", org_path(world, "/projects")).json()[0]["id"] == project.id
    got = call(client, "get", org_path(world, f"/projects/{project.id}")).json()
    assert got["is_default"] is True
    renamed = call(client, "patch", org_path(world, f"/projects/{project.id}"), {"name": "Main"})
    assert renamed.json()["name"] == "Main"


# --- API keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 201),
        (Role.ADMIN, 201),
        (Role.DEVELOPER, 201),
        (Role.BILLING, 403),
        (Role.VIEWER, 403),
    ],
)
def test_create_key_by_role(world: OrgWorld, role: Role, status: int) -> None:
    project = default_project(world.org)
    before = ApiKey.objects.count()
    response = call(
        world.client_for(role),
        "post",
        org_path(world, f"/projects/{project.id}/api-keys"),
        {"name": "ci", "scopes": ["inference"]},
    )
    assert response.status_code == status
    assert ApiKey.objects.count() == before + (1 if status == 201 else 0)


def test_create_key_returns_secret_once_and_list_never(world: OrgWorld) -> None:
    client = world.client_for(Role.DEVELOPER)
    project = default_project(world.org)
    created = call(
        client,
        "post",
        org_path(world, f"/projects/{project.id}/api-keys"),
        {"name": "ci", "scopes": ["inference", "read-usage"]},
    ).json()
    secret = created["secret"]
    assert secret.startswith("sk-") and len(secret) == 51
    assert created["prefix"] == secret[:12]
    listed = call(client, "get", org_path(world, "/api-keys")).content.decode()
    got = call(client, "get", org_path(world, f"/api-keys/{created['id']}")).content.decode()
    for text in (listed, got):
        assert secret not in text
        assert secret[12:] not in text
        assert '"secret"' not in text


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 200),
        (Role.ADMIN, 200),
        (Role.DEVELOPER, 200),
        (Role.BILLING, 403),
        (Role.VIEWER, 403),
    ],
)
def test_revoke_key_by_role(world: OrgWorld, role: Role, status: int) -> None:
    from tests.factories import make_api_key

    key, _ = make_api_key(world.org)
    response = call(world.client_for(role), "post", org_path(world, f"/api-keys/{key.id}/revoke"))
    assert response.status_code == status
    key.refresh_from_db()
    assert (key.revoked_at is not None) == (status == 200)
    if status == 200:
        assert response.json()["status"] == "revoked"


def test_admin_key_manages_its_own_organization(world: OrgWorld) -> None:
    client = world.key_client()
    project = default_project(world.org)
    created = call(
        client,
        "post",
        org_path(world, f"/projects/{project.id}/api-keys"),
        {"name": "from-key", "scopes": ["inference"]},
    )
    assert created.status_code == 201
    entry = AuditLog.objects.get(action="api_key.created", target_id=created.json()["id"])
    assert entry.actor_api_key_id == world.admin_key.id


def test_admin_key_cannot_mint_admin_keys(world: OrgWorld) -> None:
    project = default_project(world.org)
    response = call(
        world.key_client(),
        "post",
        org_path(world, f"/projects/{project.id}/api-keys"),
        {"name": "escalate", "scopes": ["admin"]},
    )
    assert response.status_code == 403
    assert not ApiKey.objects.filter(name="escalate").exists()


def test_list_keys_filtered_by_project(world: OrgWorld) -> None:
    client = world.client_for(Role.OWNER)
    other = call(client, "post", org_path(world, "/projects"), {"name": "P2"}).json()
    call(
        client,
        "post",
        org_path(world, f"/projects/{other['id']}/api-keys"),
        {"name": "p2 key", "scopes": ["inference"]},
    )
    listed = call(client, "get", org_path(world, f"/api-keys?project_id={other['id']}")).json()
    assert [k["name"] for k in listed] == ["p2 key"]


def test_audit_log_records_key_lifecycle_with_ip(world: OrgWorld) -> None:
    client = world.client_for(Role.OWNER)
    project = default_project(world.org)
    key = call(
        client,
        "post",
        org_path(world, f"/projects/{project.id}/api-keys"),
        {"name": "audited", "scopes": ["inference"]},
    ).json()
    call(client, "post", org_path(world, f"/api-keys/{key['id']}/revoke"))
    entries = call(client, "get", org_path(world, "/audit-log")).json()["data"]
    actions = [(e["action"], e["target_id"]) for e in entries[:2]]
    assert actions == [("api_key.revoked", key["id"]), ("api_key.created", key["id"])]
    assert entries[0]["actor"] == world.users[Role.OWNER].email
    assert entries[0]["ip_address"] == "127.0.0.1"


def test_viewer_cannot_read_audit_log(world: OrgWorld) -> None:
    assert (
        call(world.client_for(Role.VIEWER), "get", org_path(world, "/audit-log")).status_code == 403
    )


# --- another organization's ids are 404, for every endpoint that takes one -----------------


def _other_ids(other: OrgWorld) -> dict[str, str]:
    return {
        "org": other.org.id,
        "member": Membership.objects.filter(organization=other.org).first().id,  # type: ignore[union-attr]
        "project": default_project(other.org).id,
        "key": other.admin_key.id,
    }


CROSS_ORG_CALLS = [
    ("get", "/organizations/{org}", None),
    ("patch", "/organizations/{org}", {"name": "x"}),
    ("get", "/organizations/{org}/members", None),
    ("post", "/organizations/{org}/members", {"email": "z@example.com"}),
    ("patch", "/organizations/{mine}/members/{member}", {"role": "viewer"}),
    ("delete", "/organizations/{mine}/members/{member}", None),
    ("get", "/organizations/{org}/projects", None),
    ("post", "/organizations/{org}/projects", {"name": "x"}),
    ("get", "/organizations/{mine}/projects/{project}", None),
    ("patch", "/organizations/{mine}/projects/{project}", {"name": "x"}),
    ("post", "/organizations/{mine}/projects/{project}/api-keys", {"name": "x"}),
    ("get", "/organizations/{org}/api-keys", None),
    ("get", "/organizations/{mine}/api-keys/{key}", None),
    ("post", "/organizations/{mine}/api-keys/{key}/revoke", None),
    ("get", "/organizations/{org}/audit-log", None),
]


@pytest.mark.parametrize(("method", "template", "body"), CROSS_ORG_CALLS)
@pytest.mark.parametrize("as_key", [False, True], ids=["session", "admin-key"])
def test_other_organizations_ids_are_404(
    world: OrgWorld, other_world: OrgWorld, method: str, template: str, body: Any, as_key: bool
) -> None:
    ids = _other_ids(other_world)
    path = template.format(mine=world.org.id, **ids)
    client = world.key_client() if as_key else world.client_for(Role.OWNER)
    before = (
        Membership.objects.count(),
        Project.objects.count(),
        ApiKey.objects.count(),
        set(ApiKey.objects.filter(revoked_at__isnull=False).values_list("id", flat=True)),
    )
    response = call(client, method, path, body)
    assert response.status_code == 404, response.content
    assert response.json()["error"]["type"] == "invalid_request_error"
    after = (
        Membership.objects.count(),
        Project.objects.count(),
        ApiKey.objects.count(),
        set(ApiKey.objects.filter(revoked_at__isnull=False).values_list("id", flat=True)),
    )
    assert after == before
    other_world.org.refresh_from_db()
    assert other_world.org.name == "Globex"
