"""Team and projects pages: invite, change roles, remove; create and rename projects."""

from __future__ import annotations

from typing import Any

import pytest
from django.core import mail

from accounts.models import Invitation, Membership, Project, User
from accounts.permissions import Role
from tests.conftest import OrgWorld
from tests.console.support import org_url
from tests.factories import default_project

pytestmark = pytest.mark.django_db


def _membership(world: OrgWorld, role: Role) -> Membership:
    return Membership.objects.get(organization=world.org, user=world.users[role])


def test_invite_mails_a_link_and_adds_nobody_yet(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    # Joining needs the emailed link (tests/accounts/test_invitations.py).
    with django_capture_on_commit_callbacks(execute=True):
        response = world.client_for(Role.ADMIN).post(
            org_url("console-team", world.org.id),
            {"email": "New@Example.com", "role": "developer"},
        )
    assert response.status_code == 302
    assert not Membership.objects.filter(
        organization=world.org, user__email="new@example.com"
    ).exists()
    invitation = Invitation.objects.get(organization=world.org)
    assert (invitation.email, invitation.role) == ("new@example.com", Role.DEVELOPER)
    assert mail.outbox[0].to == ["new@example.com"]
    assert "/console/invitations/" in mail.outbox[0].body


def test_inviting_a_member_twice_is_a_conflict(world: OrgWorld) -> None:
    email = world.users[Role.VIEWER].email
    response = world.client_for(Role.OWNER).post(
        org_url("console-team", world.org.id), {"email": email, "role": "admin"}
    )
    assert response.status_code == 409
    assert f"{email} is already a member" in response.content.decode()
    assert _membership(world, Role.VIEWER).role == Role.VIEWER


def test_only_owners_grant_ownership(world: OrgWorld) -> None:
    response = world.client_for(Role.ADMIN).post(
        org_url("console-team", world.org.id), {"email": "boss@example.com", "role": "owner"}
    )
    assert response.status_code == 403
    assert "only an owner can grant or revoke the owner role" in response.content.decode()
    assert not User.objects.filter(email="boss@example.com").exists()
    assert not Invitation.objects.exists()


def test_developer_cannot_invite(world: OrgWorld) -> None:
    response = world.client_for(Role.DEVELOPER).post(
        org_url("console-team", world.org.id), {"email": "x@example.com", "role": "viewer"}
    )
    assert response.status_code == 403
    assert not User.objects.filter(email="x@example.com").exists()
    assert not Invitation.objects.exists()


def test_change_role_with_and_without_htmx(world: OrgWorld) -> None:
    m = _membership(world, Role.VIEWER)
    url = org_url("console-member-role", world.org.id, membership_id=m.id)
    client = world.client_for(Role.OWNER)
    assert client.post(url, {"role": "billing"}).status_code == 302
    m.refresh_from_db()
    assert m.role == Role.BILLING
    response = client.post(url, {"role": "developer"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert response.content.decode().strip().startswith(f'<tr id="member-{m.id}">')
    m.refresh_from_db()
    assert m.role == Role.DEVELOPER


def test_the_last_owner_cannot_be_demoted(world: OrgWorld) -> None:
    m = _membership(world, Role.OWNER)
    response = world.client_for(Role.OWNER).post(
        org_url("console-member-role", world.org.id, membership_id=m.id),
        {"role": "viewer"},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 409
    assert "an organization must keep at least one owner" in response.content.decode()
    m.refresh_from_db()
    assert m.role == Role.OWNER


def test_remove_confirms_then_removes(world: OrgWorld) -> None:
    m = _membership(world, Role.DEVELOPER)
    url = org_url("console-member-remove", world.org.id, membership_id=m.id)
    client = world.client_for(Role.ADMIN)
    assert "They lose access" in client.get(url).content.decode()
    assert Membership.objects.filter(id=m.id).exists()
    assert client.post(url, HTTP_HX_REQUEST="true").content == b""
    assert not Membership.objects.filter(id=m.id).exists()


@pytest.mark.parametrize("name", ["console-member-role", "console-member-remove"])
def test_another_organizations_membership_is_404(
    world: OrgWorld, other_world: OrgWorld, name: str
) -> None:
    theirs = _membership(other_world, Role.VIEWER)
    response = world.client_for(Role.OWNER).post(
        org_url(name, world.org.id, membership_id=theirs.id), {"role": "owner"}
    )
    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.role == Role.VIEWER


def test_projects_create_and_rename(world: OrgWorld) -> None:
    client = world.client_for(Role.DEVELOPER)
    response = client.post(org_url("console-projects", world.org.id), {"name": "Web"})
    assert response.status_code == 302
    project = Project.objects.get(organization=world.org, name="Web")
    url = org_url("console-project-rename", world.org.id, project_id=project.id)
    assert client.post(url, {"name": "Web app"}).status_code == 302
    project.refresh_from_db()
    assert project.name == "Web app"


def test_duplicate_project_name_is_a_conflict(world: OrgWorld) -> None:
    response = world.client_for(Role.OWNER).post(
        org_url("console-projects", world.org.id), {"name": "Default project"}
    )
    assert response.status_code == 409
    assert "a project named &#x27;Default project&#x27; already exists" in response.content.decode()
    assert Project.objects.filter(organization=world.org).count() == 1


def test_viewer_cannot_create_projects(world: OrgWorld) -> None:
    response = world.client_for(Role.VIEWER).post(
        org_url("console-projects", world.org.id), {"name": "Nope"}
    )
    assert response.status_code == 403
    assert Project.objects.filter(organization=world.org).count() == 1


def test_another_organizations_project_rename_is_404(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    theirs = default_project(other_world.org)
    response = world.client_for(Role.OWNER).post(
        org_url("console-project-rename", world.org.id, project_id=theirs.id), {"name": "Mine"}
    )
    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.name == "Default project"
