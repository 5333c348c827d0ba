"""An organization's share of a pool's task slots (gateway/pool_share.py), on real Redis."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from django.test import override_settings

from billing.provisioned import Entitlement, endpoint_key
from core.redis import get_redis
from gateway import pool_share
from gateway.errors import OpenAIError
from workers import contract

POOL = "sharepool"


def register(node: str, slots: int, queues: tuple[str, ...] = ()) -> None:
    """A live node of the pool with `slots` task slots, as a worker's heartbeat writes it."""
    client = get_redis()
    client.zadd(contract.pool_live_key(POOL), {node: time.time()})
    info = {"node": node, "total_slots": slots, "queues": list(queues)}
    client.set(contract.worker_info_key(node), json.dumps(info))


@pytest.fixture(autouse=True)
def clean() -> None:
    client = get_redis()
    client.delete(contract.pool_live_key(POOL))
    for key in client.scan_iter(f"mantle:pool-share:{POOL}:*"):
        client.delete(key)
    client.delete(pool_share.pool_key(POOL))
    pool_share._pools.clear()


@override_settings(MANTLE_FAIR_POOL_ORG_SHARE=0.5, MANTLE_FAIR_POOL_WAIT_S=0.3)
def test_an_organization_holds_at_most_its_share_and_waits_for_its_own_requests() -> None:
    register("node-a", 4)
    register("node-b", 4)  # 8 slots: 4 for one organization

    async def scenario() -> None:
        deadline = time.time() + 60
        keys = [await pool_share.take(POOL, "org-a", f"r{i}", deadline) for i in range(4)]
        assert all(keys)
        # Another organization is not held back by the first one's four.
        assert await pool_share.take(POOL, "org-b", "b0", deadline)
        # The fifth of org-a waits; one of its own ending lets it in.
        waiting = asyncio.create_task(pool_share.take(POOL, "org-a", "r4", deadline))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await pool_share.give_back(keys[0], "r0")
        assert await asyncio.wait_for(waiting, 1)
        # And with none ending within MANTLE_FAIR_POOL_WAIT_S: a 429 naming the share.
        with pytest.raises(OpenAIError) as refused:
            await pool_share.take(POOL, "org-a", "r5", deadline)
        assert refused.value.status == 429
        assert "MANTLE_FAIR_POOL_ORG_SHARE" in refused.value.message
        assert refused.value.headers["retry-after"] == "1"

    asyncio.run(scenario())


@override_settings(MANTLE_FAIR_POOL_ORG_SHARE=0.5, MANTLE_FAIR_POOL_WAIT_S=0.1)
def test_a_place_past_its_deadline_is_free_again_without_a_give_back() -> None:
    """A gateway that died never gives its places back: they end with their lease, at the
    latest their deadline."""
    register("node-a", 2)

    async def scenario() -> None:
        assert await pool_share.take(POOL, "org-a", "gone", time.time() + 0.5)
        with pytest.raises(OpenAIError):
            await pool_share.take(POOL, "org-a", "next", time.time() + 60)
        await asyncio.sleep(0.6)
        assert await pool_share.take(POOL, "org-a", "after", time.time() + 60)

    asyncio.run(scenario())


@override_settings(
    MANTLE_FAIR_POOL_ORG_SHARE=0.5, MANTLE_FAIR_POOL_WAIT_S=0.1, MANTLE_INFLIGHT_LEASE_S=0.6
)
def test_a_dead_gateways_places_end_within_a_lease_and_a_live_one_keeps_its_own() -> None:
    """A place is a lease its gateway renews while the request runs (gateway/leases.py): a
    gateway that died (its loop gone: nothing renews) frees its organization's share within
    a lease, not at the requests' deadlines (minutes); a live gateway keeps its places."""
    register("node-a", 2)  # one place for an organization

    async def dead_gateway() -> None:
        assert await pool_share.take(POOL, "org-a", "gone", time.time() + 600)

    asyncio.run(dead_gateway())

    async def after_it() -> None:
        with pytest.raises(OpenAIError):
            await pool_share.take(POOL, "org-a", "next", time.time() + 600)
        await asyncio.sleep(0.7)
        key = await pool_share.take(POOL, "org-a", "live", time.time() + 600)
        assert key
        await asyncio.sleep(2.0)  # three leases and more: renewed every 0.2 s
        with pytest.raises(OpenAIError):
            await pool_share.take(POOL, "org-a", "other", time.time() + 600)
        await pool_share.give_back(key, "live")
        assert await pool_share.take(POOL, "org-a", "last", time.time() + 600)

    asyncio.run(after_it())


@override_settings(MANTLE_FAIR_POOL_ORG_SHARE=1.0, MANTLE_POOL_BACKLOG_FACTOR=0)
def test_a_share_of_one_is_off() -> None:
    register("node-a", 1)

    async def scenario() -> None:
        for i in range(5):
            assert await pool_share.take(POOL, "org-a", f"r{i}", time.time() + 60) == ""

    asyncio.run(scenario())


def test_priority_goes_to_the_priority_queue_once_every_node_consumes_it() -> None:
    both = (contract.inference_queue(POOL), contract.priority_queue(POOL))
    register("node-a", 4, both)
    register("node-b", 4, both[:1])  # a node of an earlier release
    default = contract.inference_queue(POOL)

    async def queue(service_class: str) -> str:
        pool_share._pools.clear()
        return await pool_share.queue_for(POOL, default, service_class)

    assert asyncio.run(queue("priority")) == default  # node-b would never take it
    register("node-b", 4, both)
    assert asyncio.run(queue("priority")) == contract.priority_queue(POOL)
    assert asyncio.run(queue("provisioned")) == contract.priority_queue(POOL)
    for other in ("online", "flex", "batch"):
        assert asyncio.run(queue(other)) == default


@override_settings(
    MANTLE_FAIR_POOL_ORG_SHARE=1.0, MANTLE_POOL_BACKLOG_FACTOR=2.0, MANTLE_FAIR_POOL_WAIT_S=0.1
)
def test_a_surge_backlog_sheds_flex_at_once_holds_default_and_lets_priority_past() -> None:
    """4 slots: flex runs only while fewer than 4 are in flight, the default tier up to 8,
    priority up to 12; organizations do not matter here (their share is off)."""
    register("node-a", 4)

    async def scenario() -> None:
        deadline = time.time() + 60
        for i in range(4):
            assert await pool_share.take(POOL, f"org-{i}", f"d{i}", deadline, "online")
        with pytest.raises(OpenAIError) as flex:
            await pool_share.take(POOL, "org-x", "f0", deadline, "flex")
        assert (flex.value.status, flex.value.code) == (429, "resource_unavailable")
        assert flex.value.headers["retry-after"] == "30"
        for i in range(4, 8):
            assert await pool_share.take(POOL, f"org-{i}", f"d{i}", deadline, "online")
        with pytest.raises(OpenAIError) as default:
            await pool_share.take(POOL, "org-x", "d8", deadline, "online")
        assert (default.value.status, default.value.code) == (503, "server_overloaded")
        assert "MANTLE_POOL_BACKLOG_FACTOR" in default.value.message
        for i in range(4):
            assert await pool_share.take(POOL, "org-p", f"p{i}", deadline, "priority")
        with pytest.raises(OpenAIError):
            await pool_share.take(POOL, "org-p", "p4", deadline, "priority")
        # One ending lets the next default request in.
        key = pool_share.share_key(POOL, "org-0") + "\n" + pool_share.pool_key(POOL)
        await pool_share.give_back(key, "d0")
        await pool_share.give_back(key.replace("org-0", "org-1"), "d1")
        await pool_share.give_back(key.replace("org-0", "org-2"), "d2")
        await pool_share.give_back(key.replace("org-0", "org-3"), "d3")
        await pool_share.give_back(key.replace("org-0", "org-4"), "d4")
        assert await pool_share.take(POOL, "org-x", "d9", deadline, "online")

    asyncio.run(scenario())


@override_settings(
    MANTLE_FAIR_POOL_ORG_SHARE=1.0, MANTLE_POOL_BACKLOG_FACTOR=1.0, MANTLE_FAIR_POOL_WAIT_S=5
)
def test_a_surges_excess_is_refused_at_once_past_the_waiting_room() -> None:
    """At most the pool's slots (8 at least) wait in one gateway process; the rest of a
    surge is refused at once rather than kept polling Redis."""
    register("node-a", 2)

    async def scenario() -> None:
        deadline = time.time() + 60
        held = [await pool_share.take(POOL, f"org-{i}", f"r{i}", deadline) for i in range(2)]
        assert all(held)  # the pool's bound (1 x 2 slots) is full
        waiters = [
            asyncio.create_task(pool_share.take(POOL, f"org-w{i}", f"w{i}", deadline))
            for i in range(pool_share.MIN_WAITERS)
        ]
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waiters)
        started = time.monotonic()
        with pytest.raises(OpenAIError) as shed:
            await pool_share.take(POOL, "org-late", "late", deadline)
        assert time.monotonic() - started < 1.0  # at once, not after the 5 s wait
        assert shed.value.status == 503
        assert "already wait" in shed.value.message
        # A priority request has a waiting room of its own (and a larger bound).
        urgent = await pool_share.take(POOL, "org-p", "p1", deadline, "priority")
        assert urgent
        # A place given back lets a waiter in; the others keep waiting.
        await pool_share.give_back(urgent, "p1")
        await pool_share.give_back(held[0], "r0")
        done, _ = await asyncio.wait(waiters, timeout=2, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert pool_share._waiters.get((POOL, False), 0) == 0  # every waiter left the room

    asyncio.run(scenario())


@override_settings(
    MANTLE_FAIR_POOL_ORG_SHARE=1.0,
    MANTLE_POOL_BACKLOG_FACTOR=1.0,
    MANTLE_POOL_PRIORITY_RESERVE=0.1,
    MANTLE_FAIR_POOL_WAIT_S=0.1,
)
def test_the_default_and_flex_tiers_leave_the_priority_reserve_free() -> None:
    """20 slots, a tenth kept for priority: the default tier and flex stop at 18 in flight,
    so the next priority request finds a task slot free at once."""
    register("node-a", 20)

    async def scenario() -> None:
        deadline = time.time() + 60
        for i in range(18):
            assert await pool_share.take(POOL, f"org-{i}", f"d{i}", deadline, "online")
        with pytest.raises(OpenAIError) as default:
            await pool_share.take(POOL, "org-x", "d18", deadline, "online")
        assert default.value.status == 503
        with pytest.raises(OpenAIError) as flex:
            await pool_share.take(POOL, "org-x", "f0", deadline, "flex")
        assert flex.value.code == "resource_unavailable"
        for i in range(2):
            assert await pool_share.take(POOL, "org-p", f"p{i}", deadline, "priority")

    asyncio.run(scenario())


def test_small_pools_keep_no_reserve_and_the_default_bound_is_their_slots() -> None:
    assert pool_share.pool_bound(4, "online") == 4  # 0.1 of 4 rounds down to none
    assert pool_share.pool_bound(64, "online") == 58
    assert pool_share.pool_bound(64, "flex") == 58
    assert pool_share.pool_bound(64, "priority") == 128


@override_settings(
    MANTLE_FAIR_POOL_ORG_SHARE=1.0, MANTLE_POOL_BACKLOG_FACTOR=1.0, MANTLE_FAIR_POOL_WAIT_S=5
)
def test_a_surges_refusals_are_decided_before_the_prompt_only_where_take_would_refuse() -> None:
    """`shed` (run before a prompt is rendered and tokenized) refuses exactly what `take`
    refuses at its first look: flex with no idle slot, the default tier past the pool's
    bound with the waiting room full (unless the organization has provisioned units);
    never priority, and never while there is room."""
    register("node-a", 2)
    client = get_redis()

    async def scenario() -> None:
        deadline = time.time() + 60
        # An idle pool: nothing is refused.
        for tier in ("flex", "online", "priority"):
            await pool_share.shed(POOL, "ep", "org-x", tier)
        held = [await pool_share.take(POOL, f"org-{i}", f"r{i}", deadline) for i in range(2)]
        assert all(held)  # the bound for flex (2 slots) and the default tier (1 x 2)
        with pytest.raises(OpenAIError) as flex:
            await pool_share.shed(POOL, "ep", "org-x", "flex")
        assert (flex.value.status, flex.value.code) == (429, "resource_unavailable")
        # The default tier still may wait: the waiting room has places.
        await pool_share.shed(POOL, "ep", "org-x", "online")
        waiters = [
            asyncio.create_task(pool_share.take(POOL, f"org-w{i}", f"w{i}", deadline))
            for i in range(pool_share.MIN_WAITERS)
        ]
        await asyncio.sleep(0.1)
        with pytest.raises(OpenAIError) as default:
            await pool_share.shed(POOL, "ep", "org-x", "online")
        assert (default.value.status, default.value.code) == (503, "server_overloaded")
        assert "already wait" in default.value.message
        await pool_share.shed(POOL, "ep", "org-x", "priority")  # passes the backlog
        # An organization with units on the endpoint goes on to admission (they may serve it).
        client.hset(
            endpoint_key("ep"),
            "org-u",
            Entitlement(1, "spill", time.time() - 10, 0).encode(),
        )
        try:
            await pool_share.shed(POOL, "ep", "org-u", "online")
        finally:
            client.delete(endpoint_key("ep"))
        # A place given back: room again.
        await pool_share.give_back(held[0], "r0")
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await pool_share.shed(POOL, "ep", "org-x", "online")

    asyncio.run(scenario())
