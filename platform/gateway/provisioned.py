"""Provisioned throughput at admission (docs/provisioned.md).

An organization with a commitment on the endpoint it calls (billing/provisioned.py writes
them to Redis) has `units` requests in flight reserved for it. A request of the default
tier (`service_tier` absent, `auto` or `scale`) takes one of them when one is free and runs
as `provisioned`: ahead of every pay-as-you-go tier at the broker and in the engine, at 0
per token (the units are billed per unit-hour), reported as `service_tier: "scale"`. With
every unit busy, the commitment's `overflow` decides: `spill` runs the request as the
default tier (pay-as-you-go), `refuse` answers a 429 naming the units. `default`,
`priority` and `flex` requests never use the units.

The places are a sorted set per (endpoint, organization) scored by the end of their lease,
which their gateway renews while the request runs (a gateway that died leaks nothing past a
lease: gateway/leases.py); the settle gives the place back with the pool-share places
(`Admission.pool_share_key`, `pool_share.give_back`).
"""

from __future__ import annotations

import time

from billing.provisioned import Entitlement, endpoint_key, inflight_key
from core.redis import get_async_redis
from gateway import leases
from gateway.errors import OpenAIError
from workers import contract

# KEYS: the organization's places on the endpoint. ARGV: now, units, the lease's end, request
# id, ttl. 1: taken; 0: every unit busy.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# The tiers that use an organization's units when it has them (OpenAI's `auto` and its
# Scale Tier's `scale`; absent is `auto`).
USES_UNITS = (None, "auto", "scale")


async def entitlement(endpoint_id: str, organization_id: str) -> Entitlement | None:
    """The organization's commitment on the endpoint in effect now, or None."""
    raw = await get_async_redis().hget(endpoint_key(endpoint_id), organization_id)
    if raw is None:
        return None
    found = Entitlement.decode(raw)
    return found if found is not None and found.active(time.time()) else None


async def take(
    endpoint_id: str,
    organization_id: str,
    request_id: str,
    deadline: float,
    service_tier: str | None,
) -> tuple[str, str]:
    """(the class the request runs as, the key to give back) for a request that would run
    in the default tier: `provisioned` and its place when the organization has a unit free
    on the endpoint, else the default tier (`spill`, or no commitment), else a 429
    (`refuse`)."""
    online = contract.ServiceClass.ONLINE.value
    if service_tier not in USES_UNITS:
        return online, ""
    found = await entitlement(endpoint_id, organization_id)
    if found is None:
        return online, ""
    key = inflight_key(endpoint_id, organization_id)
    ttl = str(int(max(60.0, deadline - time.time() + 60)))
    now = time.time()
    took = int(
        await get_async_redis().eval(
            _TAKE,
            1,
            key,
            str(now),
            str(found.units),
            str(leases.end(deadline, now)),
            request_id,
            ttl,
        )
    )
    if took == 1:
        leases.hold(request_id, [key], deadline)
        return contract.ServiceClass.PROVISIONED.value, key
    if found.overflow == "refuse":
        raise OpenAIError(
            429,
            f"Your organization's {found.units} provisioned throughput unit"
            f"{'s are' if found.units != 1 else ' is'} all in use on this endpoint, and "
            "its commitment refuses traffic beyond them. Retry when one of your requests "
            "ends, or send service_tier 'default' to run at pay-as-you-go prices.",
            code="rate_limit_exceeded",
            headers={"retry-after": "1"},
        )
    return online, ""
