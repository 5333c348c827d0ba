"""Every console page: log-in required, other organizations' ids are 404, roles are checked."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.models import ApiKey, Membership, Project
from accounts.permissions import Role
from tests.conftest import OrgWorld
from tests.console.support import logged_in, org_url
from tests.factories import default_project

pytestmark = pytest.mark.django_db

ORG_PAGES = [
    "console-quickstart",
    "console-team",
    "console-projects",
    "console-keys",
    "console-models",
    "console-endpoints",
    "console-playground",
    "console-usage",
    "console-usage-csv",
    "console-billing",
    "console-topup",
]

# (page, roles that may open it); every other role gets 403.
ALL = set(Role)
MAY_VIEW = {
    "console-quickstart": ALL,
    "console-team": ALL,
    "console-projects": ALL,
    "console-keys": ALL - {Role.BILLING},
    "console-models": ALL,
    "console-endpoints": ALL,
    "console-playground": ALL,
    "console-usage": ALL,
    "console-usage-csv": ALL,
    "console-billing": {Role.OWNER, Role.ADMIN, Role.BILLING},
    "console-topup": {Role.OWNER, Role.ADMIN, Role.BILLING},
}


@pytest.mark.parametrize("name", ORG_PAGES)
def test_anonymous_is_sent_to_log_in(world: OrgWorld, name: str) -> None:
    url = org_url(name, world.org.id)
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"] == f"/console/login/?next={url}"


@pytest.mark.parametrize("name", ORG_PAGES)
def test_another_organizations_pages_are_404(
    world: OrgWorld, other_world: OrgWorld, name: str
) -> None:
    outsider = logged_in(other_world.users[Role.OWNER])
    response = outsider.get(org_url(name, world.org.id))
    assert response.status_code == 404


@pytest.mark.parametrize("name", ORG_PAGES)
def test_unknown_organization_is_404(world: OrgWorld, name: str) -> None:
    response = logged_in(world.users[Role.OWNER]).get(org_url(name, "org_doesnotexist"))
    assert response.status_code == 404


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("name", ORG_PAGES)
def test_role_matrix(world: OrgWorld, name: str, role: Role) -> None:
    response = world.client_for(role).get(org_url(name, world.org.id))
    expected = 200 if role in MAY_VIEW[name] else 403
    assert response.status_code == expected
    if expected == 403:
        assert f"your role in {world.org.name} is {role}" in response.content.decode()


def test_viewer_cannot_create_a_key(world: OrgWorld) -> None:
    client = world.client_for(Role.VIEWER)
    page = client.get(org_url("console-keys", world.org.id)).content.decode()
    assert "Create key" not in page
    before = ApiKey.objects.count()
    response = client.post(
        org_url("console-keys", world.org.id),
        {
            "name": "sneaky",
            "project": default_project(world.org).id,
            "scopes": ["inference"],
            "expiry": "never",
        },
    )
    assert response.status_code == 403
    assert "may not do keys.create" in response.content.decode()
    assert ApiKey.objects.count() == before


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("console-keys", {"name": "k", "scopes": ["inference"], "expiry": "never"}),
        ("console-projects", {"name": "New one"}),
        ("console-team", {"email": "new@example.com", "role": "viewer"}),
        ("console-budget-save", {"monthly_amount": "10", "alert_thresholds": "50"}),
        ("console-playground-key", {}),
        ("console-topup-start", {"amount": "25.00"}),
        (
            "console-auto-recharge",
            {"auto-threshold": "1", "auto-amount": "5", "auto-daily_cap": "5"},
        ),
    ],
)
def test_posts_without_csrf_token_are_refused(world: OrgWorld, name: str, data: dict) -> None:
    client = logged_in(world.users[Role.OWNER], csrf=True)
    if name == "console-keys":
        data = {**data, "project": default_project(world.org).id}
    counts = (ApiKey.objects.count(), Project.objects.count(), Membership.objects.count())
    response = client.post(org_url(name, world.org.id), data)
    assert response.status_code == 403
    assert "CSRF" in response.content.decode()
    assert (ApiKey.objects.count(), Project.objects.count(), Membership.objects.count()) == counts


def test_a_post_with_the_csrf_token_is_accepted(world: OrgWorld) -> None:
    client = logged_in(world.users[Role.OWNER], csrf=True)
    page = client.get(org_url("console-projects", world.org.id))
    token = page.cookies["csrftoken"].value
    response = client.post(
        org_url("console-projects", world.org.id), {"name": "Mobile", "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 302
    assert Project.objects.filter(organization=world.org, name="Mobile").count() == 1


def test_home_redirects_to_the_last_organization_used(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    user = world.users[Role.DEVELOPER]
    Membership.objects.create(organization=other_world.org, user=user, role=Role.VIEWER)
    client = logged_in(user)
    assert client.get("/console/")["Location"] == org_url("console-quickstart", world.org.id)
    client.get(org_url("console-usage", other_world.org.id))
    assert client.get("/console/")["Location"] == org_url("console-quickstart", other_world.org.id)


def test_switcher_goes_to_the_same_section_and_refuses_outsiders(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    client = logged_in(world.users[Role.OWNER])
    response = client.get("/console/switch/", {"org": world.org.id, "section": "usage"})
    assert response["Location"] == org_url("console-usage", world.org.id)
    response = client.get("/console/switch/", {"org": other_world.org.id, "section": "usage"})
    assert response.status_code == 404


def test_user_without_organization_is_asked_to_create_one(db: None) -> None:
    from tests.factories import UserFactory

    client = logged_in(UserFactory())
    assert client.get("/console/")["Location"] == "/console/organizations/new/"
    response = client.post("/console/organizations/new/", {"name": "Initech"})
    assert response.status_code == 302
    membership = Membership.objects.get(user__in=[response.wsgi_request.user])
    assert (membership.organization.name, membership.role) == ("Initech", Role.OWNER)
    assert response["Location"] == org_url("console-quickstart", membership.organization_id)
