"""Fair sharing across the workers of a pool: one organization's burst cannot fill every
task slot of a pool while others wait (docs/service_tiers.md, "Fair sharing").

A pool's nodes take work from one broker queue in arrival order, each as many tasks as it
has task slots (`total_slots` in its heartbeat). Inside a node the engine admits fairly
(workers/engine/causal_lm.py), but a request still in the broker queue waits behind every
one sent before it: if one organization sends more than the pool's slots, everyone else's
requests queue behind its surplus. So the gateway counts each organization's requests in
flight on each pool (a Redis sorted set per pool and organization, members scored by their
deadline so a gateway that died leaks nothing past it) and lets an organization hold at
most MANTLE_FAIR_POOL_ORG_SHARE of the pool's slots. A request past it waits at the gateway,
in no queue of anyone else's, for one of its organization's own requests to end (up to
MANTLE_FAIR_POOL_WAIT_S, then a 429 that names the share); the slots it leaves free are
what other organizations' requests find when they reach the pool.

Batch lines are paced by their own slots (gateway/batch_runner.py) and are not counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass

from django.conf import settings

from core.redis import get_async_redis
from gateway.errors import OpenAIError
from workers import contract

logger = logging.getLogger(__name__)

SLOTS_TTL_S = 1.0  # a pool's slot count is read from heartbeats at most once a second
POLL_S = 0.05

_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
"""


def share_key(pool: str, organization_id: str) -> str:
    return f"mantle:pool-share:{pool}:{organization_id}"


@dataclass
class _Pool:
    slots: int
    priority_ready: bool  # every live node consumes the pool's priority queue
    read_at: float


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
    found = _pools[pool] = _Pool(total, ready, now)
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
    return max(1, math.floor(slots * settings.MANTLE_FAIR_POOL_ORG_SHARE))


async def take(pool: str, organization_id: str, request_id: str, deadline: float) -> str:
    """Takes a place for the request among its organization's requests in flight on the
    pool, waiting up to MANTLE_FAIR_POOL_WAIT_S for one; returns the key to give it back
    with (`give_back`), or "" when sharing is off or the pool's size is unknown. Raises
    a 429 when the wait runs out."""
    if settings.MANTLE_FAIR_POOL_ORG_SHARE >= 1.0:
        return ""
    slots = await pool_slots(pool)
    if slots <= 0:
        return ""  # no live node: admission answers that (503) on its own
    key = share_key(pool, organization_id)
    client = get_async_redis()
    cap = org_cap(slots)
    give_up = time.monotonic() + settings.MANTLE_FAIR_POOL_WAIT_S
    ttl = str(int(max(60.0, deadline - time.time() + 60)))
    while True:
        took = await client.eval(
            _TAKE, 1, key, str(time.time()), str(cap), str(deadline), request_id, ttl
        )
        if took:
            return key
        if time.monotonic() >= give_up:
            raise OpenAIError(
                429,
                f"Your organization has {cap} requests in flight on this model's pool, its "
                f"fair share of the pool's {slots} slots (MANTLE_FAIR_POOL_ORG_SHARE = "
                f"{settings.MANTLE_FAIR_POOL_ORG_SHARE:g}); none ended within "
                f"{settings.MANTLE_FAIR_POOL_WAIT_S:g} s. Retry shortly.",
                code="rate_limit_exceeded",
                headers={"retry-after": "1"},
            )
        await asyncio.sleep(POLL_S)
        cap = org_cap(await pool_slots(pool))


async def give_back(key: str, request_id: str) -> None:
    if not key:
        return
    try:
        await get_async_redis().zrem(key, request_id)
    except Exception:  # kept until its deadline: the organization's share is smaller a while
        logger.warning("could not give back %s's place in %s", request_id, key, exc_info=True)
