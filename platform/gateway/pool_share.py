"""Fair sharing across the workers of a pool, and a surge's backlog (docs/service_tiers.md).

One organization's burst cannot fill every task slot of a pool while others wait.

A pool's nodes take work from one broker queue in arrival order, each as many tasks as it
has task slots (`total_slots` in its heartbeat). Inside a node the engine admits fairly
(workers/engine/causal_lm.py), but a request still in the broker queue waits behind every
one sent before it: if one organization sends more than the pool's slots, everyone else's
requests queue behind its surplus. So the gateway counts each organization's requests in
flight on each pool (a Redis sorted set per pool and organization, members scored by the
end of their lease, which their gateway renews while the request runs, so a gateway that
died leaks nothing past a lease: gateway/leases.py) and lets an organization hold at
most MANTLE_FAIR_POOL_ORG_SHARE of the pool's slots. A request past it waits at the gateway,
in no queue of anyone else's, for one of its organization's own requests to end (up to
MANTLE_FAIR_POOL_WAIT_S, then a 429 that names the share); the slots it leaves free are
what other organizations' requests find when they reach the pool.

The pool's requests in flight are counted too (a second sorted set), and each tier has a
bound on them: under a surge, flex requests are refused at once when the pool has no idle
slot, default-tier requests wait at the gateway while the pool holds MANTLE_POOL_BACKLOG_FACTOR
times its slots (then a 503 with retry-after), and priority requests pass that backlog (a
factor more), so the broker queue a priority request joins is never longer than that.

Batch lines are paced by their own slots (gateway/batch_runner.py) and are not counted.
Provisioned throughput is not counted either: its units are counted per organization
(gateway/provisioned.py), and the slots they reserve are taken off what every other request
may use here (docs/provisioned.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass

from django.conf import settings

from billing.provisioned import Entitlement
from billing.provisioned import pool_key as provisioned_pool_key
from core.redis import get_async_redis
from gateway import leases
from gateway.errors import OpenAIError
from gateway.provisioned import entitlement as provisioned_entitlement
from workers import contract

logger = logging.getLogger(__name__)

SLOTS_TTL_S = 1.0  # a pool's slot count is read from heartbeats at most once a second
POLL_S = 0.02  # a waiting request's first retry; each next one waits twice as long...
MAX_POLL_S = 0.25  # ...up to this: a surge's waiters do not keep Redis busy
MIN_WAITERS = 8
# Requests waiting here in this process, per (pool, ahead of the default tier): at most the
# pool's slots (MIN_WAITERS at least) wait; more are refused at once.
_waiters: dict[tuple[str, bool], int] = {}
_AHEAD = (contract.ServiceClass.PRIORITY, contract.ServiceClass.PROVISIONED)

_TAKE = """
-- KEYS: the organization's set on the pool, the pool's set. ARGV: now, the organization's
-- cap, the pool's bound for this class (0: none), the lease's end, request id, ttl.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local bound = tonumber(ARGV[3])
if bound > 0 and redis.call('ZCARD', KEYS[2]) >= bound then return -1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 1
"""


def pool_key(pool: str) -> str:
    return f"mantle:pool-inflight:{pool}"


def share_key(pool: str, organization_id: str) -> str:
    return f"mantle:pool-share:{pool}:{organization_id}"


@dataclass
class _Pool:
    slots: int
    priority_ready: bool  # every live node consumes the pool's priority queue
    read_at: float
    reserved: int = 0  # task slots reserved by provisioned throughput units in effect


_pools: dict[str, _Pool] = {}


async def _pool(pool: str) -> _Pool:
    """The pool's live nodes as their heartbeats describe them, read at most once a second
    per process."""
    now = time.time()
    cached = _pools.get(pool)
    if cached is not None and now - cached.read_at < SLOTS_TTL_S:
        return cached
    client = get_async_redis()
    nodes = [
        str(n)
        for n in await client.zrangebyscore(
            contract.pool_live_key(pool), now - contract.HEARTBEAT_TTL_S, "+inf"
        )
    ]
    total, ready = 0, bool(nodes)
    if nodes:
        wanted = contract.priority_queue(pool)
        for raw in await client.mget([contract.worker_info_key(n) for n in nodes]):
            info = json.loads(raw) if raw else {}
            total += int(info.get("total_slots", 0) or 0)
            ready = ready and wanted in (info.get("queues") or ())
    reserved = 0
    for raw in (await client.hgetall(provisioned_pool_key(pool))).values():
        entitlement = Entitlement.decode(raw)
        if entitlement is not None and entitlement.active(now):
            reserved += entitlement.units
    found = _pools[pool] = _Pool(total, ready, now, reserved)
    return found


async def pool_slots(pool: str) -> int:
    """The task slots of the pool's live nodes (their heartbeats' `total_slots`)."""
    return (await _pool(pool)).slots


async def queue_for(pool: str, default: str, service_class: str) -> str:
    """The queue a request of `service_class` goes to: the pool's priority queue for the
    priority tier and provisioned traffic once every live node consumes it (a node of an
    earlier release does not), else `default`."""
    if service_class not in (contract.ServiceClass.PRIORITY, contract.ServiceClass.PROVISIONED):
        return default
    try:
        ready = (await _pool(pool)).priority_ready
    except Exception:  # Redis's state is admission's to report
        return default
    return contract.priority_queue(pool) if ready else default


def org_cap(slots: int) -> int:
    """The requests one organization may have in flight on a pool of `slots` task slots."""
    share = settings.MANTLE_FAIR_POOL_ORG_SHARE
    return slots * 1000 if share >= 1.0 else max(1, math.floor(slots * share))


def pool_bound(slots: int, service_class: str) -> int:
    """The online requests a pool may have in flight (on its nodes or waiting for them) for
    a request of `service_class` to be let through, 0 for no bound.

    MANTLE_POOL_PRIORITY_RESERVE of the slots (rounded down) are kept for priority and
    provisioned requests: the default tier may fill MANTLE_POOL_BACKLOG_FACTOR times the
    slots less that reserve, flex only the idle slots less it, so a priority request always
    finds a task slot free at once (a node takes messages in order, and a priority message
    behind a full node's prefetched default-tier tasks would wait for them). Priority and
    provisioned requests may fill one factor more than the slots."""
    factor = settings.MANTLE_POOL_BACKLOG_FACTOR
    if factor <= 0:
        return 0
    if service_class in (contract.ServiceClass.PRIORITY, contract.ServiceClass.PROVISIONED):
        return math.ceil(slots * (factor + 1))
    reserve = math.floor(slots * settings.MANTLE_POOL_PRIORITY_RESERVE)
    if service_class == contract.ServiceClass.FLEX:
        return max(1, slots - reserve)
    return max(1, math.ceil(slots * factor) - reserve)


async def take(
    pool: str,
    organization_id: str,
    request_id: str,
    deadline: float,
    service_class: str = contract.ServiceClass.ONLINE,
) -> str:
    """Takes a place for the request among its organization's requests in flight on the
    pool (at most its share) and among the pool's (at most the bound for its class),
    waiting up to MANTLE_FAIR_POOL_WAIT_S; returns what to give back (`give_back`), or ""
    when neither applies. A flex request finding the pool without idle slots is refused at
    once (OpenAI's 429 resource_unavailable); others that wait in vain get a 429 (their
    organization's share) or a 503 (the pool's backlog), with retry-after."""
    if service_class == contract.ServiceClass.PROVISIONED:
        # Within the organization's units (gateway/provisioned.py counts them): the slots
        # reserved for them are subtracted from everyone else's below.
        return ""
    share_on = settings.MANTLE_FAIR_POOL_ORG_SHARE < 1.0
    if not share_on and settings.MANTLE_POOL_BACKLOG_FACTOR <= 0:
        return ""
    found = await _pool(pool)
    if found.slots <= 0:
        return ""  # no live node: admission answers that (503) on its own
    # What pay-as-you-go traffic may use: the pool's slots less those provisioned units
    # reserve (at least one, so a pool sold out to units still answers with a status).
    slots = max(1, found.slots - found.reserved)
    keys = [share_key(pool, organization_id), pool_key(pool)]
    client = get_async_redis()
    give_up = time.monotonic() + settings.MANTLE_FAIR_POOL_WAIT_S
    ttl = str(int(max(60.0, deadline - time.time() + 60)))
    group = (pool, service_class in _AHEAD)
    waiting = False
    pause = POLL_S
    try:
        while True:
            cap, bound = org_cap(slots), pool_bound(slots, service_class)
            now = time.time()
            took = int(
                await client.eval(
                    _TAKE,
                    2,
                    *keys,
                    str(now),
                    str(cap),
                    str(bound),
                    str(leases.end(deadline, now)),
                    request_id,
                    ttl,
                )
            )
            if took == 1:
                leases.hold(request_id, keys, deadline)
                return "\n".join(keys)
            if took == -1 and service_class == contract.ServiceClass.FLEX:
                raise _flex_refusal(bound, slots)
            if not waiting:
                # A surge's excess is shed here, at once, rather than kept polling: at most
                # the pool's slots wait in one gateway process (per tier group).
                if _waiters.get(group, 0) >= max(MIN_WAITERS, slots):
                    raise _refusal(took, cap, bound, slots, crowded=True)
                _waiters[group] = _waiters.get(group, 0) + 1
                waiting = True
            if time.monotonic() >= give_up:
                raise _refusal(took, cap, bound, slots, crowded=False)
            await asyncio.sleep(pause)
            pause = min(MAX_POLL_S, pause * 2)
            found = await _pool(pool)
            slots = max(1, found.slots - found.reserved)
    finally:
        if waiting:
            _waiters[group] -= 1


async def shed(pool: str, endpoint_id: str, organization_id: str, service_class: str) -> None:
    """Refuses at once, before its prompt is rendered and tokenized, a request that `take`
    would refuse at its first look: under a surge the refused are most of the traffic, and
    their templates and tokenizing would take the gateway's CPU from the requests it
    serves (docs/service_tiers.md). Only two cases, each `take`'s own decision:

    - flex, when the pool has no idle slot (the 429 resource_unavailable);
    - the default tier, when the pool holds its backlog bound and this process's waiting
      room for it is full (the 503 server_overloaded), unless the organization has
      provisioned units on the endpoint (its request may run within them).

    Anything else, and anything Redis cannot answer now, goes on to admission as before."""
    flex = service_class == contract.ServiceClass.FLEX
    if not flex and service_class != contract.ServiceClass.ONLINE:
        return
    if settings.MANTLE_POOL_BACKLOG_FACTOR <= 0:
        return
    try:
        found = await _pool(pool)
        if found.slots <= 0:
            return
        slots = max(1, found.slots - found.reserved)
        group = (pool, False)
        if not flex and _waiters.get(group, 0) < max(MIN_WAITERS, slots):
            return  # room to wait: `take` decides
        bound = pool_bound(slots, service_class)
        client = get_async_redis()
        if await client.zcount(pool_key(pool), f"({time.time()}", "+inf") < bound:
            return
        if not flex and await provisioned_entitlement(endpoint_id, organization_id):
            return
    except Exception:  # Redis's state is admission's to report
        return
    if flex:
        raise _flex_refusal(bound, slots)
    raise _refusal(-1, org_cap(slots), bound, slots, crowded=True)


def _flex_refusal(bound: int, slots: int) -> OpenAIError:
    return OpenAIError(
        429,
        "Resource unavailable: flex requests run on idle capacity, and this "
        f"model's pool has none now ({bound} requests in flight on its {slots} "
        "slots). Retry later or use the default tier.",
        code="resource_unavailable",
        headers={"retry-after": "30"},
    )


def _refusal(took: int, cap: int, bound: int, slots: int, *, crowded: bool) -> OpenAIError:
    """The answer to a request that waited in vain (or found the waiting room full):
    a 429 naming its organization's share, or a 503 naming the pool's backlog."""
    why = (
        f"as many requests already wait for it in this gateway ({slots})"
        if crowded
        else f"none ended within {settings.MANTLE_FAIR_POOL_WAIT_S:g} s"
    )
    if took == 0:
        return OpenAIError(
            429,
            f"Your organization has {cap} requests in flight on this model's pool, its fair "
            f"share of the pool's {slots} slots (MANTLE_FAIR_POOL_ORG_SHARE = "
            f"{settings.MANTLE_FAIR_POOL_ORG_SHARE:g}), and {why}. Retry shortly.",
            code="rate_limit_exceeded",
            headers={"retry-after": "1"},
        )
    return OpenAIError(
        503,
        f"This model's pool is overloaded: {bound} requests in flight on its {slots} slots "
        f"(MANTLE_POOL_BACKLOG_FACTOR = {settings.MANTLE_POOL_BACKLOG_FACTOR:g}), and {why}. "
        "Retry shortly.",
        type_="server_error",
        code="server_overloaded",
        headers={"retry-after": "2"},
    )


async def give_back(key: str, request_id: str) -> None:
    if not key:
        return
    keys = key.split("\n")
    leases.let_go(request_id, keys)
    try:
        pipe = get_async_redis().pipeline(transaction=False)
        for one in keys:
            pipe.zrem(one, request_id)
        await pipe.execute()
    except Exception:  # kept until its lease ends: the organization's share is smaller a while
        logger.warning("could not give back %s's place in %s", request_id, key, exc_info=True)
