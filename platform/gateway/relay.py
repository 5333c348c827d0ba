"""Upstream providers: an endpoint's requests relayed to OpenAI, an Azure OpenAI resource or
any OpenAI-compatible server (docs/providers.md), under the platform's keys, limits and bill.

A caller of the pipeline like the endpoints and the batch runner. An endpoint whose spec has
route targets (`EndpointSpec.targets`) is served here: the targets are tried in order
(`route`: by position, weighted within one), a pool target by the endpoint's own pool path,
a provider target by an HTTP request through `core.outbound` (https, public addresses only
unless allow-listed, the resolved address pinned, no redirects, bounded responses).

- Admission is the pipeline's (`admit_relayed`): the same rate limits, budgets and
  reservation as a pool request, at the model's online prices; no pool share, no liveness.
- A provider attempt is retried on a connection error, a timeout, 429 and 5xx before the
  first byte has gone to the client, with backoff honouring `retry-after` (up to
  MANTLE_PROVIDER_RETRY_AFTER_MAX_S; longer moves on to the next target). Nothing is
  retried once a streamed byte has gone to the client.
- Failures in a row cool a target down (MANTLE_PROVIDER_FAILURES_TO_COOL, then
  MANTLE_PROVIDER_COOLDOWN_S: the circuit breaker, in Redis so every gateway agrees); a
  cooled target is skipped while another remains.
- A provider's in-flight requests are bounded across gateways (its `max_concurrency`), and
  on an operator's provider one organization holds at most MANTLE_PROVIDER_ORG_SHARE of them
  (`org_cap`), in the same script: one tenant cannot take a shared provider from the others.
- Usage comes from the provider's own `usage` (a streamed request asks for it with
  `stream_options.include_usage`, and the extra chunk is hidden from a client that did not
  ask); without one the gateway counts (the model's tokenizer, or 4 bytes a token) and marks
  the event estimated. The usage event goes to the same usage stream as the workers', under
  the same once-per-request guard, also when the client leaves mid-stream; its cost of goods
  is the target's cost per token.
- The response names what served it in `x-mantle-served-by`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
)
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from pydantic import BaseModel

from accounts.keys import KeyIdentity
from catalog.selectors import ProviderConnection, provider_connection
from catalog.specs import EndpointSpec
from core import outbound, turns
from core.redis import ScriptCall, get_async_redis, run_scripts
from gateway import leases, pipeline, pool_share, text
from gateway.backends import database_read
from gateway.errors import OpenAIError
from gateway.limits import Admission, refund_call
from gateway.replies import RelayResponse, json_reply, sse
from workers import contract

logger = logging.getLogger(__name__)

SERVED_BY = "x-mantle-served-by"
# The most tokens one relayed request is metered for, in each direction: what a provider
# reports past it is cut (a count the drain would dead-letter would bill nothing).
MAX_COUNT = 10**9
MAX_COST_NANOS = 10**15 - 1
# How many Mantle relays a request has passed; past MAX_HOPS a routed request is refused
# (a provider configured as this platform itself would otherwise relay to itself forever).
HOPS_HEADER = "x-mantle-relay-hops"
MAX_HOPS = 3
POOL = "pool"
PROVIDER = "provider"
AZURE = "azure-openai"

# A pool target's refusals that move the request on to the next target: nothing ran.
POOL_FALLBACK_CODES = frozenset({"no_available_worker", "broker_unavailable"})

# What the relay keeps of a provider's row, per process: a changed credential or URL is
# used within this many seconds.
PROVIDER_CACHE_S = 10.0
_providers: dict[str, tuple[float, ProviderConnection | None]] = {}

# Parameters never sent upstream: the tier and storage are the platform's business.
_DROPPED = ("service_tier", "store", "metadata")

_COOL_PREFIX = "mantle:relay:cool:"
_FAILS_PREFIX = "mantle:relay:fails:"
_INFLIGHT_PREFIX = "mantle:relay:inflight:"
_ORG_INFLIGHT_PREFIX = "mantle:relay:inflight-org:"

# KEYS[1] the target's cooldown, KEYS[2] the provider's in-flight set, KEYS[3] the calling
# organization's in-flight set on the provider (members and scores as in KEYS[2]); ARGV:
# now, the end of this request's lease (`leases.end`), its id, the provider's maximum, '1'
# to take a cooled target anyway (the route's last, when nothing else was tried), the
# organization's cap (at least the maximum: no share, KEYS[3] untouched). Entries end at
# their lease's end in both sets, which their gateway pushes back while the request runs
# (gateway/leases.py). -1 cooled, 0 full (or the organization at its share), 1 taken.
_TAKE = """
if ARGV[5] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local most = tonumber(ARGV[4])
if redis.call('ZCARD', KEYS[2]) >= most then return 0 end
local cap = tonumber(ARGV[6])
if cap < most then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
  if redis.call('ZCARD', KEYS[3]) >= cap then return 0 end
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[3], 3600)
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], 3600)
return 1
"""

# KEYS[1] failures in a row, KEYS[2] the cooldown; ARGV: failed ('1') or not, threshold,
# cooldown seconds. Returns 1 when this failure cooled the target down.
_OUTCOME = """
if ARGV[1] ~= '1' then
  redis.call('DEL', KEYS[1])
  return 0
end
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


# A whole answer came: KEYS[1] the provider's in-flight set, KEYS[2] the target's failures in
# a row, KEYS[3] the organization's in-flight set on the provider; ARGV[1] the request id.
_SUCCEEDED = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

# A slot given back without a word on the target's health (a stream's end): KEYS[1] the
# provider's in-flight set, KEYS[2] the organization's in-flight set on the provider.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


def _slot_keys(provider: ProviderConnection, organization_id: str) -> tuple[str, str]:
    """The sorted sets a request's provider slot is in: the provider's, its organization's."""
    return (_INFLIGHT_PREFIX + provider.id, _org_key(provider, organization_id))


# Work that runs beside a reply (its metering and settlement); kept referenced until done.
_beside_tasks: set[asyncio.Task[None]] = set()


def _beside(work: Coroutine[Any, Any, None]) -> None:
    async def guarded() -> None:
        try:
            await work
        except Exception:
            logger.exception("metering a relayed request failed")

    task = asyncio.get_running_loop().create_task(guarded())
    _beside_tasks.add(task)
    task.add_done_callback(_beside_tasks.discard)


@dataclass(frozen=True, slots=True)
class Target:
    """One of an endpoint's route targets (catalog.models.RouteTarget)."""

    id: str
    kind: str
    provider_id: str = ""
    model: str = ""
    position: int = 0
    weight: int = 1
    cost_input: Decimal = Decimal(0)
    cost_output: Decimal = Decimal(0)
    cost_cached_input: Decimal = Decimal(0)

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Target:
        return cls(
            id=str(raw.get("id", "")),
            kind=str(raw.get("kind", POOL)),
            provider_id=str(raw.get("provider_id", "")),
            model=str(raw.get("model", "")),
            position=int(raw.get("position", 0)),
            weight=max(1, int(raw.get("weight", 1))),
            cost_input=Decimal(str(raw.get("cost_input", "0"))),
            cost_output=Decimal(str(raw.get("cost_output", "0"))),
            cost_cached_input=Decimal(str(raw.get("cost_cached_input", "0"))),
        )

    def cost_nanos(self, input_tokens: int, output_tokens: int, cached_tokens: int) -> int:
        """What the provider charges for these counts, in nanos of the currency."""
        cost = (
            (input_tokens - cached_tokens) * self.cost_input
            + cached_tokens * self.cost_cached_input
            + output_tokens * self.cost_output
        )
        return int((cost * 1_000_000_000).to_integral_value())


def route(spec: EndpointSpec) -> list[Target]:
    """The order to try the endpoint's targets in for one request: by position; within a
    position, a random order weighted by `weight` (each target first in proportion to its
    weight). No targets: its pool alone."""
    if not spec.targets:
        return [Target(id=POOL, kind=POOL)]
    groups: dict[int, list[Target]] = {}
    for raw in spec.targets:
        target = Target.of(raw)
        groups.setdefault(target.position, []).append(target)
    order: list[Target] = []
    for position in sorted(groups):
        group = groups[position]
        # Weighted sampling without replacement: key u^(1/w), highest first.
        keyed = [(random.random() ** (1.0 / t.weight), t) for t in group]
        keyed.sort(key=lambda pair: pair[0], reverse=True)
        order.extend(t for _, t in keyed)
    return order


Convert = Callable[[dict[str, Any], dict[str, str]], Awaitable[HttpResponseBase]]


@dataclass(frozen=True, slots=True)
class Call:
    """What an endpoint hands the relay: the family (the path under the API root), the
    client's validated parameters as they go upstream, and the bounds admission reserves."""

    family: str  # chat/completions | completions | embeddings
    body: dict[str, Any]
    model: str  # the name the client called
    stream: bool = False
    include_usage: bool = False
    prompt_bound: int = 0  # tokens at most in the prompt (admission's reservation)
    completion_bound: int = 0  # tokens at most generated, all choices together
    default_max_tokens: int | None = None  # sent upstream when the client set no maximum
    prompt_text: str = ""  # for an estimate when the provider reports no usage


def call_of(family: str, body: Mapping[str, Any], *, stream: bool = False) -> Call:
    """The call of a /v1 request whose parameters (`body`, validated, only what the client
    set) are relayed. The prompt's bound is its text's UTF-8 bytes (a byte-level tokenizer
    never makes more tokens than bytes) plus a little per message for the template."""
    payload = {k: v for k, v in body.items() if k not in _DROPPED}
    prompt_text = _prompt_text(family, payload)
    prompt_bound = len(prompt_text.encode()) + 8 * _message_count(payload) + 16
    if family == "embeddings":
        return Call(
            family,
            payload,
            str(body.get("model", "")),
            prompt_bound=prompt_bound,
            prompt_text=prompt_text,
        )
    n = int(payload.get("n") or 1)
    if family == "completions":
        n = max(n, int(payload.get("best_of") or 1))
    chosen = payload.get("max_completion_tokens") or payload.get("max_tokens")
    default = None if chosen else settings.MANTLE_DEFAULT_MAX_TOKENS
    per_choice = int(chosen or default or 0)
    options = payload.get("stream_options") or {}
    return Call(
        family,
        payload,
        str(body.get("model", "")),
        stream=stream,
        include_usage=bool(stream and options.get("include_usage")),
        prompt_bound=prompt_bound,
        completion_bound=per_choice * n,
        default_max_tokens=default,
        prompt_text=prompt_text,
    )


def _message_count(payload: Mapping[str, Any]) -> int:
    messages = payload.get("messages")
    return len(messages) if isinstance(messages, list) else 1


def _prompt_text(family: str, payload: Mapping[str, Any]) -> str:
    """The prompt's text as a string whose length bounds its tokens: the messages (or
    prompt, or input) and any tools, serialized."""
    if family == "chat/completions":
        parts: Any = [payload.get("messages"), payload.get("tools"), payload.get("response_format")]
    elif family == "completions":
        parts = [payload.get("prompt"), payload.get("suffix")]
    else:
        parts = [payload.get("input")]
    return json.dumps(parts, ensure_ascii=False)


# --- providers, cooldown and concurrency ------------------------------------------------------


async def provider_of(provider_id: str) -> ProviderConnection | None:
    """The provider's connection, from this process's short-lived cache or the database."""
    now = time.monotonic()
    found = _providers.get(provider_id)
    if found is not None and found[0] > now:
        return found[1]
    connection = await database_read(provider_connection, provider_id)
    _providers[provider_id] = (now + PROVIDER_CACHE_S, connection)
    if len(_providers) > 4096:
        _providers.pop(next(iter(_providers)))
    return connection


def forget_providers() -> None:
    """Drops this process's cached provider rows (tests; an operator's change is seen within
    PROVIDER_CACHE_S anyway)."""
    _providers.clear()


_scripts: dict[tuple[int, str], Any] = {}


def _script(source: str) -> Any:
    key = (id(asyncio.get_running_loop()), source)
    found = _scripts.get(key)
    if found is None:
        found = _scripts[key] = get_async_redis().register_script(source)
    return found


async def cooled(target_id: str) -> bool:
    """Whether the route target is cooling down after failures in a row."""
    return bool(await get_async_redis().exists(_COOL_PREFIX + target_id))


def org_cap(provider: ProviderConnection) -> int:
    """The requests one organization may have in flight at the provider: on an operator's
    provider MANTLE_PROVIDER_ORG_SHARE of its `max_concurrency`, rounded down, at least 1
    (below 1, so at least one slot stays for the others whenever it has two); an
    organization's own provider (only it calls it) and a share of 1 have none: the maximum."""
    most = provider.max_concurrency
    share = settings.MANTLE_PROVIDER_ORG_SHARE
    if provider.organization_id is not None or share >= 1.0:
        return most
    return max(1, math.floor(most * share))


def _org_key(provider: ProviderConnection, organization_id: str) -> str:
    return f"{_ORG_INFLIGHT_PREFIX}{provider.id}:{organization_id}"


async def take_slot(
    target_id: str,
    provider: ProviderConnection,
    organization_id: str,
    request_id: str,
    deadline: float,
    *,
    force: bool = False,
) -> int:
    """Takes one of the provider's slots for the request until `deadline` (or its release),
    within the organization's cap, in one round trip: -1 the target is cooling down (and
    not `force`d), 0 the provider is full or the organization holds its share, 1 taken
    (leased: see `lease_taken`)."""
    _, keys, args = take_call(
        target_id, provider, organization_id, request_id, deadline, force=force
    )
    answer = int(await _script(_TAKE)(keys=keys, args=args))
    lease_taken(answer, provider, organization_id, request_id, deadline)
    return answer


def lease_taken(
    answer: int,
    provider: ProviderConnection,
    organization_id: str,
    request_id: str,
    deadline: float,
) -> None:
    """After a `take_call` answered `answer`: a slot taken is leased by this process until
    it is given back (`release_slot`, `release_call`, `succeeded_call`) or its deadline."""
    if answer == 1:
        leases.hold(request_id, _slot_keys(provider, organization_id), deadline)


def take_call(
    target_id: str,
    provider: ProviderConnection,
    organization_id: str,
    request_id: str,
    deadline: float,
    *,
    force: bool = False,
) -> ScriptCall:
    """`take_slot` as a script call (`core.redis.run_scripts`); its answer goes to
    `lease_taken`."""
    now = time.time()
    return (
        _TAKE,
        [_COOL_PREFIX + target_id, *_slot_keys(provider, organization_id)],
        [
            now,
            leases.end(deadline, now),
            request_id,
            provider.max_concurrency,
            "1" if force else "0",
            org_cap(provider),
        ],
    )


def succeeded_call(
    target: Target, provider: ProviderConnection, organization_id: str, request_id: str
) -> ScriptCall:
    """The slot (and the organization's place) given back and the target's failures in a
    row forgotten, as a script call: what follows a whole answer."""
    provider_key, org_key = _slot_keys(provider, organization_id)
    leases.let_go(request_id, (provider_key, org_key))
    return _SUCCEEDED, [provider_key, _FAILS_PREFIX + target.id, org_key], [request_id]


def release_call(provider: ProviderConnection, organization_id: str, request_id: str) -> ScriptCall:
    """The slot (and the organization's place) given back, as a script call: a stream's end."""
    keys = _slot_keys(provider, organization_id)
    leases.let_go(request_id, keys)
    return _RELEASE, list(keys), [request_id]


async def release_slot(provider: ProviderConnection, organization_id: str, request_id: str) -> None:
    """Gives the request's slot back (one round trip); a failure leaves it to its lease."""
    keys = _slot_keys(provider, organization_id)
    leases.let_go(request_id, keys)
    try:
        pipe = get_async_redis().pipeline(transaction=False)
        for key in keys:
            pipe.zrem(key, request_id)
        await pipe.execute()
    except Exception:  # the entry expires at its lease's end anyway
        logger.warning("could not release %s's slot at %s", request_id, provider.id)


async def _record(target: Target, *, failed: bool) -> None:
    try:
        cooled_now = await _script(_OUTCOME)(
            keys=[_FAILS_PREFIX + target.id, _COOL_PREFIX + target.id],
            args=[
                "1" if failed else "0",
                settings.MANTLE_PROVIDER_FAILURES_TO_COOL,
                settings.MANTLE_PROVIDER_COOLDOWN_S,
            ],
        )
    except Exception:  # the breaker is advice: a Redis hiccup must not fail the request
        logger.warning("could not record the outcome of target %s", target.id)
        return
    if cooled_now:
        logger.warning(
            "route target %s (%s) cooled down for %ss after %s failures in a row",
            target.id,
            target.model,
            settings.MANTLE_PROVIDER_COOLDOWN_S,
            settings.MANTLE_PROVIDER_FAILURES_TO_COOL,
        )


# --- errors ---------------------------------------------------------------------------------


def upstream_unavailable(model: str, retry_after_s: int = 5) -> OpenAIError:
    return OpenAIError(
        502,
        f"No upstream provider of `{model}` could answer the request; retry later.",
        type_="server_error",
        code="upstream_unavailable",
        headers={"retry-after": str(retry_after_s)},
    )


def upstream_rate_limited(model: str, retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        429,
        f"The upstream provider of `{model}` is at its capacity; retry in {retry_after_s}s.",
        type_="requests",
        code="upstream_rate_limited",
        headers={"retry-after": str(retry_after_s)},
    )


def upstream_timeout(model: str) -> OpenAIError:
    return OpenAIError(
        504,
        f"The upstream provider of `{model}` did not answer in time; retry later.",
        type_="server_error",
        code="upstream_timeout",
        headers={"retry-after": "5"},
    )


def stream_cut(model: str) -> OpenAIError:
    return OpenAIError(
        502,
        f"The upstream provider of `{model}` broke off its answer.",
        type_="server_error",
        code="upstream_stream_cut",
    )


def _retry_after_s(headers: httpx.Headers) -> float | None:
    """A provider's `retry-after-ms` or `retry-after` (seconds; an HTTP date is not
    followed), None when it sent none."""
    raw_ms = headers.get("retry-after-ms")
    try:
        if raw_ms is not None:
            return max(0.0, float(raw_ms) / 1000)
        raw = headers.get("retry-after")
        if raw is not None:
            return max(0.0, float(raw))
    except ValueError:
        return None
    return None


def passed_through(status: int, raw: bytes) -> OpenAIError:
    """A provider's refusal of the request itself (400, 413, 422: a bad parameter, a
    content-filter refusal) as the client's error, in OpenAI's shape, its code kept."""
    try:
        found = json.loads(raw)
        error = found.get("error") if isinstance(found, dict) else None
    except (ValueError, RecursionError):
        error = None
    if not isinstance(error, dict):
        return OpenAIError(
            400 if status < 500 else 502, "The upstream provider refused the request."
        )
    message = str(error.get("message") or "The upstream provider refused the request.")[:2000]
    code = error.get("code")
    param = error.get("param")
    return OpenAIError(
        status if status in (400, 413, 422) else 400,
        message,
        type_=str(error.get("type") or "invalid_request_error")[:64],
        param=str(param)[:200] if param is not None else None,
        code=str(code)[:64] if code is not None else None,
    )


class _Failed(Exception):
    """One attempt at a target failed in a way another attempt may not (retried, or the
    next target): `error` is what the client gets when nothing else answers."""

    def __init__(
        self, error: OpenAIError, retry_after_s: float | None = None, *, retry: bool = True
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after_s = retry_after_s
        self.retry = retry


# --- the relay --------------------------------------------------------------------------------


async def serve(
    request: HttpRequest,
    identity: KeyIdentity,
    spec: EndpointSpec,
    call: Call,
    on_pool: Callable[[], Awaitable[HttpResponseBase]],
    *,
    convert: Convert | None = None,
) -> HttpResponseBase:
    """Serves one request by the endpoint's route: its first target that answers.
    `convert` makes the reply of a provider's whole answer (its JSON and the headers the
    reply carries) for an endpoint whose shapes are not the provider's (the Responses API
    over chat completions); by default the answer is relayed as it came."""
    hops = _hops(request)
    if hops >= MAX_HOPS and spec.relayed:
        raise OpenAIError(
            508,
            f"This request has passed {hops} Mantle relays; its route leads back to a relay "
            "(a provider configured as this platform itself?). Ask the operator to check the "
            f"route of `{call.model}`.",
            type_="server_error",
            code="relay_loop",
        )
    relay = _Relay(pipeline.request_id_of(request), identity, spec, call, convert=convert)
    relay.hops = hops
    last: OpenAIError | None = None
    try:
        targets = route(spec)
        for index, target in enumerate(targets):
            if relay.taken:
                break  # metered already (a whole answer past the deadline): tried no more
            if target.kind == POOL:
                try:
                    response = await on_pool()
                except OpenAIError as exc:
                    if exc.status == 503 and exc.code in POOL_FALLBACK_CODES:
                        last = exc
                        continue
                    raise
                response[SERVED_BY] = f"pool:{spec.pool}"
                return response
            answered = await relay.attempt(target, last=index == len(targets) - 1)
            if answered is not None:
                return answered
            last = relay.last_error
        raise last or upstream_unavailable(call.model)
    finally:
        turns.give_up()  # answered or refused: what is left waits on Redis alone
        await relay.give_back_unless_taken()


@dataclass
class _Relay:
    request_id: str
    identity: KeyIdentity
    spec: EndpointSpec
    call: Call
    convert: Convert | None = None
    hops: int = 0
    tried: bool = False  # a provider target was sent the request
    started_at: float = field(default_factory=time.time)
    deadline: float = field(default_factory=lambda: time.time() + settings.MANTLE_REQUEST_TIMEOUT_S)
    admission: Admission | None = None
    limits: Any = None
    taken: bool = False  # a response owns the admission (it settles)
    last_error: OpenAIError | None = None

    @property
    def reserved_tokens(self) -> int:
        return self.call.prompt_bound + self.call.completion_bound

    async def admit(self) -> Admission:
        if self.admission is None:
            self.limits = pipeline.limits_for(self.identity, self.spec)
            self.admission = await pipeline.admit_relayed(
                self.limits,
                self.spec,
                self.identity.organization_id,
                self.call.prompt_bound,
                self.call.completion_bound,
                self.request_id,
            )
        return self.admission

    async def give_back_unless_taken(self) -> None:
        if self.admission is not None and not self.taken:
            self.taken = True
            await self._settle(0, 0, 0)

    async def _settle(self, input_tokens: int, output_tokens: int, cached: int) -> None:
        assert self.admission is not None
        try:
            if self.admission.rate_limited:
                await pipeline.limiter().refund(
                    self.limits, tokens=self.reserved_tokens - input_tokens - output_tokens
                )
        except Exception:
            logger.warning("could not refund the tokens of %s", self.request_id)
        await pipeline.settle(
            self.identity.organization_id,
            self.request_id,
            self.admission,
            input_tokens,
            output_tokens,
            cached_input_tokens=cached,
            work_class=self.admission.work_class,
        )

    # --- one target ---

    async def attempt(self, target: Target, *, last: bool = False) -> HttpResponseBase | None:
        """The target's answer, or None (with `last_error`) when it could not give one.
        A cooled target is skipped, unless it is the route's last and nothing else was
        tried (a cooled only target still serves rather than refuse everyone)."""
        provider = await provider_of(target.provider_id)
        if provider is None or not provider.enabled or not _may_use(provider, self.spec):
            self.last_error = upstream_unavailable(self.call.model)
            return None
        force = last and not self.tried
        for attempt in range(settings.MANTLE_PROVIDER_RETRIES + 1):
            if self.admission is None:
                # A refusal here (limits, money) is the client's answer.
                taken = await self._admit_taking(target, provider, force=force)
            else:
                async with turns.away(turns.REDIS_HOLD_S):
                    taken = await take_slot(
                        target.id,
                        provider,
                        self.identity.organization_id,
                        self.request_id,
                        self.deadline,
                        force=force,
                    )
            if int(taken) == -1:
                self.last_error = upstream_unavailable(
                    self.call.model, settings.MANTLE_PROVIDER_COOLDOWN_S
                )
                return None
            if int(taken) == 0:
                self.last_error = upstream_rate_limited(self.call.model, 1)
                return None
            self.tried = True
            try:
                return await self._call(target, provider)
            except _Failed as failed:
                await self._release(provider)
                # One failure a request, however often it was retried: a client cannot cool
                # a shared target down for everyone with one request.
                if attempt == 0:
                    await _record(target, failed=True)
                self.last_error = failed.error
                wait = failed.retry_after_s
                if (
                    not failed.retry
                    or attempt == settings.MANTLE_PROVIDER_RETRIES
                    or (wait is not None and wait > settings.MANTLE_PROVIDER_RETRY_AFTER_MAX_S)
                ):
                    return None
                await asyncio.sleep(wait if wait is not None else 0.1 * 2**attempt)
            except BaseException:
                await self._release(provider)
                raise
        return None

    async def _admit_taking(
        self, target: Target, provider: ProviderConnection, *, force: bool
    ) -> int:
        """The admission and the provider's slot in one round trip (the request's first
        try): `take_slot`'s answer. An admission that did not pass at once gives back the
        slot it may have taken (it held it for that round trip) and is asked alone, which
        raises the refusal or fills a missing price and admits; then the slot is taken."""
        self.limits = pipeline.limits_for(self.identity, self.spec)
        organization_id = self.identity.organization_id
        async with turns.away(turns.REDIS_HOLD_S):
            admission, answer = await pipeline.admit_relayed_along(
                self.limits,
                self.spec,
                organization_id,
                self.call.prompt_bound,
                self.call.completion_bound,
                self.request_id,
                take_call(
                    target.id,
                    provider,
                    organization_id,
                    self.request_id,
                    self.deadline,
                    force=force,
                ),
            )
        if admission is not None and not isinstance(answer, Exception):
            self.admission = admission
            lease_taken(int(answer), provider, organization_id, self.request_id, self.deadline)
            return int(answer)
        async with turns.away(turns.REDIS_HOLD_S):
            if admission is None:
                if not isinstance(answer, Exception) and int(answer) == 1:
                    await release_slot(provider, organization_id, self.request_id)
                await self.admit()
            else:
                self.admission = admission
            return await take_slot(
                target.id, provider, organization_id, self.request_id, self.deadline, force=force
            )

    def _left(self, floor_s: float) -> float:
        """The seconds left until the request's deadline (at least `floor_s`, at least 1)."""
        return max(1.0, floor_s, self.deadline - time.time())

    async def _release(self, provider: ProviderConnection) -> None:
        await release_slot(provider, self.identity.organization_id, self.request_id)

    async def _call(self, target: Target, provider: ProviderConnection) -> HttpResponseBase:
        """One request to the provider; raises _Failed for what another attempt may fix,
        OpenAIError for the client's own error."""
        url, headers, payload = upstream_request(provider, target, self.call)
        headers[HOPS_HEADER] = str(self.hops + 1)
        # The gateway's own work for this request is done: the provider's wait, retries and
        # the answer's relay run without a turn.
        turns.give_up()
        try:
            response = await outbound.send(
                "POST",
                url,
                headers=headers,
                content=payload,
                connect_timeout_s=provider.connect_timeout_s,
                # A whole answer comes when the provider has generated it all: it has until
                # the request's deadline; a stream's first chunk, the provider's first-byte
                # time.
                read_timeout_s=provider.first_byte_timeout_s
                if self.call.stream
                else self._left(provider.first_byte_timeout_s),
                # An organization's own provider goes to public https addresses only: the
                # operator's allow-lists are for the operator's providers.
                trusted=provider.organization_id is None,
                owner=provider.organization_id or "",
            )
        except outbound.DestinationRefused as exc:
            logger.error("provider %s refused as a destination: %s", provider.id, exc)
            raise _Failed(upstream_unavailable(self.call.model), retry=False) from exc
        except httpx.TimeoutException as exc:
            raise _Failed(upstream_timeout(self.call.model)) from exc
        except httpx.HTTPError as exc:
            raise _Failed(upstream_unavailable(self.call.model)) from exc
        try:
            status = response.status_code
            if status == 200:
                if self.call.stream:
                    return await self._stream_start(target, provider, response)
                return await self._whole(target, provider, response)
            raw = await _read_some(response, 64 * 1024, provider.first_byte_timeout_s)
            if status == 508:  # a Mantle further on found the loop: no retry, no fallback
                loop = passed_through(400, raw)
                raise OpenAIError(508, loop.message, type_="server_error", code="relay_loop")
            if status == 429 or status >= 500:
                wait = _retry_after_s(response.headers)
                error = (
                    upstream_rate_limited(self.call.model, math.ceil(wait or 1))
                    if status == 429
                    else upstream_unavailable(self.call.model)
                )
                raise _Failed(error, wait)
            if status in (400, 413, 422):
                await _record(target, failed=False)
                raise passed_through(status, raw)
            # 401, 403, 404, a redirect...: the route's configuration, not the request.
            logger.error(
                "provider %s answered %s for target %s; check its credential and model",
                provider.id,
                status,
                target.id,
            )
            raise _Failed(upstream_unavailable(self.call.model), retry=False)
        except BaseException:
            await response.aclose()
            raise

    async def _whole(
        self, target: Target, provider: ProviderConnection, response: httpx.Response
    ) -> HttpResponseBase:
        try:
            raw = await asyncio.wait_for(
                outbound.read_bounded(response, settings.MANTLE_PROVIDER_MAX_RESPONSE_BYTES),
                timeout=self._left(provider.first_byte_timeout_s),
            )
        except (TimeoutError, httpx.TimeoutException) as exc:
            # A whole answer has until the request's deadline (`_left`), so this is the
            # deadline. The provider accepted the request (its status came) and worked on
            # it since: the operator may be charged for it, so its prompt is billed (counted
            # here, marked estimated, its cost of goods recorded), never computed for free;
            # no time is left to try it anywhere again.
            self.taken = True
            await self._finish(target, provider, None, "", "timeout")
            raise _Failed(upstream_timeout(self.call.model), retry=False) from exc
        except httpx.HTTPError as exc:  # cut or broken: nothing has gone to the client
            raise _Failed(upstream_unavailable(self.call.model)) from exc
        except outbound.ResponseTooLarge as exc:
            raise _Failed(upstream_unavailable(self.call.model), retry=False) from exc
        finally:
            await response.aclose()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as exc:
            raise _Failed(upstream_unavailable(self.call.model)) from exc
        body["model"] = self.call.model
        usage = body.get("usage")
        self.taken = True
        answer, finish = _answer_text(body), _finish_of(body)

        async def after() -> None:
            slot = succeeded_call(target, provider, self.identity.organization_id, self.request_id)
            await self._finish(target, provider, usage, answer, finish, slot=slot)

        # The slot released, the request metered and settled beside the answer, not before
        # it: the client does not wait for that round trip to Redis (a gateway that dies in
        # between bills nothing, as one that dies mid-stream; its slot expires at the
        # request's deadline).
        _beside(after())
        if self.convert is not None:
            return await self.convert(body, self._headers(target, provider))
        return json_reply(body, headers=self._headers(target, provider))

    def _headers(self, target: Target, provider: ProviderConnection) -> dict[str, str]:
        assert self.admission is not None
        found = self.admission.headers()
        found[SERVED_BY] = f"provider:{provider.name}/{target.model}"
        return found

    async def _stream_start(
        self, target: Target, provider: ProviderConnection, response: httpx.Response
    ) -> HttpResponseBase:
        """Reads up to the first chunk before answering: until then a failure moves on (no
        byte has gone to the client); from then on this target owns the request."""
        lines = outbound.iter_lines(
            response,
            settings.MANTLE_PROVIDER_MAX_LINE_BYTES,
            max_total_bytes=settings.MANTLE_PROVIDER_MAX_STREAM_BYTES,
        )
        first: list[dict[str, Any] | None] = []
        try:
            async with asyncio.timeout(max(1.0, provider.first_byte_timeout_s)):
                async for data in _events(lines, self.deadline):
                    first.append(data)
                    if data is None or data.get("choices"):
                        break
        except TimeoutError as exc:
            raise _Failed(upstream_timeout(self.call.model)) from exc
        except (httpx.HTTPError, outbound.ResponseTooLarge, ValueError, RecursionError) as exc:
            raise _Failed(upstream_unavailable(self.call.model)) from exc
        if not first:
            raise _Failed(upstream_unavailable(self.call.model))
        await _record(target, failed=False)
        self.taken = True
        ended = _Ended()

        async def end(usage: Any, answer: str, finish: str) -> None:
            if ended.done:
                return
            ended.done = True
            try:
                await response.aclose()
            finally:
                slot = release_call(provider, self.identity.organization_id, self.request_id)
                await self._finish(target, provider, usage, answer, finish, slot=slot)

        stream = self._relay(response, lines, first, end)
        reply = _ProviderStream(stream, end, content_type="text/event-stream")
        reply["cache-control"] = "no-cache"
        reply["x-accel-buffering"] = "no"
        for name, value in self._headers(target, provider).items():
            reply[name] = value
        return reply

    async def _relay(
        self,
        response: httpx.Response,
        lines: AsyncIterator[bytes],
        first: list[dict[str, Any] | None],
        end: Callable[[Any, str, str], Awaitable[None]],
    ) -> AsyncGenerator[bytes, None]:
        usage: Mapping[str, Any] | None = None
        answer: list[str] = []
        kept = 0
        finish = "cancelled"  # until the provider says otherwise: the client left
        total = 0
        try:
            try:
                pending: AsyncIterator[dict[str, Any] | None] = _chain(
                    first, _events(lines, self.deadline)
                )
                async for data in pending:
                    if data is None:
                        break
                    if data.get("usage"):
                        usage = data["usage"]
                    choices = data.get("choices") or []
                    if not choices and data.get("usage"):
                        if self.call.include_usage:
                            data["model"] = self.call.model
                            yield sse(data)
                        continue
                    for choice in choices:
                        piece = _piece(choice)
                        if piece and kept < 1024 * 1024:
                            answer.append(piece)
                            kept += len(piece)
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
                    data["model"] = self.call.model
                    if not self.call.include_usage:
                        data.pop("usage", None)
                    chunk = sse(data)
                    total += len(chunk)
                    if total > settings.MANTLE_PROVIDER_MAX_STREAM_BYTES:
                        raise outbound.ResponseTooLarge("stream over its bound")
                    yield chunk
                else:
                    # The provider closed the stream without [DONE].
                    raise httpx.RemoteProtocolError("the stream ended without [DONE]")
                yield b"data: [DONE]\n\n"
            except (httpx.HTTPError, outbound.ResponseTooLarge, ValueError, RecursionError) as exc:
                logger.warning(
                    "stream of %s from %s broke off: %s (%s)",
                    self.request_id,
                    response.url.host,
                    type(exc).__name__,
                    str(exc)[:200],
                )
                if finish == "cancelled":
                    finish = "error"
                yield sse(stream_cut(self.call.model).body())
        finally:
            await end(usage, "".join(answer), finish)

    async def _finish(
        self,
        target: Target,
        provider: ProviderConnection,
        usage: Any,
        answer: str,
        finish: str,
        *,
        slot: ScriptCall | None = None,
    ) -> None:
        """Meters the request once (the provider's counts, or an estimate), settles, and
        gives the provider's slot back (`slot`), in one round trip to Redis."""
        estimated = 0
        counts = usage_counts(usage)
        owned = provider.organization_id is not None
        if counts is None:
            estimated = 1
            counts = (
                await self._estimate(self.call.prompt_text),
                await self._estimate(answer),
                0,
            )
        elif owned:
            # An organization's own provider reports what the organization is billed for:
            # never less than the gateway counts itself (4 bytes a token) of what it relayed,
            # within the request's bounds.
            floor_in = min(
                self.call.prompt_bound, math.ceil(len(self.call.prompt_text.encode()) / 4)
            )
            floor_out = math.ceil(len(answer.encode()) / 4)
            if self.call.completion_bound:
                floor_out = min(self.call.completion_bound, floor_out)
            if counts[0] < floor_in or counts[1] < floor_out:
                estimated = 1
            counts = (max(counts[0], floor_in), max(counts[1], floor_out), counts[2])
        input_tokens, output_tokens, cached = counts
        # The platform pays nothing for an organization's own provider: no cost of goods.
        cost = 0 if owned else min(MAX_COST_NANOS, target.cost_nanos(*counts))
        ident = pipeline.billing_identity(self.identity, self.spec)
        now = time.time()
        event = contract.UsageEvent(
            request_id=self.request_id,
            organization_id=ident.organization_id,
            project_id=ident.project_id,
            api_key_id=ident.api_key_id,
            endpoint_id=ident.endpoint_id,
            model_version_id=ident.model_version_id,
            model_name=ident.model_name,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            status=(finish or "stop")[:16],
            started_at=self.started_at,
            finished_at=now,
            queue_ms=0,
            compute_ms=int((now - self.started_at) * 1000),
            worker=f"provider:{provider.id}",
            cached_input_tokens=cached,
            service_class=self.admission.work_class if self.admission else "online",
            estimated=estimated,
            cost_nanos=cost,
            provider_id=provider.id,
        )
        await self._meter(event, input_tokens, output_tokens, cached, slot)

    async def _meter(
        self,
        event: contract.UsageEvent,
        input_tokens: int,
        output_tokens: int,
        cached: int,
        slot: ScriptCall | None,
    ) -> None:
        """The usage event, the tokens' refund, the settlement and the slot's release as
        one pipeline of scripts, the event first. When the pipeline fails, the event is
        written by `emit_usage` (guarded, retried) and the rest done one by one only if the
        event was not there yet: nothing after it ran then, so nothing runs twice (the
        slot expires at the request's deadline)."""
        assert self.admission is not None
        emit = _emit_call(event)
        calls: list[ScriptCall] = [emit]
        if self.admission.rate_limited:
            refund = refund_call(
                self.limits, tokens=self.reserved_tokens - input_tokens - output_tokens
            )
            if refund is not None:
                calls.append(refund)
        await pool_share.give_back(self.admission.pool_share_key, self.request_id)
        settlement = pipeline.settlement_call(
            self.identity.organization_id,
            self.request_id,
            self.admission,
            input_tokens,
            output_tokens,
            cached_input_tokens=cached,
            work_class=self.admission.work_class,
        )
        if settlement is not None:
            calls.append(settlement)
        if slot is not None:
            calls.append(slot)
        try:
            results = await run_scripts(get_async_redis(), calls)
        except Exception:
            logger.warning("metering %s in one round trip failed; one by one", self.request_id)
            if await emit_usage(event):
                await self._settle(input_tokens, output_tokens, cached)
            return
        for call, result in zip(calls, results, strict=True):
            if not isinstance(result, Exception):
                continue
            if call is emit:
                await emit_usage(event)  # guarded: appended once, whatever happened
            elif call is settlement:
                logger.error("settling %s failed: %s", self.request_id, result)
            else:
                logger.warning("a step after %s failed: %s", self.request_id, result)

    async def _estimate(self, value: str) -> int:
        """Tokens of `value` by the model's tokenizer when it has one, else 4 bytes a token."""
        if not value:
            return 0
        if self.spec.tokenizer_file:
            try:
                return len(await text.encode(self.spec, value))
            except Exception:
                logger.warning("estimating %s's tokens with its tokenizer failed", self.request_id)
        return math.ceil(len(value.encode()) / 4)


@dataclass
class _Ended:
    done: bool = False


class _ProviderStream(RelayResponse):
    """A relayed stream whose end (upstream closed, slot released, usage metered, money
    settled) also runs when the response is closed before its stream ever started."""

    def __init__(
        self,
        stream: AsyncGenerator[bytes, None],
        end: Callable[[Any, str, str], Awaitable[None]],
        **kwargs: Any,
    ) -> None:
        super().__init__(stream, **kwargs)
        self._end = end

    async def aclose_stream(self) -> None:
        await super().aclose_stream()
        await self._end(None, "", "cancelled")


def _hops(request: HttpRequest) -> int:
    try:
        return max(0, min(100, int(request.headers.get(HOPS_HEADER, "0"))))
    except ValueError:
        return 0


def _may_use(provider: ProviderConnection, spec: EndpointSpec) -> bool:
    """An organization's own provider serves only that organization's own endpoints (the
    catalog refuses such a target; this is the second lock)."""
    return provider.organization_id is None or provider.organization_id == spec.organization_id


def upstream_request(
    provider: ProviderConnection, target: Target, call: Call
) -> tuple[str, dict[str, str], bytes]:
    """The URL, headers and body of a call at a provider: only documented headers, the
    provider's own credential (never the client's key), the provider's model name."""
    payload = dict(call.body)
    base = provider.base_url.rstrip("/")
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if call.stream else "application/json",
        "user-agent": "mantle-relay/1",
    }
    if provider.kind == AZURE:
        payload.pop("model", None)
        url = (
            f"{base}/openai/deployments/{quote(target.model, safe='')}/{call.family}"
            f"?api-version={quote(provider.api_version, safe='')}"
        )
        headers["api-key"] = provider.credential
    else:
        payload["model"] = target.model
        url = f"{base}/{call.family}"
        headers["authorization"] = f"Bearer {provider.credential}"
    if call.stream:
        options = dict(payload.get("stream_options") or {})
        options["include_usage"] = True
        payload["stream_options"] = options
    if call.default_max_tokens is not None:
        payload["max_tokens"] = call.default_max_tokens
    return url, headers, json.dumps(payload, separators=(",", ":")).encode()


def _emit_call(event: contract.UsageEvent) -> ScriptCall:
    """The usage event's append (the workers' guard and script) as a script call."""
    fields: list[str] = []
    for name, value in event.to_fields().items():
        fields += [name, value]
    return (
        contract.EMIT_USAGE_LUA,
        [contract.usage_emitted_key(event.request_id), contract.USAGE_STREAM],
        [contract.USAGE_GUARD_TTL_S, *fields],
    )


async def emit_usage(event: contract.UsageEvent) -> bool:
    """Appends the request's usage event unless one was (the workers' guard and script):
    retried through a short Redis outage, then logged whole at CRITICAL for a replay."""
    fields: list[str] = []
    for name, value in event.to_fields().items():
        fields += [name, value]
    delay = 0.05
    give_up = time.monotonic() + 10
    while True:
        try:
            appended = await _script(contract.EMIT_USAGE_LUA)(
                keys=[contract.usage_emitted_key(event.request_id), contract.USAGE_STREAM],
                args=[contract.USAGE_GUARD_TTL_S, *fields],
            )
            return bool(appended)
        except Exception:
            if time.monotonic() + delay > give_up:
                logger.critical(
                    "usage event for %s not written; replay with XADD %s: %s",
                    event.request_id,
                    contract.USAGE_STREAM,
                    json.dumps(event.to_fields()),
                )
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def usage_counts(usage: Any) -> tuple[int, int, int] | None:
    """(input, output, cached input) from a provider's `usage`, None when it has none."""
    if not isinstance(usage, Mapping) or "prompt_tokens" not in usage:
        return None
    try:
        prompt = min(MAX_COUNT, max(0, int(usage.get("prompt_tokens") or 0)))
        completion = min(MAX_COUNT, max(0, int(usage.get("completion_tokens") or 0)))
        details = usage.get("prompt_tokens_details") or {}
        cached = (
            max(0, int(details.get("cached_tokens") or 0)) if isinstance(details, Mapping) else 0
        )
    except (TypeError, ValueError, OverflowError):  # OverflowError: Infinity
        return None
    return prompt, completion, min(cached, prompt)


def _answer_text(body: Mapping[str, Any]) -> str:
    return "".join(_piece(c) for c in body.get("choices") or [] if isinstance(c, Mapping))


def _finish_of(body: Mapping[str, Any]) -> str:
    for choice in body.get("choices") or []:
        if isinstance(choice, Mapping) and choice.get("finish_reason"):
            return str(choice["finish_reason"])
    return "stop"


def _piece(choice: Any) -> str:
    """The text a choice (whole or a chunk's) carries: every string of its message or
    delta (content, reasoning, a refusal...) but the role, a completion's text, the
    arguments of tool calls: what the client receives, and what an estimate counts."""
    if not isinstance(choice, Mapping):
        return ""
    out: list[str] = []
    for holder in (choice.get("delta"), choice.get("message")):
        if isinstance(holder, Mapping):
            out.extend(v for k, v in holder.items() if isinstance(v, str) and k != "role")
            for call in holder.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping):
                    out.append(str(function.get("name") or ""))
                    out.append(str(function.get("arguments") or ""))
    if isinstance(choice.get("text"), str):
        out.append(choice["text"])
    return "".join(out)


async def _events(
    lines: AsyncIterator[bytes], deadline: float | None = None
) -> AsyncIterator[dict[str, Any] | None]:
    """The JSON objects of a server-sent event stream's `data:` lines; None for `[DONE]`.
    Past `deadline` (every line counts, comments too) it stops with ValueError."""
    async for line in lines:
        if deadline is not None and time.time() > deadline:
            raise ValueError("the stream ran past the request's deadline")
        stripped = line.strip()
        if not stripped.startswith(b"data:"):
            continue  # comments, event names, blank separators
        data = stripped[5:].strip()
        if data == b"[DONE]":
            yield None
            return
        found = json.loads(data)
        if not isinstance(found, dict):
            raise ValueError("a stream event that is not an object")
        yield found


async def _chain(
    first: list[dict[str, Any] | None], rest: AsyncIterator[dict[str, Any] | None]
) -> AsyncIterator[dict[str, Any] | None]:
    for item in first:
        yield item
        if item is None:
            return
    async for item in rest:
        yield item


async def _read_some(response: httpx.Response, limit: int, timeout_s: float) -> bytes:
    """Up to `limit` bytes of an error's body (the rest is dropped)."""
    try:
        async with asyncio.timeout(max(1.0, timeout_s)):
            return await outbound.read_bounded(response, limit, truncate=True)
    except (TimeoutError, httpx.HTTPError, outbound.ResponseTooLarge):
        return b""


def params(body: BaseModel) -> dict[str, Any]:
    """A validated request's parameters as the client set them (the protocol's models
    forbid unknown members, so nothing else is ever relayed)."""
    return body.model_dump(mode="json", exclude_unset=True, by_alias=True)
