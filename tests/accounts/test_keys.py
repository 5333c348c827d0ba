"""API key secrets: never stored, never logged; revocation and expiry take effect at once."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from accounts import keys, services
from accounts.models import ApiKey
from accounts.permissions import Role
from accounts.principal import SYSTEM
from core.logs import redact
from core.redis import get_redis
from tests.conftest import OrgWorld
from tests.factories import default_project, make_api_key

pytestmark = pytest.mark.django_db


def test_secret_is_not_in_any_column(world: OrgWorld) -> None:
    key, secret = make_api_key(world.org)
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM accounts_apikey WHERE id = %s", [key.id])
        row = cursor.fetchone()
    assert row is not None
    flat = " ".join(str(v) for v in row)
    assert secret not in flat
    assert secret[12:] not in flat  # the part after the shown prefix appears nowhere
    assert key.digest == keys.secret_digest(secret)
    assert len(key.digest) == 64


def test_digest_depends_on_the_pepper(settings: Any) -> None:
    secret = keys.generate_secret()
    first = keys.secret_digest(secret)
    settings.API_KEY_PEPPER = "another pepper"
    assert keys.secret_digest(secret) != first


def test_secrets_are_unique_and_long() -> None:
    secrets = {keys.generate_secret() for _ in range(1000)}
    assert len(secrets) == 1000
    assert all(keys.looks_like_secret(s) for s in secrets)


def test_secret_never_logged_on_create_and_use(
    world: OrgWorld, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    project = default_project(world.org)
    response = world.client_for(Role.OWNER).post(
        f"/api/v1/organizations/{world.org.id}/projects/{project.id}/api-keys",
        data={"name": "logged?", "scopes": ["admin"]},
        content_type="application/json",
    )
    secret = response.json()["secret"]
    Client(headers={"authorization": f"Bearer {secret}"}).get("/api/v1/organizations")
    Client(headers={"authorization": f"Bearer {secret}x"}).get("/api/v1/organizations")
    logging.getLogger("mantle.test").warning("client sent Authorization: Bearer %s", secret)
    out, err = capfd.readouterr()
    assert secret[12:] not in caplog.text + out + err
    assert "client sent Authorization: Bearer [REDACTED]" in caplog.text


@pytest.mark.parametrize(
    "text",
    ["sk-" + "a" * 48, "Bearer abc.def", "sk_live_51HxYz", "whsec_test_abcdef"],
)
def test_redact_hides_secrets(text: str) -> None:
    assert redact(f"value={text} end").count("[REDACTED]") == 1


def test_revoked_key_refused_at_once(world: OrgWorld) -> None:
    client = world.key_client()
    assert client.get("/api/v1/organizations").status_code == 200
    services.api_key_revoke(principal=SYSTEM, key=world.admin_key)
    assert client.get("/api/v1/organizations").status_code == 401
    cached = keys.KeyIdentity.from_json(get_redis().get(keys.cache_key(world.admin_key.digest)))  # type: ignore[arg-type]
    assert cached.revoked is True
    assert cached.usable() is False


def test_expired_key_refused(world: OrgWorld) -> None:
    key, secret = make_api_key(
        world.org, scopes=["admin"], expires_at=timezone.now() + timedelta(seconds=1)
    )
    client = Client(headers={"authorization": f"Bearer {secret}"})
    assert client.get("/api/v1/organizations").status_code == 200
    ApiKey.objects.filter(id=key.id).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert client.get("/api/v1/organizations").status_code == 401


def test_creating_a_key_warms_the_gateway_cache(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        key, secret = make_api_key(world.org, scopes=["inference"])
    cached = keys.KeyIdentity.from_json(get_redis().get(keys.cache_key(keys.secret_digest(secret))))  # type: ignore[arg-type]
    assert (cached.key_id, cached.organization_id, cached.scopes) == (
        key.id,
        world.org.id,
        ("inference",),
    )
    assert cached.usable()


def test_last_used_flushed_from_redis_in_one_batch(world: OrgWorld) -> None:
    key, _ = make_api_key(world.org)
    now = time.time()
    get_redis().hset(keys.LAST_USED_HASH, mapping={key.id: str(now), "key_gone": str(now)})
    assert services.api_keys_flush_last_used() == 1
    key.refresh_from_db()
    assert key.last_used_at is not None
    assert abs(key.last_used_at.timestamp() - now) < 1e-3
    assert services.api_keys_flush_last_used() == 0
