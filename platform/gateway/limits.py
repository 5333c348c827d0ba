"""Rate limits (RPM, TPM per key, project, endpoint and organization share) and pool liveness."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from accounts.keys import LAST_USED_HASH
from billing import spend, wallet_keys
from core.redis import ScriptCall
from workers.contract import HEARTBEAT_TTL_S, ServiceClass, pool_live_key

# Token buckets: each holds up to `limit` units and refills at limit/60 per second,
# so a full minute's allowance is available at once but never more. The script
# reads the clock of Redis itself (TIME), so gateways on several machines agree,
# checks every bucket and the pool's liveness first, and only then takes from all
# of them: a refused request consumes nothing. It also stamps the key's last use
# (moved to the database in batches by a beat task), saving a round trip.
_ADMIT = spend.RELEASE_HELD_LUA + wallet_keys.lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[8], ARGV[9], now / 1000)
-- Nothing is served without a price: a model nothing prices is refused (-5) before any
-- other test; with no price hash yet (-4) the gateway fills it from the database and asks
-- again. Fields: per input and output token, per request, per compute millisecond, per
-- cached input token (optional: a hash without it prices cached tokens as input tokens),
-- then the same five for batch lines (optional: a hash without them, the online ones),
-- for the priority tier and for the flex tier (a hash without them is filled again: -4).
local price = redis.call('HMGET', KEYS[10], '${price_input}', '${price_output}', '${price_request}',
                         '${price_compute_ms}', '${unpriced}', '${price_cached_input}',
                         '${price_batch_input}', '${price_batch_output}', '${price_batch_request}',
                         '${price_batch_compute_ms}', '${price_batch_cached_input}',
                         '${price_priority_input}', '${price_priority_output}',
                         '${price_priority_request}', '${price_priority_compute_ms}',
                         '${price_priority_cached_input}', '${price_flex_input}',
                         '${price_flex_output}', '${price_flex_request}',
                         '${price_flex_compute_ms}', '${price_flex_cached_input}')
if price[5] then return {-5} end
if not (price[1] and price[2] and price[3] and price[4]) then return {-4} end
-- A batch line (ARGV[19] = '1') is reserved and settled at the batch prices, a priority
-- ('2') or flex ('3') request at its tier's.
local batch = ARGV[19] == '1'
if batch then
  price[1], price[2] = price[7] or price[1], price[8] or price[2]
  price[3], price[4] = price[9] or price[3], price[10] or price[4]
  price[6] = price[11] or price[6]
elseif ARGV[19] == '2' or ARGV[19] == '3' then
  local o = ARGV[19] == '2' and 11 or 16
  if not (price[o + 1] and price[o + 2] and price[o + 3] and price[o + 4]) then return {-4} end
  price[1], price[2], price[3], price[4] = price[o + 1], price[o + 2], price[o + 3], price[o + 4]
  price[6] = price[o + 5] or price[6]
elseif ARGV[19] == '4' then
  -- Within provisioned throughput units ('4'): paid per unit-hour, nothing per token.
  price[1], price[2], price[3], price[4], price[6] = '0', '0', '0', '0', '0'
end
-- A request relayed to an upstream provider (ARGV[8] < 0) needs no live worker.
if tonumber(ARGV[8]) >= 0 then
  local live = redis.call('ZCOUNT', KEYS[7], (now - tonumber(ARGV[8])) / 1000, '+inf')
  if live == 0 then return {-1} end
end
local cost = tonumber(ARGV[1])
-- Buckets, requests then tokens of each: key, project, endpoint, and the organization's
-- share of the endpoint (KEYS[12-13], caps ARGV[17-18]; a cap of 0 there: no share).
local bucket = {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[12], KEYS[13]}
local caps = {}
for i = 1, 6 do caps[i] = tonumber(ARGV[i + 1]) end
caps[7], caps[8] = tonumber(ARGV[17]), tonumber(ARGV[18])
-- Only the share may be absent (0); a key, project or endpoint cap of 0 admits nothing.
-- A batch line takes from none of them: batches are paced by their own queue limit.
local active = {}
for i = 1, 8 do active[i] = not batch and ((i <= 6) or caps[i] > 0) end
local levels = {}
local denied, denied_wait = 0, 0
for i = 1, 8 do
  if active[i] then
    local cap = caps[i]
    local need = (i % 2 == 1) and 1 or cost
    local rate = cap / 60000.0
    local h = redis.call('HMGET', bucket[i], 'l', 'ts')
    local level = cap
    if h[1] then
      level = math.min(cap, tonumber(h[1]) + (now - tonumber(h[2])) * rate)
    end
    levels[i] = level
    if level < need and denied == 0 then
      denied = i
      if need > cap or cap == 0 then
        denied_wait = -1
      else
        denied_wait = math.ceil((need - level) / rate)
      end
    end
  end
end
if denied > 0 then return {0, denied, denied_wait} end
-- One request id holds at most one reservation. An id admitted again (a batch line run
-- again under its id after its runner died) finds the earlier admission's hold: that
-- reservation is released when this one is taken, and counts as available for the test.
local previous = ARGV[13] ~= '' and redis.call('HGET', KEYS[11], ARGV[13])
local previous_worst, previous_project, previous_key = 0, '', ''
if previous then
  local worst, project, key = string.match(previous, '^(%d+):%d+:([^:]*):?(.*)$$')
  if worst then previous_worst, previous_project, previous_key = tonumber(worst), project, key end
end
-- Money: reserve the worst-case cost against what the organization may still spend
-- (every prompt token uncached: the prefix cache is only known once the worker ran).
local worst = math.ceil(tonumber(ARGV[10]) * tonumber(price[1])
                        + tonumber(ARGV[11]) * tonumber(price[2])
                        + tonumber(ARGV[15]) * tonumber(price[3])
                        + tonumber(ARGV[16]) * tonumber(price[4]))
local w = redis.call('HMGET', KEYS[9], '${mode}', '${cap}', '${spent}', '${reserved}',
                     '${pending}')
if w[1] and w[1] ~= '${unlimited}' and worst > 0 then
  local available = tonumber(w[2] or '0') - tonumber(w[3] or '0') - tonumber(w[4] or '0')
                    - tonumber(w[5] or '0') + previous_worst
  if worst > available then return {-2, string.format('%.0f', available), worst} end
end
-- A project with a hard budget: the same test against its own cap, with its own
-- reservation, so concurrent requests of one project cannot pass it either.
local project_reserve = ''
if worst > 0 and ARGV[12] ~= '' then
  local pre = '${project}' .. ARGV[12] .. ':'
  local p = redis.call('HMGET', KEYS[9], pre .. '${cap}', pre .. '${spent}',
                       pre .. '${reserved}', pre .. '${pending}')
  if p[1] then
    local available = tonumber(p[1]) - tonumber(p[2] or '0') - tonumber(p[3] or '0')
                      - tonumber(p[4] or '0')
    if previous_project == ARGV[12] then available = available + previous_worst end
    if worst > available then return {-3, string.format('%.0f', available), worst} end
    project_reserve = pre .. '${reserved}'
  end
end
-- An API key with a hard monthly budget (ARGV[9] is the key): the same test against its
-- own cap and reservation (docs/billing.md, "Per-key budgets").
local key_reserve = ''
if worst > 0 and ARGV[9] ~= '' then
  local pre = '${apikey}' .. ARGV[9] .. ':'
  local k = redis.call('HMGET', KEYS[9], pre .. '${cap}', pre .. '${spent}',
                       pre .. '${reserved}', pre .. '${pending}')
  if k[1] then
    local available = tonumber(k[1]) - tonumber(k[2] or '0') - tonumber(k[3] or '0')
                      - tonumber(k[4] or '0')
    if previous_key == ARGV[9] then available = available + previous_worst end
    if worst > available then return {-6, string.format('%.0f', available), worst} end
    key_reserve = pre .. '${reserved}'
  end
end
local out = {1}
for kind = 1, 2 do
  local pick, pick_remaining, pick_cap, pick_reset = 0, 0, 0, 0
  for i = kind, 8, 2 do
    if active[i] then
      local cap = caps[i]
      local left = levels[i] - ((kind == 1) and 1 or cost)
      if pick == 0 or left < pick_remaining then
        pick, pick_remaining, pick_cap = i, left, cap
        pick_reset = cap > 0 and math.ceil((cap - left) / (cap / 60000.0)) or 0
      end
    end
  end
  table.insert(out, pick_cap)
  table.insert(out, math.floor(pick_remaining))
  table.insert(out, pick_reset)
end
for i = 1, 8 do
  if active[i] then
    local need = (i % 2 == 1) and 1 or cost
    redis.call('HSET', bucket[i], 'l', levels[i] - need, 'ts', now)
    redis.call('PEXPIRE', bucket[i], 120000)
  end
end
if previous then
  redis.call('HDEL', KEYS[11], ARGV[13])
  release_held(KEYS[9], previous)
end
if worst > 0 then
  redis.call('HINCRBY', KEYS[9], '${reserved}', string.format('%.0f', worst))
end
if project_reserve ~= '' then
  redis.call('HINCRBY', KEYS[9], project_reserve, string.format('%.0f', worst))
end
if key_reserve ~= '' then
  redis.call('HINCRBY', KEYS[9], key_reserve, string.format('%.0f', worst))
end
-- Held under the request id until settled, or released by the sweep after ARGV[14] ms.
local held = 0
if worst > 0 and ARGV[13] ~= '' then
  redis.call('HSET', KEYS[11], ARGV[13], string.format('%.0f', worst) .. ':'
             .. string.format('%.0f', now + tonumber(ARGV[14])) .. ':'
             .. (project_reserve ~= '' and ARGV[12] or '')
             .. (key_reserve ~= '' and (':' .. ARGV[9]) or ''))
  held = 1
end
table.insert(out, string.format('%.0f', worst))
table.insert(out, price[1])
table.insert(out, price[2])
table.insert(out, project_reserve ~= '' and 1 or 0)
table.insert(out, held)
table.insert(out, price[3])
table.insert(out, price[4])
table.insert(out, price[6] or '')
table.insert(out, key_reserve ~= '' and 1 or 0)
return out
""")

# Gives back the tokens reserved but not used (the reservation was the worst case).
_REFUND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local refund = tonumber(ARGV[1])
for i = 1, #KEYS do
  local cap = tonumber(ARGV[i + 1])
  local h = redis.call('HMGET', KEYS[i], 'l', 'ts')
  if h[1] then
    local level = math.min(cap, tonumber(h[1]) + (now - tonumber(h[2])) * cap / 60000.0)
    redis.call('HSET', KEYS[i], 'l', math.min(cap, level + refund), 'ts', now)
  end
end
return 1
"""

SCOPES = ("key", "project", "endpoint", "organization")

# ARGV[19] of the admission script: the class whose prices a request is reserved at.
_CLASS_ARG = {
    ServiceClass.BATCH.value: "1",
    ServiceClass.PRIORITY.value: "2",
    ServiceClass.FLEX.value: "3",
    ServiceClass.PROVISIONED.value: "4",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps admission checks. `organization_rpm`/`_tpm` are the organization's share
    of a shared endpoint (all its keys and projects together); 0 is no share of its own
    (its own endpoint: the endpoint's limit is all its)."""

    key_id: str
    project_id: str
    endpoint_id: str
    key_rpm: int
    key_tpm: int
    project_rpm: int
    project_tpm: int
    endpoint_rpm: int
    endpoint_tpm: int
    organization_id: str = ""
    organization_rpm: int = 0
    organization_tpm: int = 0
    # The model names the key may use (its identity's `allowed_models`); empty: any.
    allowed_models: tuple[str, ...] = ()

    def bucket_keys(self) -> list[str]:
        share = f"mantle:rl:org:{self.organization_id}:endpoint:{self.endpoint_id}"
        return [
            f"mantle:rl:key:{self.key_id}:req",
            f"mantle:rl:key:{self.key_id}:tok",
            f"mantle:rl:project:{self.project_id}:req",
            f"mantle:rl:project:{self.project_id}:tok",
            f"mantle:rl:endpoint:{self.endpoint_id}:req",
            f"mantle:rl:endpoint:{self.endpoint_id}:tok",
            f"{share}:req",
            f"{share}:tok",
        ]

    def caps(self) -> list[int]:
        shared = bool(self.organization_id)
        return [
            self.key_rpm,
            self.key_tpm,
            self.project_rpm,
            self.project_tpm,
            self.endpoint_rpm,
            self.endpoint_tpm,
            self.organization_rpm if shared else 0,
            self.organization_tpm if shared else 0,
        ]


@dataclass(frozen=True, slots=True)
class Admission:
    """Outcome of admission: allowed, or which limit refused and when to retry."""

    allowed: bool
    no_worker: bool = False
    # No price hash for the model yet: fill it from the database (wallet.price_fill), retry.
    price_unknown: bool = False
    unpriced: bool = False  # nothing prices the model: refused for everyone (403)
    insufficient_quota: bool = False
    quota_scope: str = ""  # "organization" | "project" | "key": whose money refused
    available_nanos: int = 0
    reserved_nanos: int = 0  # the worst-case cost reserved against the wallet
    price_in: str = "0"  # nanos per token, as the wallet had them at admission
    price_out: str = "0"
    price_request: str = "0"  # nanos per request (tensor models)
    price_compute_ms: str = "0"  # nanos per compute millisecond (tensor models)
    # nanos per cached input token; "": the input price (a hash written without it)
    price_cached_input: str = ""
    # The project whose hard budget holds a reservation too ("" when it has none).
    reserved_project_id: str = ""
    # The API key whose hard monthly budget holds a reservation too ("" when it has none).
    reserved_key_id: str = ""
    # Took its share of the RPM/TPM buckets, so unused tokens go back to them at the
    # settle; False for a batch line (outside the online limits: nothing to give back).
    rate_limited: bool = True
    held: bool = False  # the reservation is recorded under the request id (wallet_keys.held_key)
    refused_scope: str = ""
    refused_kind: str = ""  # "requests" | "tokens"
    retry_after_ms: int = 0  # -1: can never pass (the request alone exceeds the limit)
    limit_requests: int = 0
    remaining_requests: int = 0
    reset_requests_ms: int = 0
    limit_tokens: int = 0
    remaining_tokens: int = 0
    reset_tokens_ms: int = 0
    # The request's place among its organization's requests in flight on the pool
    # (gateway/pool_share.py), given back at the settle; "" when it holds none.
    pool_share_key: str = ""
    # The class the request was admitted in: a default-tier request within the
    # organization's provisioned units runs as `provisioned` (gateway/provisioned.py).
    work_class: str = ""

    def headers(self) -> dict[str, str]:
        if not self.allowed or not self.rate_limited:
            return {}
        return {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(max(0, self.remaining_requests)),
            "x-ratelimit-reset-requests": format_duration(self.reset_requests_ms),
            "x-ratelimit-limit-tokens": str(self.limit_tokens),
            "x-ratelimit-remaining-tokens": str(max(0, self.remaining_tokens)),
            "x-ratelimit-reset-tokens": format_duration(self.reset_tokens_ms),
        }


def model_allowed(allowed_models: Sequence[str], *names: str) -> bool:
    """Whether a key with this allowlist may use a model known by any of `names` (its
    model's name, its endpoint's name or id: what /v1/models lists); empty: any model."""
    return not allowed_models or any(name in allowed_models for name in names)


def format_duration(ms: int) -> str:
    """OpenAI's style for reset headers: `20ms`, `1.5s`, `6m0s`."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes = int(seconds // 60)
    return f"{minutes}m{int(seconds - minutes * 60)}s"


class RateLimiter:
    def __init__(self, client: Redis) -> None:
        self._admit = client.register_script(_ADMIT)
        self._refund = client.register_script(_REFUND)

    async def admit(
        self,
        limits: Limits,
        *,
        pool: str,
        organization_id: str,
        model_name: str,
        prompt_tokens: int,
        max_tokens: int,
        request_id: str = "",
        hold_s: float = 0.0,
        requests: int = 0,
        compute_ms: int = 0,
        service_class: str = ServiceClass.ONLINE,
        check_live: bool = True,
    ) -> Admission:
        """Checks the price, liveness, all eight buckets and the wallet; takes from all
        only if all pass. The worst-case cost reserved is `prompt_tokens` and `max_tokens` at the
        token prices plus `requests` and `compute_ms` (a tensor request: 1 and its compute
        deadline) at the request and compute prices.

        A batch line (`service_class` batch) skips the buckets (batches have their own
        queue limit, checked when a batch is created) and is checked and reserved at the
        model's batch prices, which the admission returns (`price_*`) for the settle;
        price, liveness, budgets and balance are checked as for any request. A priority or
        flex request is reserved and settled at its tier's prices the same way.

        With a `request_id`, the money reserved is also held under it for `hold_s`
        seconds: if no settle comes by then (the gateway died), the wallet sync
        releases it, so a crash never keeps an organization's money reserved. An id
        admitted again (a batch line run again under its id) first releases the
        reservation held under it: one id holds at most one reservation.
        """
        call = admit_call(
            limits,
            pool=pool,
            organization_id=organization_id,
            model_name=model_name,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            request_id=request_id,
            hold_s=hold_s,
            requests=requests,
            compute_ms=compute_ms,
            service_class=service_class,
            check_live=check_live,
        )
        result = await self._admit(keys=call[1], args=call[2])
        return admission_of(result, limits, service_class)

    async def refund(self, limits: Limits, *, tokens: int) -> None:
        call = refund_call(limits, tokens=tokens)
        if call is not None:
            await self._refund(keys=call[1], args=call[2])


def admit_call(
    limits: Limits,
    *,
    pool: str,
    organization_id: str,
    model_name: str,
    prompt_tokens: int,
    max_tokens: int,
    request_id: str = "",
    hold_s: float = 0.0,
    requests: int = 0,
    compute_ms: int = 0,
    service_class: str = ServiceClass.ONLINE,
    check_live: bool = True,
) -> ScriptCall:
    """`RateLimiter.admit`'s script call (`core.redis.run_scripts`); its result read by
    `admission_of`."""
    buckets, caps = limits.bucket_keys(), limits.caps()
    # The organization's share comes last (KEYS[12-13], ARGV[17-18]): added after the rest.
    keys = [
        *buckets[:6],
        pool_live_key(pool),
        LAST_USED_HASH,
        wallet_keys.wallet_key(organization_id),
        wallet_keys.price_key(organization_id, model_name),
        wallet_keys.held_key(organization_id),
        *buckets[6:],
    ]
    args: list[int | str] = [
        prompt_tokens + max_tokens,
        *caps[:6],
        int(HEARTBEAT_TTL_S * 1000) if check_live else -1,
        limits.key_id,
        prompt_tokens,
        max_tokens,
        limits.project_id,
        request_id,
        int(hold_s * 1000),
        requests,
        compute_ms,
        *caps[6:],
        _CLASS_ARG.get(service_class, "0"),
    ]
    return _ADMIT, keys, args


def admission_of(result: Sequence[Any], limits: Limits, service_class: str) -> Admission:
    """The Admission that the admission script's `result` says."""
    status = int(result[0])
    if status == -4:
        return Admission(allowed=False, price_unknown=True)
    if status == -5:
        return Admission(allowed=False, unpriced=True)
    if status == -1:
        return Admission(allowed=False, no_worker=True)
    if status in (-2, -3, -6):
        return Admission(
            allowed=False,
            insufficient_quota=True,
            quota_scope={-2: "organization", -3: "project", -6: "key"}[status],
            available_nanos=int(result[1]),
            reserved_nanos=int(result[2]),
        )
    if status == 0:
        index = int(result[1]) - 1
        return Admission(
            allowed=False,
            refused_scope=SCOPES[index // 2],
            refused_kind="requests" if index % 2 == 0 else "tokens",
            retry_after_ms=int(result[2]),
        )
    return Admission(
        allowed=True,
        limit_requests=int(result[1]),
        remaining_requests=int(result[2]),
        reset_requests_ms=int(result[3]),
        limit_tokens=int(result[4]),
        remaining_tokens=int(result[5]),
        reset_tokens_ms=int(result[6]),
        reserved_nanos=int(result[7]),
        price_in=str(result[8]),
        price_out=str(result[9]),
        reserved_project_id=limits.project_id if int(result[10]) == 1 else "",
        held=int(result[11]) == 1,
        price_request=str(result[12]),
        price_compute_ms=str(result[13]),
        price_cached_input=str(result[14]),
        reserved_key_id=limits.key_id if int(result[15]) == 1 else "",
        rate_limited=service_class != ServiceClass.BATCH,
    )


def refund_call(limits: Limits, *, tokens: int) -> ScriptCall | None:
    """The refund of `tokens` unused tokens to the token buckets, as a script call
    (`core.redis.run_scripts`); None when there is nothing to give back."""
    if tokens <= 0:
        return None
    return _REFUND, limits.bucket_keys()[1::2], [tokens, *limits.caps()[1::2]]


def retry_after_seconds(ms: int) -> str:
    return str(max(1, math.ceil(ms / 1000)))
