"""The gateway's pipeline: parse → admit → dispatch → relay → settle.

Every entry point takes these steps: the /v1 endpoint modules (gateway/endpoints/), the
/v2 tensor protocol (gateway/v2.py) and whatever runs requests without a client waiting
(a batch runner). Each step here is protocol-neutral; the callers shape replies.

- parse: `parse_request` / `parse` (a JSON object into a protocol model, OpenAI's 400s)
- admit: `limits_for` and `admit` (rate limits and the wallet reservation, one Redis script)
- dispatch: `send` (a task on the endpoint's pool queue; a broker that refuses is a 503)
- relay: `result_of` for a one-shot request, or for a generation `Generation.take` inside
  `async with generation:` (a caller that stops early cancels the worker)
- settle: `settle` (the reservation released, the real cost parked for metering), and
  `Generation.settle` (the tokens refunded to the limits too)

What admission takes is always given back: on a refused dispatch (`send`'s `on_refused`),
on an error, on a disconnect, and on success with the real figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest
from pydantic import BaseModel, ValidationError

from accounts.keys import KeyIdentity
from billing import spend
from billing.wallet import price_fill
from catalog.specs import EndpointSpec
from core import metrics
from core.logs import request_started_var
from core.redis import ScriptCall, async_script, get_async_redis, run_scripts
from gateway import dispatch, pool_share, provisioned, text
from gateway.backends import database_read
from gateway.errors import (
    OpenAIError,
    broker_unavailable,
    invalid,
    model_not_priced,
    no_capacity,
)
from gateway.limits import (
    Admission,
    Limits,
    RateLimiter,
    admission_of,
    admit_call,
    model_allowed,
    retry_after_seconds,
)
from gateway.protocol import SamplingRequest
from workers import contract

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

_NAMED = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*): (.+)$", re.DOTALL)

_limiters: dict[int, RateLimiter] = {}

_service_class: ContextVar[str] = ContextVar(
    "mantle_service_class", default=contract.ServiceClass.ONLINE.value
)


def service_class() -> str:
    """The class of work of the request being handled (a `contract.ServiceClass` value):
    online, unless a batch runner runs it as a batch line (`serving_class`)."""
    return _service_class.get()


@contextmanager
def serving_class(value: contract.ServiceClass) -> Iterator[None]:
    """Runs what is inside as `value`'s class of work: the batch runner's lines are
    admitted outside the online rate limits at the model's batch prices, and workers run
    them on what online traffic leaves idle."""
    token = _service_class.set(value.value)
    try:
        yield
    finally:
        _service_class.reset(token)


def tier_class(service_tier: str | None) -> str:
    """The class of work a request asking for `service_tier` runs as: a batch line stays a
    batch line whatever its body says; `priority` and `flex` are their own classes; `auto`,
    `default`, `scale` and none are the default tier (`online`). (Provisioned throughput
    turns an absent, `auto` or `scale` one of an organization with a free unit into
    `provisioned` at admission: gateway/provisioned.py, docs/provisioned.md.)"""
    current = service_class()
    if current == contract.ServiceClass.BATCH or service_tier is None:
        return current
    chosen = contract.SERVICE_TIERS.get(service_tier)
    return chosen.value if chosen is not None else current


async def shed_early(identity: KeyIdentity, spec: EndpointSpec, service_tier: str | None) -> None:
    """A surge's refusals that need no prompt, before the prompt is rendered and tokenized
    (`pool_share.shed`)."""
    await pool_share.shed(spec.pool, spec.id, identity.organization_id, tier_class(service_tier))


def limiter() -> RateLimiter:
    """This event loop's rate limiter (its Redis client belongs to the loop)."""
    loop_id = id(asyncio.get_running_loop())
    found = _limiters.get(loop_id)
    if found is None:
        found = _limiters[loop_id] = RateLimiter(get_async_redis())
    return found


# --- parse ----------------------------------------------------------------------------------


def require_method(request: HttpRequest, allowed: str) -> None:
    if request.method != allowed:
        raise OpenAIError(
            405, f"Method {request.method} not allowed; use {allowed}.", code="method_not_allowed"
        )


def request_id_of(request: HttpRequest) -> str:
    """The id the request-id middleware gave the request (`req_...`)."""
    rid: str = request.request_id  # type: ignore[attr-defined]
    return rid


def parse_request(request: HttpRequest, schema: type[M]) -> M:
    """The request's JSON body as `schema`; a body over the limit is a 413."""
    try:
        raw = request.body
    except RequestDataTooBig as exc:
        raise OpenAIError(413, "The request body is too large.", code="payload_too_large") from exc
    return parse(raw, schema)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def _union_tag(part: str) -> bool:
    """Whether a part of an error's location names a member of a union (pydantic puts the
    member's type there: `str`, `list[int]`...), not a field."""
    return part in _TYPE_TAGS or part.startswith(("list[", "dict[", "literal[", "tuple["))


def parse(raw: bytes | str, schema: type[M]) -> M:
    """A JSON object as `schema`, or the 400 OpenAI gives, naming the parameter."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        ) from exc
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if not _union_tag(str(p))]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            raise invalid(f"Unrecognized request argument supplied: {param}", param) from exc
        if err["type"] == "missing":
            raise invalid(f"Missing required parameter: '{param}'.", param) from exc
        message = str(err["msg"]).removeprefix("Value error, ")
        if param is None and (named := _NAMED.match(message)):
            # A check across fields names its parameter first ("top_logprobs: ...").
            param, message = named.group(1), named.group(2)
        raise invalid(f"Invalid value for '{param}': {message}", param) from exc


# --- admit ----------------------------------------------------------------------------------


def limits_for(identity: KeyIdentity, spec: EndpointSpec) -> Limits:
    """The caps of one request. On an endpoint the organization shares with others (a
    public one), all its keys and projects together get at most its share
    (MANTLE_ORG_ENDPOINT_RPM/TPM), so one organization cannot take a shared endpoint's
    whole capacity however many keys it makes; key and project limits are clamped to that
    share everywhere (limits above it are refused when set: accounts.services)."""
    org_rpm, org_tpm = settings.MANTLE_ORG_ENDPOINT_RPM, settings.MANTLE_ORG_ENDPOINT_TPM
    shared = spec.public or spec.organization_id != identity.organization_id
    return Limits(
        key_id=identity.key_id,
        project_id=identity.project_id,
        endpoint_id=spec.id,
        key_rpm=min(identity.rpm_limit, org_rpm),
        key_tpm=min(identity.tpm_limit, org_tpm),
        project_rpm=min(identity.project_rpm_limit, org_rpm),
        project_tpm=min(identity.project_tpm_limit, org_tpm),
        endpoint_rpm=spec.rpm_limit,
        endpoint_tpm=spec.tpm_limit,
        organization_id=identity.organization_id if shared else "",
        organization_rpm=org_rpm,
        organization_tpm=org_tpm,
        allowed_models=identity.allowed_models,
    )


def check_model_allowed(limits: Limits, spec: EndpointSpec, requested: str = "") -> None:
    """403 `model_not_allowed` for a model the key's allowlist leaves out, before anything
    is taken or reserved."""
    if not model_allowed(limits.allowed_models, spec.model_name, spec.name, spec.id):
        name = requested or spec.model_name
        raise OpenAIError(
            403,
            f"This API key is not allowed to use the model '{name}'. Ask an administrator of "
            "your organization to add it to the key's allowed models.",
            type_="invalid_request_error",
            code="model_not_allowed",
            param="model",
        )


async def admit(
    limits: Limits,
    spec: EndpointSpec,
    organization_id: str,
    prompt_tokens: int,
    max_tokens: int,
    request_id: str,
    *,
    requests: int = 0,
    compute_ms: int = 0,
    work_class: str | None = None,
    service_tier: str | None = None,
    may_use_units: bool = False,
) -> Admission:
    """Takes the request's share of every limit and reserves its worst-case cost at the
    prices of its class (`work_class`, default the context's), or raises the refusal as
    OpenAI words it (429, 403 unpriced, 503 no live worker). `may_use_units`: a request of
    the default tier runs within the organization's provisioned units on the endpoint when
    it has one free (`service_tier` absent, auto or scale); the class admitted is on the
    admission (`work_class`)."""
    check_model_allowed(limits, spec)
    chosen = work_class if work_class is not None else service_class()
    deadline = time.time() + settings.MANTLE_REQUEST_TIMEOUT_S
    units = ""
    if may_use_units and chosen == contract.ServiceClass.ONLINE:
        chosen, units = await provisioned.take(
            spec.id, organization_id, request_id, deadline, service_tier
        )
    share = ""
    if chosen != contract.ServiceClass.BATCH:
        # Waits here, outside every queue, while the organization holds its share of the
        # pool's slots: its surplus never sits in front of other organizations' requests.
        try:
            share = await pool_share.take(spec.pool, organization_id, request_id, deadline, chosen)
        except BaseException:
            await pool_share.give_back(units, request_id)
            raise
    share = "\n".join(key for key in (share, units) if key)
    try:
        admission = await _admit(
            limits,
            spec,
            organization_id,
            prompt_tokens,
            max_tokens,
            request_id,
            requests=requests,
            compute_ms=compute_ms,
            work_class=chosen,
        )
    except BaseException:
        await pool_share.give_back(share, request_id)
        raise
    return dataclasses.replace(admission, pool_share_key=share, work_class=chosen)


async def admit_relayed(
    limits: Limits,
    spec: EndpointSpec,
    organization_id: str,
    prompt_tokens: int,
    max_tokens: int,
    request_id: str,
) -> Admission:
    """`admit` for a request relayed to an upstream provider (gateway/relay.py): the same
    rate limits, budgets and reservation at the prices of its class (online, or a batch
    line's), with no pool to share or to find alive. Service tiers are the platform's
    pools' business: a relayed online request runs as the default tier."""
    check_model_allowed(limits, spec)
    chosen = (
        contract.ServiceClass.BATCH.value
        if service_class() == contract.ServiceClass.BATCH
        else contract.ServiceClass.ONLINE.value
    )
    admission = await _admit(
        limits,
        spec,
        organization_id,
        prompt_tokens,
        max_tokens,
        request_id,
        requests=0,
        compute_ms=0,
        work_class=chosen,
        check_live=False,
    )
    return dataclasses.replace(admission, work_class=chosen)


async def admit_relayed_along(
    limits: Limits,
    spec: EndpointSpec,
    organization_id: str,
    prompt_tokens: int,
    max_tokens: int,
    request_id: str,
    along: ScriptCall,
) -> tuple[Admission | None, Any]:
    """`admit_relayed` and another script (the relay's provider slot) in one round trip:
    the admission when it passed at once, else None (the caller undoes what `along` did and
    calls `admit_relayed`, which fills a missing price or raises the refusal), and `along`'s
    result (or its error)."""
    check_model_allowed(limits, spec)
    chosen = (
        contract.ServiceClass.BATCH.value
        if service_class() == contract.ServiceClass.BATCH
        else contract.ServiceClass.ONLINE.value
    )
    call = admit_call(
        limits,
        pool=spec.pool,
        organization_id=organization_id,
        model_name=spec.model_name,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        request_id=request_id,
        hold_s=settings.MANTLE_REQUEST_TIMEOUT_S + spend.HOLD_GRACE_S,
        requests=0,
        compute_ms=0,
        service_class=chosen,
        check_live=False,
    )
    found, along_result = await run_scripts(get_async_redis(), [call, along])
    if isinstance(found, Exception):
        return None, along_result
    admission = admission_of(found, limits, chosen)
    if not admission.allowed or admission.unpriced or admission.price_unknown:
        return None, along_result
    return dataclasses.replace(admission, work_class=chosen), along_result


async def _admit(
    limits: Limits,
    spec: EndpointSpec,
    organization_id: str,
    prompt_tokens: int,
    max_tokens: int,
    request_id: str,
    *,
    requests: int,
    compute_ms: int,
    work_class: str,
    check_live: bool = True,
) -> Admission:
    chosen = work_class

    async def attempt() -> Admission:
        return await limiter().admit(
            limits,
            pool=spec.pool,
            organization_id=organization_id,
            model_name=spec.model_name,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            request_id=request_id,
            hold_s=settings.MANTLE_REQUEST_TIMEOUT_S + spend.HOLD_GRACE_S,
            requests=requests,
            compute_ms=compute_ms,
            service_class=chosen,
            check_live=check_live,
        )

    admission = await attempt()
    if admission.price_unknown:
        # The organization's prices of this model are not in Redis yet (no wallet sync
        # wrote them): read them from the database once, then ask again.
        await database_read(price_fill, organization_id, spec.model_name)
        admission = await attempt()
    if admission.unpriced or admission.price_unknown:
        raise model_not_priced(spec.model_name)
    tokens = prompt_tokens + max_tokens
    if admission.no_worker:
        raise no_capacity(spec.pool)
    if admission.insufficient_quota:
        raise OpenAIError(
            429,
            "You exceeded your current quota, please check your plan and billing details. "
            f"(This request may cost up to {admission.reserved_nanos / 1e9:.6f}; "
            f"{max(0, admission.available_nanos) / 1e9:.6f} is available"
            + _QUOTA_WHERE.get(admission.quota_scope, ".)"),
            type_="insufficient_quota",
            code="insufficient_quota",
            headers={"x-should-retry": "false"},
        )
    if not admission.allowed:
        what = {
            "key": "API key",
            "project": "project",
            "endpoint": "endpoint",
            "organization": "organization",
        }
        scope = what[admission.refused_scope]
        if admission.retry_after_ms < 0:
            raise OpenAIError(
                429,
                f"This request needs {tokens} tokens, more than the {scope}'s whole "
                f"per-minute token limit; reduce max_tokens or the prompt.",
                code="rate_limit_exceeded",
                param="max_tokens",
                headers={"x-should-retry": "false"},
            )
        kind = f"{admission.refused_kind} per minute"
        raise OpenAIError(
            429,
            f"Rate limit reached for {scope} {_limit_owner(limits, admission.refused_scope)} "
            f"on {kind}. Please try again in {admission.retry_after_ms / 1000:.3g}s.",
            code="rate_limit_exceeded",
            headers={"retry-after": retry_after_seconds(admission.retry_after_ms)},
        )
    return admission


_QUOTA_WHERE = {
    "project": " in this project's budget.)",
    "key": " in this API key's monthly budget.)",
}


def _limit_owner(limits: Limits, scope: str) -> str:
    return {
        "key": limits.key_id,
        "project": limits.project_id,
        "endpoint": limits.endpoint_id,
        "organization": f"{limits.organization_id} on endpoint {limits.endpoint_id}",
    }[scope]


# --- dispatch -------------------------------------------------------------------------------


def billing_identity(identity: KeyIdentity, spec: EndpointSpec) -> contract.BillingIdentity:
    return contract.BillingIdentity(
        organization_id=identity.organization_id,
        project_id=identity.project_id,
        api_key_id=identity.key_id,
        endpoint_id=spec.id,
        model_version_id=spec.version_id,
        model_name=spec.model_name,
    )


def model_ref(spec: EndpointSpec) -> contract.ModelRef:
    return contract.ModelRef(
        version_id=spec.version_id,
        runtime=spec.runtime,
        sha256=spec.sha256,
        location=spec.location,
        providers=spec.providers,
    )


async def send(
    task: str,
    payload: Any,
    *,
    spec: EndpointSpec,
    request_id: str,
    deadline: float,
    on_refused: Callable[[], Coroutine[Any, Any, None]],
) -> dispatch.Ticket:
    """Dispatches to the endpoint's pool; a broker that refuses is a clean 503, and
    `on_refused` gives back what admission took (the reservation, the tokens)."""
    try:
        queue = await pool_share.queue_for(
            spec.pool, spec.queue, getattr(payload, "service_class", "")
        )
        return await dispatch.submit(
            task,
            contract.to_payload(payload),
            queue=queue,
            pool=spec.pool,
            request_id=request_id,
            deadline=deadline,
        )
    except Exception as exc:
        await on_refused()
        logger.exception("dispatch to %s failed", spec.queue)
        raise broker_unavailable() from exc


# --- relay ----------------------------------------------------------------------------------


async def result_of(ticket: dispatch.Ticket, kind: str) -> Mapping[str, str] | None:
    """The worker's result event of `kind` for a one-shot request (embeddings, tensors),
    None when its stream ended without one. A worker's error event raises it; a caller
    cancelled meanwhile (the client went away) stops the worker first."""
    found: Mapping[str, str] | None = None
    try:
        async for event in dispatch.events(ticket):
            what = event.get("type")
            if what == kind:
                found = event
            elif what == contract.EVENT_ERROR:
                raise dispatch.worker_error(event)
    except asyncio.CancelledError:
        await dispatch.cancel(ticket.request_id)
        raise
    return found


# --- settle ---------------------------------------------------------------------------------


async def settle(
    organization_id: str,
    request_id: str,
    admission: Admission,
    input_tokens: int,
    output_tokens: int,
    *,
    requests: int = 0,
    compute_ms: int = 0,
    cached_input_tokens: int = 0,
    work_class: str | None = None,
) -> None:
    """Releases the reservation and parks the real cost until metering counts it.

    For a tensor request `compute_ms` is the gateway's own upper bound (the time it
    waited); the drain replaces the parked cost with the worker's measured one.
    `cached_input_tokens` (a part of `input_tokens`) cost the cached input price. A batch
    line (`service_class()`) may be settled again under its id, by the runner that resumed
    its batch: that settle parks nothing more (`spend.settle`).
    """
    await pool_share.give_back(admission.pool_share_key, request_id)
    call = settlement_call(
        organization_id,
        request_id,
        admission,
        input_tokens,
        output_tokens,
        requests=requests,
        compute_ms=compute_ms,
        cached_input_tokens=cached_input_tokens,
        work_class=work_class,
    )
    if call is None:
        return  # a free model: nothing was reserved, nothing to settle
    try:
        await async_script(call[0])(keys=call[1], args=call[2], client=get_async_redis())
    except Exception:
        # A lost settlement leaves the reservation in place: the organization can spend
        # less than it has until its wallet is resynchronised, never more.
        logger.exception("settling %s failed", request_id)


def settlement_call(
    organization_id: str,
    request_id: str,
    admission: Admission,
    input_tokens: int,
    output_tokens: int,
    *,
    requests: int = 0,
    compute_ms: int = 0,
    cached_input_tokens: int = 0,
    work_class: str | None = None,
) -> ScriptCall | None:
    """`settle`'s money part as a script call (`core.redis.run_scripts`), None for a free
    model (nothing reserved, nothing to park). The pool share is not in it: a caller with
    one gives it back itself (`pool_share.give_back`)."""
    prices = spend.Prices(
        admission.price_in,
        admission.price_out,
        admission.price_request,
        admission.price_compute_ms,
        admission.price_cached_input,
    )
    cost = prices.cost(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        requests=requests,
        compute_ms=compute_ms,
        cached_input_tokens=cached_input_tokens,
    )
    if not admission.reserved_nanos and not cost:
        return None
    return spend.settle_call(
        organization_id=organization_id,
        request_id=request_id,
        reserved=admission.reserved_nanos,
        cost=cost,
        reserved_project_id=admission.reserved_project_id,
        reserved_key_id=admission.reserved_key_id,
        held=admission.held,
        service_class=work_class if work_class is not None else service_class(),
    )


# --- generation: all five steps for a text generation ---------------------------------------


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to sample a generation, whatever the endpoint's wire format (None: the default)."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    n: int = 1
    logprobs: int = -1  # -1: none; k: each token's and its k likeliest alternatives
    prompt_logprobs: int = -1  # the prompt's tokens scored too (completions' echo)
    grammar: str = ""  # workers/grammar.py: decoding constrained to it

    def params(self, max_tokens: int) -> contract.SamplingParams:
        return contract.SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=self.stop,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=self.logit_bias,
            n=self.n,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            grammar=self.grammar,
        )


def sampling_of(body: SamplingRequest) -> Sampling:
    """What chat completions and completions share of the request body."""
    return Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stops(),
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias=body.bias(),
        n=body.n or 1,
    )


@dataclass
class Choice:
    """What one choice of a generation came to (text is the caller's to keep)."""

    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[Any] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Delta:
    """An event of a generation, read: `kind` is "text" (text and/or log probabilities of
    choice `index`), "finish" (choice `index` ended with `finish_reason`), or "done" (the
    whole generation ended; every choice not finished before ends now, with the reason
    its `Choice` holds)."""

    kind: str
    index: int = 0
    text: str = ""
    logprobs: list[Any] | None = None
    finish_reason: str = ""


@dataclass
class Generation:
    """One admitted generation request, from dispatch to settlement.

    Read its events inside `async with generation:`. Leaving the block by an error, a
    cancellation or a closed stream (the client went away) tells the worker to stop;
    leaving it in any way settles (tokens back to the limits, money to the wallet).
    """

    request_id: str
    spec: EndpointSpec
    limits: Limits
    admission: Admission
    prompt_tokens: int
    reserved_tokens: int
    deadline: float
    organization_id: str
    n: int = 1
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from the worker's prefix cache
    finished: bool = False
    finish_reason: str = "stop"
    ticket: dispatch.Ticket | None = None
    choices: list[Choice] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None
    # Its class of work (a `contract.ServiceClass` value), kept here rather than read from
    # the context: a stream is relayed, and settled, outside the view's context.
    service_class: str = contract.ServiceClass.ONLINE.value
    _primed: tuple[list[dict[str, str]], AsyncIterator[dict[str, str]]] | None = None
    # The request's arrival at this process (perf_counter), for its time to first token.
    arrived: float = field(default_factory=lambda: request_started_var.get() or time.perf_counter())
    first_token: bool = False

    def __post_init__(self) -> None:
        if not self.choices:
            self.choices = [Choice() for _ in range(self.n)]

    def headers(self) -> dict[str, str]:
        return self.admission.headers()

    @property
    def service_tier(self) -> str:
        """The `service_tier` its responses report."""
        return contract.tier_of(self.service_class)

    def events(self) -> AsyncIterator[dict[str, str]]:
        assert self.ticket is not None, "a generation's events are read after it was sent"
        if self._primed is not None:
            first, rest = self._primed
            self._primed = None
            return _chained(first, rest)
        return dispatch.events(self.ticket)

    async def prime(self) -> None:
        """Waits for the worker's first event before a stream's response starts, so that a
        refusal in it (a flex request that found no capacity) is an HTTP error with its
        status, not an error inside a 200 stream. On a refusal the generation is settled
        here and the error raised."""
        assert self.ticket is not None, "a generation is primed after it was sent"
        rest = dispatch.events(self.ticket)
        first: list[dict[str, str]] = []
        try:
            while not first or first[-1].get("type") == contract.EVENT_STARTED:
                first.append(await anext(rest))
            if first[-1].get("type") == contract.EVENT_ERROR:
                raise dispatch.worker_error(first[-1])
        except StopAsyncIteration:
            pass
        except BaseException:
            try:
                await self.cancel()
            finally:
                await self.settle()
            raise
        self._primed = (first, rest)

    def take(self, event: Mapping[str, str]) -> str:
        """The text an event adds ('' when none), counting its tokens; the final event's
        figures replace the counts. A worker's error event raises it."""
        read = self.read(event)
        return read.text if read is not None else ""

    def read(self, event: Mapping[str, str]) -> Delta | None:
        """`take` for callers that need choices, log probabilities and finishes."""
        kind = event.get("type")
        if kind == contract.EVENT_DELTA:
            tokens = int(event.get("tokens", 0) or 0)
            if not self.first_token and tokens:
                self.first_token = True
                if self.service_class != contract.ServiceClass.BATCH:
                    metrics.GATEWAY_TTFT.labels(self.service_tier).observe(
                        time.perf_counter() - self.arrived
                    )
            self.completion_tokens += tokens
            index = int(event.get("index", 0) or 0)
            if not 0 <= index < self.n:
                return None
            choice = self.choices[index]
            choice.completion_tokens += tokens
            raw = event.get("logprobs")
            logprobs = json.loads(raw) if raw else None
            if logprobs:
                choice.logprobs.extend(logprobs)
            return Delta("text", index, event.get("text", ""), logprobs)
        if kind == contract.EVENT_CHOICE_DONE:
            index = int(event.get("index", 0) or 0)
            if not 0 <= index < self.n:
                return None
            choice = self.choices[index]
            choice.finish_reason = event.get("finish_reason", "stop")
            choice.completion_tokens = int(event.get("completion_tokens", choice.completion_tokens))
            return Delta("finish", index, finish_reason=choice.finish_reason)
        if kind == contract.EVENT_PROMPT_LOGPROBS:
            self.prompt_logprobs = json.loads(event.get("logprobs") or "[]")
            return None
        if kind == contract.EVENT_DONE:
            self.finish_reason = event.get("finish_reason", "stop")
            self.prompt_tokens = int(event.get("prompt_tokens", self.prompt_tokens))
            self.completion_tokens = int(event.get("completion_tokens", self.completion_tokens))
            cached = int(event.get("cached_tokens", 0) or 0)
            self.cached_tokens = min(max(0, cached), self.prompt_tokens)
            if self.n == 1:
                self.choices[0].completion_tokens = self.completion_tokens
            # A choice with no finish of its own (n == 1, or a request cancelled as a whole)
            # ends with the generation.
            for choice in self.choices:
                if choice.finish_reason is None:
                    choice.finish_reason = self.finish_reason
            self.finished = True
            return Delta("done", finish_reason=self.finish_reason)
        if kind == contract.EVENT_ERROR:
            raise dispatch.worker_error(event)
        return None

    async def __aenter__(self) -> Generation:
        return self

    async def cancel(self) -> None:
        """Tells the worker to stop generating (settling is still `__aexit__`'s)."""
        await dispatch.cancel(self.request_id)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            # An outage of Redis (or anything unforeseen) cannot reach the worker anyway:
            # it stops at the request's deadline.
            if exc_type is not None and issubclass(
                exc_type, (asyncio.CancelledError, GeneratorExit, OpenAIError)
            ):
                await self.cancel()
        finally:
            await self.settle()

    async def settle(self) -> None:
        used = self.prompt_tokens + self.completion_tokens
        metrics.GATEWAY_TOKENS.labels("input").inc(self.prompt_tokens)
        metrics.GATEWAY_TOKENS.labels("output").inc(self.completion_tokens)
        try:
            if self.admission.rate_limited:  # a batch line took nothing from the buckets
                await limiter().refund(self.limits, tokens=self.reserved_tokens - used)
        except Exception:  # a refund lost to a Redis hiccup only makes limits stricter
            logger.warning("could not refund %s tokens", self.reserved_tokens - used)
        await settle(
            self.organization_id,
            self.request_id,
            self.admission,
            self.prompt_tokens,
            self.completion_tokens,
            cached_input_tokens=self.cached_tokens,
            work_class=self.service_class,
        )


async def _chained(
    first: list[dict[str, str]], rest: AsyncIterator[dict[str, str]]
) -> AsyncIterator[dict[str, str]]:
    for event in first:
        yield event
    async for event in rest:
        yield event


async def start_generation(
    *,
    identity: KeyIdentity,
    spec: EndpointSpec,
    request_id: str,
    prompt_ids: Sequence[int],
    sampling: Sampling,
    max_tokens: int | None,
    service_tier: str | None = None,
) -> Generation:
    """Admits a generation of `sampling.n` choices of at most `max_tokens` each (default:
    what the context leaves, up to MANTLE_DEFAULT_MAX_TOKENS) after `prompt_ids`, and sends
    it to the endpoint's pool. Admission reserves the worst case: the prompt once, and
    `max_tokens` for every choice."""
    prompt_tokens = len(prompt_ids)
    room = spec.context_length - prompt_tokens
    if max_tokens is None:
        if room < 1:
            raise text.context_exceeded(spec, prompt_tokens, 1)
        max_tokens = min(room, settings.MANTLE_DEFAULT_MAX_TOKENS)
    elif max_tokens > room:
        raise text.context_exceeded(spec, prompt_tokens, max_tokens)
    completion_budget = max_tokens * sampling.n
    reserved = prompt_tokens + completion_budget
    limits = limits_for(identity, spec)
    chosen = tier_class(service_tier)
    admission = await admit(
        limits,
        spec,
        identity.organization_id,
        prompt_tokens,
        completion_budget,
        request_id,
        work_class=chosen,
        service_tier=service_tier,
        # A unit is one row in flight: a request of n > 1 choices (n rows) never runs
        # within the units (it runs pay-as-you-go), or one unit would buy n rows at no
        # per-token cost.
        may_use_units=sampling.n == 1,
    )
    chosen = admission.work_class or chosen
    deadline = time.time() + settings.MANTLE_REQUEST_TIMEOUT_S
    payload = contract.GenerateRequest(
        request_id=request_id,
        model=model_ref(spec),
        identity=billing_identity(identity, spec),
        prompt_token_ids=tuple(prompt_ids),
        sampling=sampling.params(max_tokens),
        deadline=deadline,
        enqueued_at=time.time(),
        service_class=chosen,
    )
    generation = Generation(
        request_id=request_id,
        spec=spec,
        limits=limits,
        admission=admission,
        prompt_tokens=prompt_tokens,
        reserved_tokens=reserved,
        deadline=deadline,
        organization_id=identity.organization_id,
        n=sampling.n,
        service_class=chosen,
    )
    generation.ticket = await send(
        contract.TaskName.GENERATE,
        payload,
        spec=spec,
        request_id=request_id,
        deadline=deadline,
        on_refused=generation.settle,
    )
    return generation


async def gather(generation: Generation) -> list[str]:
    """Runs a generation to its end and returns each choice's text (finish reasons, counts
    and log probabilities are on `generation.choices`)."""
    parts: list[list[str]] = [[] for _ in range(generation.n)]
    async with generation:
        async for event in generation.events():
            read = generation.read(event)
            if read is not None and read.text:
                parts[read.index].append(read.text)
    return ["".join(p) for p in parts]
