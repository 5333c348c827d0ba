"""API key pages: create (secret shown once), list, revoke with confirmation; other orgs 404."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from accounts import keys
from accounts.models import ApiKey, AuditLog
from accounts.permissions import Role
from core.redis import get_redis
from tests.conftest import OrgWorld
from tests.console.support import org_url
from tests.factories import default_project, make_api_key

pytestmark = pytest.mark.django_db


def _create(world: OrgWorld, role: Role = Role.DEVELOPER, **data: object) -> object:
    form = {
        "name": "backend",
        "project": default_project(world.org).id,
        "scopes": ["inference", "read-usage"],
        "expiry": "30",
        **data,
    }
    return world.client_for(role).post(org_url("console-keys", world.org.id), form)


def test_create_shows_the_secret_once_and_stores_only_its_digest(world: OrgWorld) -> None:
    response = _create(world)
    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    secret = response.context["secret"]
    key = ApiKey.objects.get(name="backend")
    assert secret in response.content.decode()
    assert keys.looks_like_secret(secret)
    assert key.digest == keys.secret_digest(secret)
    assert key.prefix == secret[:12]
    assert key.scopes == ["inference", "read-usage"]
    assert key.created_by == world.users[Role.DEVELOPER]
    assert timedelta(days=29, hours=23) < key.expires_at - timezone.now() <= timedelta(days=30)
    listing = world.client_for(Role.DEVELOPER).get(org_url("console-keys", world.org.id))
    page = listing.content.decode()
    assert secret not in page
    assert f"{key.prefix}…" in page
    assert world.users[Role.DEVELOPER].email in page
    assert AuditLog.objects.filter(action="api_key.created", target_id=key.id).count() == 1


def test_create_with_a_custom_expiry_date_lasts_through_that_day(world: OrgWorld) -> None:
    day = (timezone.now() + timedelta(days=3)).date()
    response = _create(world, expiry="custom", expires_on=day.isoformat())
    assert response.status_code == 201
    key = ApiKey.objects.get(name="backend")
    assert key.expires_at == datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": ""}, "This field is required."),
        ({"scopes": []}, "This field is required."),
        ({"scopes": ["root"]}, "Select a valid choice. root is not one of the available choices."),
        ({"expiry": "custom"}, "choose the expiry date"),
        ({"expiry": "custom", "expires_on": "2001-01-01"}, "expires_at must be in the future"),
        ({"rpm_limit": "0"}, "Ensure this value is greater than or equal to 1."),
    ],
)
def test_bad_input_is_refused_and_no_key_is_created(
    world: OrgWorld, data: dict[str, object], message: str
) -> None:
    before = ApiKey.objects.count()
    response = _create(world, **data)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert ApiKey.objects.count() == before


def test_another_organizations_project_cannot_receive_a_key(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    before = ApiKey.objects.count()
    response = _create(world, project=default_project(other_world.org).id)
    assert response.status_code == 400
    assert ApiKey.objects.count() == before


def test_revoke_asks_for_confirmation_then_revokes(world: OrgWorld) -> None:
    key, _ = make_api_key(world.org)
    client = world.client_for(Role.DEVELOPER)
    url = org_url("console-key-revoke", world.org.id, key_id=key.id)
    confirm = client.get(url)
    assert confirm.status_code == 200
    assert "stops working at once" in confirm.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is None
    response = client.post(url)
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None
    cached = get_redis().get(keys.cache_key(key.digest))
    assert keys.KeyIdentity.from_json(cached).revoked  # every gateway refuses it at once


def test_revoke_through_htmx_returns_the_updated_row(world: OrgWorld) -> None:
    key, _ = make_api_key(world.org)
    response = world.client_for(Role.ADMIN).post(
        org_url("console-key-revoke", world.org.id, key_id=key.id), HTTP_HX_REQUEST="true"
    )
    body = response.content.decode()
    assert response.status_code == 200
    assert body.strip().startswith(f'<tr id="key-{key.id}" class="revoked">')
    assert "revoked" in body and "<html" not in body


def test_another_organizations_key_is_404_and_stays_active(
    world: OrgWorld, other_world: OrgWorld
) -> None:
    client = world.client_for(Role.OWNER)
    url = org_url("console-key-revoke", world.org.id, key_id=other_world.admin_key.id)
    assert client.get(url).status_code == 404
    assert client.post(url).status_code == 404
    other_world.admin_key.refresh_from_db()
    assert other_world.admin_key.revoked_at is None


def test_viewer_cannot_revoke(world: OrgWorld) -> None:
    key, _ = make_api_key(world.org)
    response = world.client_for(Role.VIEWER).post(
        org_url("console-key-revoke", world.org.id, key_id=key.id)
    )
    assert response.status_code == 403
    key.refresh_from_db()
    assert key.revoked_at is None
