"""Bad input to the management API: a clear 4xx naming what is wrong, and nothing written."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client, override_settings

from accounts.models import ApiKey, AuditLog, Project
from accounts.permissions import Role
from tests.conftest import OrgWorld
from tests.factories import default_project

pytestmark = pytest.mark.django_db


def _counts() -> tuple[int, int, int]:
    return ApiKey.objects.count(), Project.objects.count(), AuditLog.objects.count()


def _post(client: Client, path: str, raw: str) -> Any:
    return client.post(f"/api/v1{path}", data=raw, content_type="application/json")


@pytest.mark.parametrize(
    ("raw", "param", "fragment"),
    [
        ('{"name": "ci", "scopes": ["inference"]', None, ""),  # malformed JSON
        ('{"name": 42, "scopes": ["inference"]}', "name", "string"),
        ('{"name": "ci", "scopes": "inference"}', "scopes", "list"),
        ('{"name": "ci", "scopes": ["root"]}', "scopes.0", "inference"),
        ('{"name": "ci", "scopes": []}', "scopes", "at least 1"),
        ('{"name": "ci", "scopez": ["inference"]}', "scopez", "unknown field"),
        ('{"name": "", "scopes": ["inference"]}', "name", "at least 1"),
        ('{"name": "ci", "expires_at": "yesterday"}', "expires_at", "datetime"),
        ('{"name": "ci", "expires_at": "2001-01-01T00:00:00Z"}', "expires_at", "future"),
        ("[1, 2]", None, ""),
    ],
)
def test_create_key_bad_input(world: OrgWorld, raw: str, param: str | None, fragment: str) -> None:
    before = _counts()
    project = default_project(world.org)
    response = _post(
        world.client_for(Role.OWNER),
        f"/organizations/{world.org.id}/projects/{project.id}/api-keys",
        raw,
    )
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
        assert param in error["message"]
    assert fragment.lower() in error["message"].lower()
    assert _counts() == before


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('{"email": "not-an-email", "role": "admin"}', "email"),
        ('{"email": "a@example.com", "role": "superuser"}', "role"),
        ('{"email": "a@example.com", "role": "admin", "extra": 1}', "extra"),
        ("{}", "email"),
    ],
)
def test_invite_bad_input(world: OrgWorld, raw: str, param: str) -> None:
    before = _counts()
    response = _post(world.client_for(Role.OWNER), f"/organizations/{world.org.id}/members", raw)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert _counts() == before


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024)
def test_oversized_body_is_413_and_nothing_written(world: OrgWorld) -> None:
    before = _counts()
    raw = '{"name": "' + "x" * 5000 + '"}'
    response = _post(world.client_for(Role.OWNER), f"/organizations/{world.org.id}/projects", raw)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert _counts() == before


def test_whitespace_only_name_is_refused(world: OrgWorld) -> None:
    before = _counts()
    response = _post(
        world.client_for(Role.OWNER), f"/organizations/{world.org.id}/projects", '{"name": "   "}'
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "name"
    assert _counts() == before
