"""An organization's share of a shared endpoint, and key and project limits kept within it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
import redis.asyncio as aredis
from django.conf import settings

from accounts import keys
from accounts.permissions import Role
from accounts.principal import SYSTEM
from accounts.services import api_key_identity_load
from billing import wallet_keys
from catalog.selectors import endpoint_spec_load
from catalog.services import endpoint_create
from catalog.specs import EndpointSpec
from gateway.limits import Admission, Limits, RateLimiter
from gateway.pipeline import limits_for
from tests.conftest import OrgWorld
from tests.factories import UNSERVED_ENCODER, make_api_key, make_model_version, make_pool
from workers.contract import pool_live_key

POOL = "org-share-test"
FREE_PRICE = {"in": 0, "out": 0, "req": 0, "ms": 0}
BIG = 10**9


def shared(org: str, key: str, project: str, *, share_rpm: int) -> Limits:
    """A request of `org` through `key` on the shared endpoint ep-pub."""
    return Limits(
        key_id=key,
        project_id=project,
        endpoint_id="ep-pub",
        key_rpm=BIG,
        key_tpm=BIG,
        project_rpm=BIG,
        project_tpm=BIG,
        endpoint_rpm=BIG,
        endpoint_tpm=BIG,
        organization_id=org,
        organization_rpm=share_rpm,
        organization_tpm=BIG,
    )


async def admit_all(requests: list[Limits]) -> list[Admission]:
    client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    await client.zadd(pool_live_key(POOL), {"node-a": time.time()})
    for org in {r.organization_id for r in requests}:
        await client.hset(wallet_keys.price_key(org, "m"), mapping=FREE_PRICE)
    limiter = RateLimiter(client)
    out = []
    for lim in requests:
        out.append(
            await limiter.admit(
                lim,
                pool=POOL,
                organization_id=lim.organization_id,
                model_name="m",
                prompt_tokens=1,
                max_tokens=0,
            )
        )
    await client.aclose()
    return out


def test_many_keys_of_one_organization_share_its_part_of_a_shared_endpoint() -> None:
    # The attack: one organization spreads its traffic over many keys and projects.
    greedy = [shared("org_greedy", f"key_{n}", f"proj_{n % 2}", share_rpm=3) for n in range(6)]
    other = shared("org_other", "key_o", "proj_o", share_rpm=3)

    results = asyncio.run(admit_all([*greedy, other]))

    assert [r.allowed for r in results[:6]] == [True, True, True, False, False, False]
    assert {(r.refused_scope, r.refused_kind) for r in results[3:6]} == {
        ("organization", "requests")
    }
    assert results[6].allowed  # another organization still has its own share


def test_no_share_applies_on_an_organizations_own_endpoint() -> None:
    own = [
        dataclasses.replace(shared("org_own", f"k{n}", "p", share_rpm=3), organization_id="")
        for n in range(5)
    ]

    results = asyncio.run(admit_all(own))

    assert all(r.allowed for r in results)


@pytest.fixture
def served_spec(world: OrgWorld) -> EndpointSpec:
    version = make_model_version(world.org, UNSERVED_ENCODER, model_name=f"s-{world.org.id}")
    endpoint = endpoint_create(
        principal=SYSTEM,
        org=world.org,
        name="share",
        model_version_id=version.id,
        pool=make_pool("cpu").name,
    )
    spec = endpoint_spec_load(endpoint.id)
    assert spec is not None
    return spec


@pytest.mark.django_db
def test_the_gateway_gives_shared_endpoints_the_organizations_share(
    world: OrgWorld, served_spec: EndpointSpec, settings: Any
) -> None:
    settings.MANTLE_ORG_ENDPOINT_RPM = 700
    settings.MANTLE_ORG_ENDPOINT_TPM = 70_000
    _, secret = make_api_key(world.org)
    identity = api_key_identity_load(keys.secret_digest(secret))
    assert identity is not None
    public = dataclasses.replace(served_spec, organization_id=None)

    on_public = limits_for(identity, public)
    on_own = limits_for(identity, served_spec)

    assert (on_public.organization_id, on_public.caps()[6:]) == (world.org.id, [700, 70_000])
    assert on_own.caps()[6:] == [0, 0]
    # Key and project limits (defaults 10k/50k rpm) are clamped to the share.
    assert on_public.caps()[:4] == [700, 70_000, 700, 70_000]


@pytest.mark.django_db
@pytest.mark.parametrize(("field", "value"), [("rpm_limit", 50_001), ("tpm_limit", 50_000_001)])
def test_a_key_limit_above_the_organizations_is_refused(
    world: OrgWorld, field: str, value: int
) -> None:
    owner = world.client_for(Role.OWNER)
    project = world.org.projects.get(is_default=True)
    url = f"/api/v1/organizations/{world.org.id}/projects/{project.id}/api-keys"
    before = world.org.api_keys.count()

    response = owner.post(
        url, {"name": "big", "scopes": ["inference"], field: value}, content_type="application/json"
    )

    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == field
    assert world.org.api_keys.count() == before
    ok = owner.post(
        url,
        {"name": "ok", "scopes": ["inference"], field: value - 1},
        content_type="application/json",
    )
    assert ok.status_code == 201, ok.content
