"""The gateway's cache fills never undo a change the control plane wrote through.

A gateway that misses the cache reads the database and writes what it read back to Redis.
If a revocation or a delete commits between that read and that write, the write must not
bring the old state back: fills only write keys that are absent, and a deleted endpoint
leaves a tombstone rather than an absent key.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from accounts import keys
from accounts.principal import SYSTEM
from accounts.services import api_key_identity_load, api_key_revoke
from catalog import specs
from catalog.models import Endpoint
from catalog.selectors import endpoint_spec_load
from catalog.services import endpoint_create, endpoint_delete
from core.redis import get_redis
from gateway.resolve import endpoint_cache_fill, endpoint_for
from tests.conftest import OrgWorld
from tests.factories import UNSERVED_ENCODER, make_api_key, make_model_version, make_pool


def make_endpoint(world: OrgWorld) -> Endpoint:
    version = make_model_version(world.org, UNSERVED_ENCODER, model_name=f"r-{world.org.id}")
    return endpoint_create(
        principal=SYSTEM,
        org=world.org,
        name="ranker",
        model_version_id=version.id,
        pool=make_pool("cpu").name,
    )


def test_a_fill_racing_a_delete_does_not_bring_the_endpoint_back(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        endpoint = make_endpoint(world)
    read_before_delete = endpoint_spec_load(endpoint.id)  # a gateway's cache-miss read
    assert read_before_delete is not None
    with django_capture_on_commit_callbacks(execute=True):
        endpoint_delete(principal=SYSTEM, endpoint=endpoint)
    with asyncio.Runner() as runner:
        runner.run(endpoint_cache_fill(endpoint.id, read_before_delete))  # ...written after
        cached = get_redis().get(specs.endpoint_key(endpoint.id))
        assert cached == specs.UNKNOWN
        assert runner.run(endpoint_for(endpoint.id, cached)) is None
    assert 0 < get_redis().ttl(specs.endpoint_key(endpoint.id)) <= specs.DELETED_TTL_S


@pytest.mark.django_db(transaction=True)  # the gateway reads in its own thread and connection
@pytest.mark.keeps_redis
def test_a_fill_on_a_miss_still_caches_what_the_database_says(world: OrgWorld) -> None:
    endpoint = make_endpoint(world)
    get_redis().delete(specs.endpoint_key(endpoint.id))
    with asyncio.Runner() as runner:
        spec = runner.run(endpoint_for(endpoint.id, None))
    assert spec is not None and spec.id == endpoint.id
    assert specs.EndpointSpec.from_json(get_redis().get(specs.endpoint_key(endpoint.id))) == spec  # type: ignore[arg-type]


def test_a_fill_racing_a_revocation_does_not_make_the_key_work_again(
    world: OrgWorld, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        key, secret = make_api_key(world.org, scopes=["inference"])
    digest = keys.secret_digest(secret)
    get_redis().delete(keys.cache_key(digest))  # a cold cache: the gateway reads the database
    read_before_revoke = api_key_identity_load(digest)
    assert read_before_revoke is not None and read_before_revoke.usable()
    api_key_revoke(principal=SYSTEM, key=key)
    with asyncio.Runner() as runner:
        runner.run(keys.cache_fill_async(read_before_revoke, digest))  # ...written after
    cached = keys.KeyIdentity.from_json(get_redis().get(keys.cache_key(digest)))  # type: ignore[arg-type]
    assert cached.revoked and not cached.usable()


def test_made_up_keys_are_negatively_cached_but_never_over_a_real_one(world: OrgWorld) -> None:
    _, secret = make_api_key(world.org, scopes=["inference"])
    digest = keys.secret_digest(secret)
    identity = api_key_identity_load(digest)
    keys.cache_put(identity)  # type: ignore[arg-type]
    with asyncio.Runner() as runner:
        runner.run(keys.cache_fill_async(None, digest))  # a stale "unknown"
        runner.run(keys.cache_fill_async(None, "0" * 64))
    assert get_redis().get(keys.cache_key(digest)) != "unknown"
    assert get_redis().get(keys.cache_key("0" * 64)) == "unknown"
