"""Provisioned throughput at admission (gateway/provisioned.py, gateway/pool_share.py), on
real Redis: a default-tier request within an organization's units runs as `provisioned`;
past them it spills to pay-as-you-go or is refused, as the commitment says; the units'
slots are kept from everyone else's share of the pool."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.test import override_settings

from billing.provisioned import Entitlement, endpoint_key, inflight_key
from billing.provisioned import pool_key as provisioned_pool_key
from core.redis import get_redis
from gateway import pool_share, provisioned
from gateway.errors import OpenAIError
from tests.gateway.test_pool_share import POOL, register
from workers import contract

ENDPOINT = "ep_provtest"
PROVISIONED = contract.ServiceClass.PROVISIONED.value
ONLINE = contract.ServiceClass.ONLINE.value


def wipe() -> None:
    client = get_redis()
    for key in (
        endpoint_key(ENDPOINT),
        provisioned_pool_key(POOL),
        inflight_key(ENDPOINT, "org-p"),
        contract.pool_live_key(POOL),
        pool_share.pool_key(POOL),
    ):
        client.delete(key)
    for key in client.scan_iter(f"mantle:pool-share:{POOL}:*"):
        client.delete(key)
    pool_share._pools.clear()


@pytest.fixture(autouse=True)
def clean() -> None:
    wipe()


def commit(units: int, overflow: str = "spill", *, starts_in: float = -60.0) -> None:
    entitlement = Entitlement(units, overflow, time.time() + starts_in, 0.0)
    client = get_redis()
    client.hset(endpoint_key(ENDPOINT), "org-p", entitlement.encode())
    client.hset(provisioned_pool_key(POOL), f"{ENDPOINT}:org-p", entitlement.encode())


def take(request_id: str, tier: str | None = None, org: str = "org-p") -> tuple[str, str]:
    return asyncio.run(provisioned.take(ENDPOINT, org, request_id, time.time() + 60, tier))


def test_requests_within_the_units_run_provisioned_and_past_them_spill() -> None:
    commit(2)

    first, second = take("r1"), take("r2", "auto")
    third = take("r3", "scale")

    assert (first[0], second[0]) == (PROVISIONED, PROVISIONED)
    assert third == (ONLINE, "")  # both units busy: pay-as-you-go
    # A unit given back (the settle) is free again.
    asyncio.run(pool_share.give_back(first[1], "r1"))
    assert take("r4")[0] == PROVISIONED


def test_past_the_units_a_refusing_commitment_answers_429() -> None:
    commit(1, "refuse")
    assert take("r1")[0] == PROVISIONED

    with pytest.raises(OpenAIError) as refused:
        take("r2")

    assert refused.value.status == 429
    assert "provisioned throughput unit is all in use" in refused.value.message
    assert refused.value.headers["retry-after"] == "1"
    # Asking for the default tier explicitly is pay-as-you-go, never refused by the units.
    assert take("r3", "default") == (ONLINE, "")


def test_default_priority_and_flex_requests_never_use_the_units() -> None:
    commit(5)
    for tier in ("default", "priority", "flex"):
        assert take(f"r-{tier}", tier) == (ONLINE, "")
    assert get_redis().zcard(inflight_key(ENDPOINT, "org-p")) == 0


def test_no_commitment_a_future_one_or_another_organization_uses_nothing() -> None:
    assert take("r1") == (ONLINE, "")
    commit(3, starts_in=3600)  # sold from the next hour
    assert take("r2") == (ONLINE, "")
    commit(3)
    assert take("r3", org="org-other") == (ONLINE, "")


def test_a_place_past_its_deadline_frees_its_unit() -> None:
    commit(1, "refuse")
    assert asyncio.run(provisioned.take(ENDPOINT, "org-p", "gone", time.time() + 0.2, None))[0]
    time.sleep(0.3)
    assert take("next")[0] == PROVISIONED


@override_settings(
    MANTLE_FAIR_POOL_ORG_SHARE=0.75, MANTLE_FAIR_POOL_WAIT_S=0.1, MANTLE_POOL_BACKLOG_FACTOR=0
)
def test_the_units_slots_are_kept_from_everyone_elses_share_of_the_pool() -> None:
    register("node-a", 8)  # 8 slots; 4 reserved by units: others share the other 4

    async def others(count: int) -> int:
        deadline = time.time() + 60
        taken = 0
        for i in range(count):
            try:
                await pool_share.take(POOL, "org-flood", f"f{i}", deadline)
                taken += 1
            except OpenAIError:
                break
        return taken

    assert asyncio.run(others(8)) == 6  # no units: 0.75 of 8
    wipe()
    register("node-a", 8)
    commit(4)
    assert asyncio.run(others(8)) == 3  # 0.75 of the 4 left to pay-as-you-go
    # The provisioned requests themselves are not held by the pool's share.
    assert asyncio.run(pool_share.take(POOL, "org-p", "p1", time.time() + 60, PROVISIONED)) == ""


@override_settings(MANTLE_INFLIGHT_LEASE_S=0.6)
def test_a_dead_gateways_units_are_free_again_within_a_lease_a_live_ones_are_kept() -> None:
    """The organization paid for its units: a gateway that died holding them (its event
    loop gone, nothing renews) must not keep them for the requests' whole deadline. A place
    is a lease its gateway renews while the request runs (gateway/leases.py)."""
    commit(1, "refuse")
    assert take("dead")[0] == PROVISIONED  # its loop ends with the call: a dead gateway
    with pytest.raises(OpenAIError):
        take("next")  # the unit is held...
    time.sleep(0.7)
    assert take("after")[0] == PROVISIONED  # ...until its lease ended, not for 60 s

    async def live() -> bool:
        far = time.time() + 600
        kind, key = await provisioned.take(ENDPOINT, "org-p", "live", far, None)
        assert kind == PROVISIONED
        await asyncio.sleep(2.0)  # three leases and more: renewed every 0.2 s
        score = get_redis().zscore(key, "live")
        await pool_share.give_back(key, "live")
        return score is not None and score > time.time()

    get_redis().delete(inflight_key(ENDPOINT, "org-p"))
    assert asyncio.run(live())
    assert get_redis().zcard(inflight_key(ENDPOINT, "org-p")) == 0
