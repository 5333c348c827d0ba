"""What the gateway takes from Redis cannot be forged by whoever can merely write Redis.

Cached key identities and endpoint specs are sealed with an HMAC under MANTLE_IDENTITY_KEY
(core/integrity.py), which workers and the drain do not hold: a record planted by such a
process (or altered, moved to another key, or expired) is a cache miss, and the gateway
answers from the database.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from accounts import keys
from accounts.principal import SYSTEM
from catalog import specs
from catalog.models import Endpoint
from catalog.selectors import endpoint_spec_load
from catalog.services import endpoint_create
from core import integrity
from core.redis import get_redis
from tests.factories import (
    UNSERVED_ENCODER,
    OrganizationFactory,
    make_api_key,
    make_model_version,
    make_pool,
)
from tests.support.stack import Process, Stack

pytestmark = pytest.mark.django_db(transaction=True)

MADE_UP = "sk-" + "f" * 48  # a well-formed secret that no key has


def forged_identity(digest: str, organization_id: str) -> str:
    """What a worker with write access to Redis would plant: a usable key of any org."""
    return keys.KeyIdentity(
        digest=digest,
        key_id="key_forged",
        organization_id=organization_id,
        project_id="prj_forged",
        scopes=("inference", "admin"),
        expires_at=None,
        revoked=False,
        organization_active=True,
        rpm_limit=10**9,
        tpm_limit=10**9,
        project_rpm_limit=10**9,
        project_tpm_limit=10**9,
    ).to_json()


def private_endpoint(org: Any) -> Endpoint:
    version = make_model_version(org, UNSERVED_ENCODER, model_name=f"r-{org.id}")
    return endpoint_create(
        principal=SYSTEM,
        org=org,
        name="ranker",
        model_version_id=version.id,
        pool=make_pool("cpu").name,
    )


def made_public(endpoint: Endpoint) -> str:
    """The endpoint's spec with its owner removed: any organization could call it."""
    spec = endpoint_spec_load(endpoint.id)
    assert spec is not None and spec.organization_id == endpoint.organization_id
    return json.dumps({**dataclasses.asdict(spec), "organization_id": None})


# --- the seal itself ------------------------------------------------------------------------


def test_a_sealed_record_verifies_only_unchanged_at_its_own_key(settings: Any) -> None:
    record = integrity.seal("mantle:apikey:a", {"organization_id": "org_a"}, ttl_s=60)
    assert integrity.unseal("mantle:apikey:a", record) == {"organization_id": "org_a"}
    # moved to another key
    assert integrity.unseal("mantle:apikey:b", record) is None
    # altered
    body = json.loads(record)
    body["organization_id"] = "org_b"
    assert integrity.unseal("mantle:apikey:a", json.dumps(body)) is None
    # never sealed, or not JSON
    assert integrity.unseal("mantle:apikey:a", '{"organization_id": "org_a"}') is None
    assert integrity.unseal("mantle:apikey:a", "garbage") is None
    # expired
    assert integrity.unseal("mantle:apikey:a", record, now=time.time() + 120) is None
    # sealed under another key
    settings.MANTLE_IDENTITY_KEY = "a guess at the key"
    assert integrity.unseal("mantle:apikey:a", record) is None


def test_a_verified_record_remembered_still_expires_and_changes_miss() -> None:
    record = integrity.seal("mantle:apikey:c", {"n": 1}, ttl_s=60)
    assert integrity.unseal_as("mantle:apikey:c", record, dict) == {"n": 1}
    assert integrity.unseal_as("mantle:apikey:c", record, dict) == {"n": 1}  # remembered
    assert integrity.unseal_as("mantle:apikey:c", record, dict, now=time.time() + 120) is None
    altered = record.replace('"n": 1', '"n": 2')
    assert altered != record
    assert integrity.unseal_as("mantle:apikey:c", altered, dict) is None
    assert integrity.unseal_as("mantle:apikey:d", record, dict) is None


def test_nothing_is_sealed_without_the_key(settings: Any) -> None:
    from django.core.exceptions import ImproperlyConfigured

    settings.MANTLE_IDENTITY_KEY = ""
    with pytest.raises(ImproperlyConfigured, match="MANTLE_IDENTITY_KEY"):
        integrity.seal("mantle:apikey:a", {}, ttl_s=60)


def test_the_write_through_is_sealed_and_readable() -> None:
    key, _ = make_api_key(OrganizationFactory())
    raw = get_redis().get(keys.cache_key(key.digest))
    assert isinstance(raw, str)
    identity = keys.identity_from_cache(key.digest, raw)
    assert identity is not None and identity.key_id == key.id
    # a sealed record copied to another digest's key is refused there
    assert keys.identity_from_cache("0" * 64, raw) is None


# --- against a real gateway process -----------------------------------------------------------


@pytest.fixture
def gateway() -> Iterator[tuple[Process, str]]:
    stack = Stack.for_tests()
    try:
        yield stack.gateway("gateway-redis-trust")
    finally:
        stack.stop_all()


def _call(url: str, secret: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}"}
    if body is None:
        return httpx.get(f"{url}{path}", headers=headers, timeout=30)
    return httpx.post(f"{url}{path}", headers=headers, json=body, timeout=30)


@pytest.mark.e2e
def test_a_gateway_refuses_an_identity_planted_in_redis(gateway: tuple[Process, str]) -> None:
    proc, url = gateway
    victim = OrganizationFactory()
    _, real = make_api_key(OrganizationFactory())
    digest = keys.secret_digest(MADE_UP)
    get_redis().set(keys.cache_key(digest), forged_identity(digest, victim.id), ex=600)

    refused = _call(url, MADE_UP, "/v1/models")
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "invalid_api_key"
    # The forged record is gone: what the database says (no such key) took its place.
    assert get_redis().get(keys.cache_key(digest)) == "unknown"
    assert "failed its integrity check" in proc.tail(200)

    # Sealed under a guessed key: the same.
    guess = json.loads(forged_identity(digest, victim.id))
    guess["_exp"] = int(time.time()) + 600
    guess["_mac"] = "0" * 64
    get_redis().set(keys.cache_key(digest), json.dumps(guess), ex=600)
    assert _call(url, MADE_UP, "/v1/models").status_code == 401

    # A real key, through the same gateway, still works.
    assert _call(url, real, "/v1/models").status_code == 200


@pytest.mark.e2e
def test_a_gateway_refuses_an_endpoint_spec_altered_in_redis(
    gateway: tuple[Process, str],
) -> None:
    _, url = gateway
    owner, other = OrganizationFactory(), OrganizationFactory()
    endpoint = private_endpoint(owner)
    _, secret = make_api_key(other)
    get_redis().set(specs.endpoint_key(endpoint.id), made_public(endpoint), ex=600)

    response = _call(
        url, secret, "/v1/embeddings", {"model": endpoint.id, "input": ["the lighthouse"]}
    )
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
    # The altered spec was replaced by the one the control plane seals.
    cached = get_redis().get(specs.endpoint_key(endpoint.id))
    assert isinstance(cached, str)
    restored = specs.spec_from_cache(specs.endpoint_key(endpoint.id), cached)
    assert restored is not None and restored.organization_id == owner.id
