"""Real-time spend in Redis: reservations at admission, settlement, and drain-side counting.

Amounts are integer nano-units of the currency ("nanos"), in the wallet's layout
(billing/wallet_keys.py names every key and field; docs/billing.md, "Admission", says what
each holds). Per organization, the wallet hash holds `mode`, `cap_nanos` (what may be
spent: prepaid balance or hard budget), `spent_nanos` (usage counted by the metering drain
since the cap was computed), `reserved_nanos` (worst-case cost of requests in flight) and
`pending_nanos` (settled requests the drain has not counted yet); the price hash holds the
organization's effective prices of a model, or only `unpriced` (with a TTL) for a model
nothing prices: admission refuses it.

Admission refuses when worst-case cost > cap - spent - reserved - pending; a project with a
hard budget has the same four fields of its own (`p:<project>:cap_nanos` ...) and the same
test. A request's cost moves reserved -> pending (gateway settles) -> spent (drain counts),
in either order for the last two, so at every moment it is counted exactly once, and
concurrent requests can never spend past the cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis
from redis.asyncio import Redis as AsyncRedis

from billing.wallet_keys import (
    PRICE_FIELDS,
    UNPRICED,
    counted_key,
    held_key,
    lua,
    pending_key,
    price_key,
    wallet_key,
)
from core.redis import ScriptCall, async_script
from workers.contract import ServiceClass

COUNTED_TTL_S = 24 * 3600

# A reservation no gateway settled by then (the gateway died mid-request) is released by
# the wallet sync: the request's own deadline plus a margin for its settlement.
HOLD_GRACE_S = 60

# How long admission trusts "this model has no price" before asking the database again.
UNPRICED_TTL_S = 60


@dataclass(frozen=True, slots=True)
class Prices:
    """An organization's effective prices of one model, in nanos per unit (exact decimal
    strings): per input and output token, per request, per compute millisecond, and per
    cached input token (a prompt token the prefix cache served); then the same five for
    batch lines (service class `batch`), for the priority tier and for the flex tier
    (`for_class`).

    Fields are added at the end so that positional construction of the earlier ones still
    works. An empty `cached_input` costs cached tokens the input price, and an empty batch
    price is the online price of its unit: never less than the price book says
    (`billing.wallet.prices_compute` writes what applies, and a batch price applies only
    where it is not above the online one).
    """

    input: str = "0"
    output: str = "0"
    request: str = "0"
    compute_ms: str = "0"
    cached_input: str = ""
    batch_input: str = ""
    batch_output: str = ""
    batch_request: str = ""
    batch_compute_ms: str = ""
    batch_cached_input: str = ""
    priority_input: str = ""
    priority_output: str = ""
    priority_request: str = ""
    priority_compute_ms: str = ""
    priority_cached_input: str = ""
    flex_input: str = ""
    flex_output: str = ""
    flex_request: str = ""
    flex_compute_ms: str = ""
    flex_cached_input: str = ""

    @classmethod
    def from_hash(cls, values: Sequence[Any]) -> Prices | None:
        """From HMGET of PRICE_FIELDS; None when the hash is missing, a marker, or written
        before requests and compute time had prices (then it is computed again). A hash
        without the cached input price or the batch prices (written by an earlier release,
        or by hand) prices cached tokens as input tokens and batch lines as online ones:
        never below the price book, and the next wallet sync writes it whole."""
        required = 4  # per input and output token, request and compute millisecond
        if any(v is None for v in values[:required]):
            return None
        return cls(
            *("" if v is None else v.decode() if isinstance(v, bytes) else str(v) for v in values)
        )

    def for_class(self, service_class: str) -> Prices:
        """The prices a request of `service_class` (a `ServiceClass` value) is costed at,
        as the five online fields: a batch line's are the batch prices, a priority or flex
        request's its tier's (the online price times the tier's multiplier); each empty
        one the online price of its unit (a hash of an earlier release; admission fills
        such a hash again before it admits a tier's request)."""
        if service_class == ServiceClass.PROVISIONED:
            return _PROVISIONED  # within units: paid per unit-hour, 0 per token
        if service_class not in _CLASS_PREFIXES:
            return self
        prefix = _CLASS_PREFIXES[service_class]
        own = [getattr(self, f"{prefix}{unit}") for unit in _UNITS]
        online = [self.input, self.output, self.request, self.compute_ms, self.cached_input]
        return Prices(*(mine or theirs for mine, theirs in zip(own, online, strict=True)))

    def cost(
        self,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        requests: int = 0,
        compute_ms: int = 0,
        cached_input_tokens: int = 0,
    ) -> int:
        """Exact cost in nanos, rounded up to a whole nano (never in the customer's
        disfavour by more than one nano per request; the invoice rates rollups again,
        exactly). `cached_input_tokens` are a part of `input_tokens`, at the cached price."""
        return self.scaled().cost(
            input_tokens, output_tokens, requests, compute_ms, cached_input_tokens
        )

    def scaled(self) -> ScaledPrices:
        """The five prices as integers over one power of ten: exact integer arithmetic,
        parsed once for however many requests are costed at these prices."""
        i, di = _decimal_parts(self.input)
        o, do = _decimal_parts(self.output)
        r, dr = _decimal_parts(self.request)
        c, dc = _decimal_parts(self.compute_ms)
        ci, dci = _decimal_parts(self.cached_input or self.input)
        places = max(di, do, dr, dc, dci)
        return ScaledPrices(
            i * 10 ** (places - di),
            o * 10 ** (places - do),
            r * 10 ** (places - dr),
            c * 10 ** (places - dc),
            ci * 10 ** (places - dci),
            10**places,
        )


def _decimal_parts(text: str) -> tuple[int, int]:
    """A price string as (numerator, decimal places): '37.5' is (375, 1). Prices are written
    plain ('150', '37.5'); any other form Decimal reads is taken through Decimal."""
    whole, _, fraction = text.partition(".")
    if whole.isdigit() and (fraction.isdigit() or not fraction):
        return int(whole + fraction), len(fraction)
    sign, digits, exponent = Decimal(text).as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"not a price: {text!r}")
    numerator = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if exponent >= 0:
        return numerator * 10**exponent, 0
    return numerator, -exponent


@dataclass(frozen=True, slots=True)
class ScaledPrices:
    """Prices in nanos per unit as numerators over `scale` (a power of ten): exact.
    `cost` takes cached input tokens as a part of the input tokens."""

    input: int
    output: int
    request: int
    compute_ms: int
    cached_input: int
    scale: int

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        requests: int,
        compute_ms: int,
        cached_input_tokens: int = 0,
    ) -> int:
        """Exact cost in nanos, rounded up to a whole nano (as Prices.cost)."""
        total = (
            (input_tokens - cached_input_tokens) * self.input
            + cached_input_tokens * self.cached_input
            + output_tokens * self.output
            + requests * self.request
            + compute_ms * self.compute_ms
        )
        return -(-total // self.scale)


FREE = Prices()
_PROVISIONED = Prices("0", "0", "0", "0", "0")

_UNITS = ("input", "output", "request", "compute_ms", "cached_input")
_CLASS_PREFIXES = {
    ServiceClass.BATCH.value: "batch_",
    ServiceClass.PRIORITY.value: "priority_",
    ServiceClass.FLEX.value: "flex_",
}


def price_write(
    client: redis.Redis | redis.client.Pipeline,
    organization_id: str,
    model_name: str,
    prices: Prices | None,
) -> None:
    """Replaces the price hash: all twenty prices (online, batch, priority, flex), or the
    short-lived `unpriced` marker.

    DEL first, in one transaction, so a marker or an older layout never lingers. Given a
    pipeline, the commands join it (the caller executes it).
    """
    key = price_key(organization_id, model_name)
    own = not isinstance(client, redis.client.Pipeline)
    pipe = client if isinstance(client, redis.client.Pipeline) else client.pipeline()
    pipe.delete(key)
    if prices is None:
        pipe.hset(key, UNPRICED, "1")
        pipe.expire(key, UNPRICED_TTL_S)
    else:
        values: list[str] = []
        for service_class in (
            ServiceClass.ONLINE,
            ServiceClass.BATCH,
            ServiceClass.PRIORITY,
            ServiceClass.FLEX,
        ):
            of_class = prices.for_class(service_class)
            values += [
                of_class.input,
                of_class.output,
                of_class.request,
                of_class.compute_ms,
                of_class.cached_input or of_class.input,
            ]
        pipe.hset(key, mapping=dict(zip(PRICE_FIELDS, values, strict=True)))
    if own:
        pipe.execute()


# Releases a reservation admission held under a request id, by what the hold says:
# `<worst>:<release-by ms>:<project or ''>[:<key>]` (the project's and the API key's
# reservations too; ids never hold a colon). Shared by admission (a request id admitted
# again), the settle and the sweep.
RELEASE_HELD_LUA = lua("""
local function release_held(w, held)
  local worst, project, key = string.match(held, '^(%d+):%d+:([^:]*):?(.*)$$')
  if not worst then return false end
  redis.call('HINCRBY', w, '${reserved}', '-' .. worst)
  if project ~= '' then
    redis.call('HINCRBY', w, '${project}' .. project .. ':${reserved}', '-' .. worst)
  end
  if key ~= '' then
    redis.call('HINCRBY', w, '${apikey}' .. key .. ':${reserved}', '-' .. worst)
  end
  return true
end
""")

# The gateway, when a request ends: release the reservation and park the real cost
# as pending until the drain counts it, unless the drain was first. A project with a hard
# budget reserved too (ARGV[4] names it): its pending is raised alike, and the parked
# value `<cost>:<project>` tells the drain to lower it; an API key with a hard budget
# (ARGV[7]) likewise, parked as `<cost>:<project or ''>:<key>`.
#
# A batch line (ARGV[6] = '1') can be settled twice under one request id: its runner died
# after the first settle, and the next runner ran the line again under the same id (the
# worker's claim made it a duplicate, the answer was read again). The second settle must
# change nothing: the held reservation is the second admission's (admission releases an
# earlier one under the same id), a cost already parked is not parked again (HSETNX), and
# the drain's `counted` marker, which the drain writes for a batch line even when it
# unparked the cost, is only read here, never taken away, so every settle of the id after
# the drain finds it. An online request is settled once: its marker is taken (DEL), so
# online traffic leaves no key behind.
_SETTLE = RELEASE_HELD_LUA + lua("""
local project, key = ARGV[4], ARGV[7] or ''
if ARGV[5] == '1' then
  -- Released once: by this settle, or by the sweep if it came first.
  local held = redis.call('HGET', KEYS[4], ARGV[3])
  if held then
    redis.call('HDEL', KEYS[4], ARGV[3])
    release_held(KEYS[1], held)
  end
else
  redis.call('HINCRBY', KEYS[1], '${reserved}', -tonumber(ARGV[1]))
  if project ~= '' then
    redis.call('HINCRBY', KEYS[1], '${project}' .. project .. ':${reserved}', -tonumber(ARGV[1]))
  end
  if key ~= '' then
    redis.call('HINCRBY', KEYS[1], '${apikey}' .. key .. ':${reserved}', -tonumber(ARGV[1]))
  end
end
local counted
if ARGV[6] == '1' then
  counted = redis.call('EXISTS', KEYS[3])
else
  counted = redis.call('DEL', KEYS[3])
end
if counted == 1 then return 0 end
local cost = tonumber(ARGV[2])
if cost > 0 then
  local parked = ARGV[2]
  if key ~= '' then
    parked = ARGV[2] .. ':' .. project .. ':' .. key
  elseif project ~= '' then
    parked = ARGV[2] .. ':' .. project
  end
  if redis.call('HSETNX', KEYS[2], ARGV[3], parked) == 1 then
    if project ~= '' then
      redis.call('HINCRBY', KEYS[1], '${project}' .. project .. ':${pending}', ARGV[2])
    end
    if key ~= '' then
      redis.call('HINCRBY', KEYS[1], '${apikey}' .. key .. ':${pending}', ARGV[2])
    end
    redis.call('HINCRBY', KEYS[1], '${pending}', ARGV[2])
  end
end
return 1
""")

# Undoes one parked cost (`<cost>`, `<cost>:<project>` or `<cost>:<project or ''>:<key>`):
# shared by both drain scripts.
UNPARK_LUA = lua("""
local function unpark(w, parked)
  local cost, project, key = string.match(parked, '^(%d+):([^:]*):?(.*)$$')
  if cost then
    if project ~= '' then
      redis.call('HINCRBY', w, '${project}' .. project .. ':${pending}', '-' .. cost)
    end
    if key ~= '' then
      redis.call('HINCRBY', w, '${apikey}' .. key .. ':${pending}', '-' .. cost)
    end
  else
    cost = parked
  end
  redis.call('HINCRBY', w, '${pending}', '-' .. cost)
end
""")

# The metering drain, once per request (it inserts each event exactly once). The marker
# tells a settle that comes later that the drain was first; a batch line's (ARGV[4] = '1')
# is written even when a parked cost was found, as its id may be settled again (_SETTLE).
_COUNT = UNPARK_LUA + lua("""
local parked = redis.call('HGET', KEYS[2], ARGV[2])
if parked then
  redis.call('HDEL', KEYS[2], ARGV[2])
  unpark(KEYS[1], parked)
end
if not parked or ARGV[4] == '1' then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[3])
end
redis.call('HINCRBY', KEYS[1], '${spent}', ARGV[1])
return 1
""")


async def settle(
    client: AsyncRedis,
    *,
    organization_id: str,
    request_id: str,
    reserved: int,
    cost: int,
    reserved_project_id: str = "",
    held: bool = False,
    service_class: str = ServiceClass.ONLINE,
    reserved_key_id: str = "",
) -> None:
    """`held`: admission recorded the reservation under the request id (the gateway's
    path); then the reservation released is the one held under the id, and one the sweep
    already released is not released twice.

    `service_class` batch: the id may be settled again (a batch line run again under its
    id after its runner died); a second settle parks nothing (see `_SETTLE`).
    """
    source, keys, args = settle_call(
        organization_id=organization_id,
        request_id=request_id,
        reserved=reserved,
        cost=cost,
        reserved_project_id=reserved_project_id,
        held=held,
        service_class=service_class,
        reserved_key_id=reserved_key_id,
    )
    await async_script(source)(keys=keys, args=args, client=client)


def settle_call(
    *,
    organization_id: str,
    request_id: str,
    reserved: int,
    cost: int,
    reserved_project_id: str = "",
    held: bool = False,
    service_class: str = ServiceClass.ONLINE,
    reserved_key_id: str = "",
) -> ScriptCall:
    """`settle` as a script call, to run in one round trip with others
    (`core.redis.run_scripts`)."""
    return (
        _SETTLE,
        [
            wallet_key(organization_id),
            pending_key(organization_id),
            counted_key(request_id),
            held_key(organization_id),
        ],
        [
            str(reserved),
            str(cost),
            request_id,
            reserved_project_id,
            "1" if held else "0",
            "1" if service_class == ServiceClass.BATCH else "0",
            reserved_key_id,
        ],
    )


_RELEASE_EXPIRED = RELEASE_HELD_LUA + lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries = redis.call('HGETALL', KEYS[2])
local released = 0
for i = 1, #entries, 2 do
  local until_ms = string.match(entries[i + 1], '^%d+:(%d+):')
  if until_ms and tonumber(until_ms) < now then
    redis.call('HDEL', KEYS[2], entries[i])
    release_held(KEYS[1], entries[i + 1])
    released = released + 1
  end
end
return released
""")


def release_expired_holds(client: redis.Redis, organization_id: str) -> int:
    """Releases reservations past their release-by time (their gateway never settled)."""
    return int(
        client.eval(_RELEASE_EXPIRED, 2, wallet_key(organization_id), held_key(organization_id))
    )


def count_usage(
    client: redis.Redis,
    *,
    organization_id: str,
    request_id: str,
    model_name: str,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    service_class: str = ServiceClass.ONLINE,
) -> int:
    """Called by the metering drain for each event it inserted (exactly once per request),
    at the prices of the request's class (a batch line's are the batch prices)."""
    values = client.hmget(price_key(organization_id, model_name), *PRICE_FIELDS)
    prices = (Prices.from_hash(values) or FREE).for_class(service_class)
    cost = prices.cost(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached_input_tokens,
    )
    client.eval(
        _COUNT,
        3,
        wallet_key(organization_id),
        pending_key(organization_id),
        counted_key(request_id),
        str(cost),
        request_id,
        str(COUNTED_TTL_S),
        "1" if service_class == ServiceClass.BATCH else "0",
    )
    return cost
