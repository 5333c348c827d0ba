"""The /v1 OpenAI-compatible API: models, chat completions, completions, embeddings."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from pydantic import BaseModel, ValidationError

from accounts.keys import KeyIdentity
from billing import spend
from billing.wallet import price_fill
from catalog.selectors import endpoint_spec, endpoints_visible_to
from catalog.specs import EndpointSpec
from core import metrics
from core.redis import get_async_redis
from gateway import dispatch, text
from gateway.backends import (
    DATABASE_DOWN,
    REDIS_DOWN,
    database_read,
    database_unavailable,
    forget_idle_redis_connections,
    redis_unavailable,
)
from gateway.errors import (
    OpenAIError,
    broker_unavailable,
    internal_error,
    invalid,
    model_not_found,
    model_not_priced,
    no_capacity,
)
from gateway.limits import Admission, Limits, RateLimiter, retry_after_seconds
from gateway.resolve import resolve
from gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from workers import contract

logger = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)
View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]

_limiters: dict[int, RateLimiter] = {}


def limiter() -> RateLimiter:
    loop_id = id(asyncio.get_running_loop())
    found = _limiters.get(loop_id)
    if found is None:
        found = _limiters[loop_id] = RateLimiter(get_async_redis())
    return found


# --- plumbing -----------------------------------------------------------------------------


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> HttpResponse:
    response = HttpResponse(json.dumps(body), status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _parse(request: HttpRequest, schema: type[_M]) -> _M:
    try:
        raw = request.body
    except RequestDataTooBig as exc:
        raise OpenAIError(413, "The request body is too large.", code="payload_too_large") from exc
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
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("list[", "str", "int"))]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            raise invalid(f"Unrecognized request argument supplied: {param}", param) from exc
        if err["type"] == "missing":
            raise invalid(f"Missing required parameter: '{param}'.", param) from exc
        message = str(err["msg"]).removeprefix("Value error, ")
        raise invalid(f"Invalid value for '{param}': {message}", param) from exc


def gateway_view(view: View) -> View:
    """Turns OpenAIErrors into replies and times the request (openai-processing-ms)."""

    @csrf_exempt
    async def wrapper(request: HttpRequest, **kwargs: str) -> HttpResponseBase:
        started = time.perf_counter()
        metrics.INFLIGHT.inc()
        try:
            response = await view(request, **kwargs)
        except OpenAIError as exc:
            response = exc.response()
        except REDIS_DOWN as exc:
            logger.warning("redis unreachable: %s", exc)
            await forget_idle_redis_connections()
            response = redis_unavailable().response()
        except DATABASE_DOWN as exc:
            logger.warning("database unreachable: %s", exc)
            response = database_unavailable().response()
        except Exception:
            # The traceback goes to the log under the request id, never to the client.
            logger.exception("unexpected error in %s", view.__name__)
            response = internal_error(_request_id(request)).response()
        finally:
            metrics.INFLIGHT.dec()
        response["openai-processing-ms"] = str(int((time.perf_counter() - started) * 1000))
        return response

    wrapper.__name__ = view.__name__
    wrapper.__doc__ = view.__doc__
    return wrapper


def _method(request: HttpRequest, allowed: str) -> None:
    if request.method != allowed:
        raise OpenAIError(
            405, f"Method {request.method} not allowed; use {allowed}.", code="method_not_allowed"
        )


def _require_kind(spec: EndpointSpec, kinds: set[str], path: str) -> None:
    if spec.kind not in kinds:
        raise OpenAIError(
            404,
            f"This is a {spec.kind} model and thus not supported in the {path} endpoint.",
            param="model",
            code="model_not_supported",
        )


def _limits(identity: KeyIdentity, spec: EndpointSpec) -> Limits:
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
    )


async def _admit(
    limits: Limits,
    spec: EndpointSpec,
    organization_id: str,
    prompt_tokens: int,
    max_tokens: int,
    request_id: str,
    *,
    requests: int = 0,
    compute_ms: int = 0,
) -> Admission:
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
            + (" in this project's budget.)" if admission.quota_scope == "project" else ".)"),
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


def _limit_owner(limits: Limits, scope: str) -> str:
    return {
        "key": limits.key_id,
        "project": limits.project_id,
        "endpoint": limits.endpoint_id,
        "organization": f"{limits.organization_id} on endpoint {limits.endpoint_id}",
    }[scope]


def _identity(identity: KeyIdentity, spec: EndpointSpec) -> contract.BillingIdentity:
    return contract.BillingIdentity(
        organization_id=identity.organization_id,
        project_id=identity.project_id,
        api_key_id=identity.key_id,
        endpoint_id=spec.id,
        model_version_id=spec.version_id,
        model_name=spec.model_name,
    )


def _model_ref(spec: EndpointSpec) -> contract.ModelRef:
    return contract.ModelRef(
        version_id=spec.version_id,
        runtime=spec.runtime,
        sha256=spec.sha256,
        location=spec.location,
        providers=spec.providers,
    )


async def _submit(
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
        return await dispatch.submit(
            task,
            contract.to_payload(payload),
            queue=spec.queue,
            pool=spec.pool,
            request_id=request_id,
            deadline=deadline,
        )
    except Exception as exc:
        await on_refused()
        logger.exception("dispatch to %s failed", spec.queue)
        raise broker_unavailable() from exc


def _request_id(request: HttpRequest) -> str:
    rid: str = request.request_id  # type: ignore[attr-defined]
    return rid


async def _settle_money(
    organization_id: str,
    request_id: str,
    admission: Admission,
    input_tokens: int,
    output_tokens: int,
    *,
    requests: int = 0,
    compute_ms: int = 0,
) -> None:
    """Releases the reservation and parks the real cost until metering counts it.

    For a tensor request `compute_ms` is the gateway's own upper bound (the time it
    waited); the drain replaces the parked cost with the worker's measured one.
    """
    prices = spend.Prices(
        admission.price_in,
        admission.price_out,
        admission.price_request,
        admission.price_compute_ms,
    )
    cost = prices.cost(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        requests=requests,
        compute_ms=compute_ms,
    )
    if not admission.reserved_nanos and not cost:
        return  # a free model: nothing was reserved, nothing to settle
    try:
        await spend.settle(
            get_async_redis(),
            organization_id=organization_id,
            request_id=request_id,
            reserved=admission.reserved_nanos,
            cost=cost,
            reserved_project_id=admission.reserved_project_id,
            held=admission.held,
        )
    except Exception:
        # A lost settlement leaves the reservation in place: the organization can spend
        # less than it has until its wallet is resynchronised, never more.
        logger.exception("settling %s failed", request_id)


# --- generation ---------------------------------------------------------------------------


@dataclass
class Generation:
    """One admitted generation request, from dispatch to settlement."""

    request_id: str
    spec: EndpointSpec
    limits: Limits
    admission: Admission
    prompt_tokens: int
    reserved_tokens: int
    deadline: float
    organization_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    finished: bool = False
    ticket: dispatch.Ticket | None = None

    def headers(self) -> dict[str, str]:
        return self.admission.headers()

    def events(self) -> AsyncIterator[dict[str, str]]:
        assert self.ticket is not None, "a generation's events are read after it was sent"
        return dispatch.events(self.ticket)

    async def settle(self) -> None:
        used = self.prompt_tokens + self.completion_tokens
        metrics.GATEWAY_TOKENS.labels("input").inc(self.prompt_tokens)
        metrics.GATEWAY_TOKENS.labels("output").inc(self.completion_tokens)
        try:
            await limiter().refund(self.limits, tokens=self.reserved_tokens - used)
        except Exception:  # a refund lost to a Redis hiccup only makes limits stricter
            logger.warning("could not refund %s tokens", self.reserved_tokens - used)
        await _settle_money(
            self.organization_id,
            self.request_id,
            self.admission,
            self.prompt_tokens,
            self.completion_tokens,
        )


async def _start_generation(
    request: HttpRequest,
    identity: KeyIdentity,
    spec: EndpointSpec,
    prompt_ids: list[int],
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
) -> Generation:
    prompt_tokens = len(prompt_ids)
    room = spec.context_length - prompt_tokens
    if max_tokens is None:
        if room < 1:
            raise text.context_exceeded(spec, prompt_tokens, 1)
        max_tokens = min(room, settings.MANTLE_DEFAULT_MAX_TOKENS)
    elif max_tokens > room:
        raise text.context_exceeded(spec, prompt_tokens, max_tokens)
    reserved = prompt_tokens + max_tokens
    limits = _limits(identity, spec)
    request_id = _request_id(request)
    admission = await _admit(
        limits, spec, identity.organization_id, prompt_tokens, max_tokens, request_id
    )
    deadline = time.time() + settings.MANTLE_REQUEST_TIMEOUT_S
    payload = contract.GenerateRequest(
        request_id=request_id,
        model=_model_ref(spec),
        identity=_identity(identity, spec),
        prompt_token_ids=tuple(prompt_ids),
        sampling=contract.SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stops(),
        ),
        deadline=deadline,
        enqueued_at=time.time(),
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
    )
    generation.ticket = await _submit(
        contract.TaskName.GENERATE,
        payload,
        spec=spec,
        request_id=request_id,
        deadline=deadline,
        on_refused=generation.settle,
    )
    return generation


async def _gather(gen: Generation) -> tuple[str, str]:
    """Runs a generation to its end: (text, finish_reason)."""
    parts: list[str] = []
    finish = "stop"
    try:
        async for event in gen.events():
            kind = event.get("type")
            if kind == contract.EVENT_DELTA:
                parts.append(event.get("text", ""))
                gen.completion_tokens += int(event.get("tokens", 0) or 0)
            elif kind == contract.EVENT_DONE:
                finish = event.get("finish_reason", "stop")
                gen.prompt_tokens = int(event.get("prompt_tokens", gen.prompt_tokens))
                gen.completion_tokens = int(event.get("completion_tokens", gen.completion_tokens))
                gen.finished = True
            elif kind == contract.EVENT_ERROR:
                raise dispatch.worker_error(event)
    except asyncio.CancelledError:
        await dispatch.cancel(gen.request_id)  # the client went away: stop generating
        raise
    except OpenAIError:
        await dispatch.cancel(gen.request_id)
        raise
    finally:
        await gen.settle()
    return "".join(parts), finish


def _usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream(
    gen: Generation,
    make_chunk: Callable[[str | None, str | None, bool], dict[str, Any]],
    include_usage: bool,
    usage_chunk: Callable[[], dict[str, Any]],
) -> AsyncGenerator[bytes, None]:
    """SSE relay of a generation; a disconnect (cancellation) stops the worker."""
    try:
        yield _sse(make_chunk(None, None, True))
        async for event in gen.events():
            kind = event.get("type")
            if kind == contract.EVENT_DELTA:
                gen.completion_tokens += int(event.get("tokens", 0) or 0)
                if event.get("text"):
                    yield _sse(make_chunk(event["text"], None, False))
            elif kind == contract.EVENT_DONE:
                gen.prompt_tokens = int(event.get("prompt_tokens", gen.prompt_tokens))
                gen.completion_tokens = int(event.get("completion_tokens", gen.completion_tokens))
                gen.finished = True
                yield _sse(make_chunk(None, event.get("finish_reason", "stop"), False))
                if include_usage:
                    yield _sse(usage_chunk())
            elif kind == contract.EVENT_ERROR:
                raise dispatch.worker_error(event)
        yield b"data: [DONE]\n\n"
    except OpenAIError as exc:
        # Mid-stream errors travel in-band, the way OpenAI sends them.
        await dispatch.cancel(gen.request_id)
        yield _sse(exc.body())
    except REDIS_DOWN as exc:
        # The response has started: the outage travels in-band too. The cancel
        # cannot reach Redis now; the worker stops at the request's deadline.
        logger.warning("redis unreachable mid-stream of %s: %s", gen.request_id, exc)
        await forget_idle_redis_connections()
        yield _sse(redis_unavailable().body())
    except (asyncio.CancelledError, GeneratorExit):
        await dispatch.cancel(gen.request_id)
        raise
    finally:
        await gen.settle()


class RelayResponse(StreamingHttpResponse):
    """An SSE relay that the ASGI handler can stop when the client stops reading.

    Django closes the iterator it wraps around the stream, not the stream itself: that is
    left to the garbage collector. `aclose_stream` cancels the generation now.
    """

    def __init__(self, stream: AsyncGenerator[bytes, None], **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self._relay = stream

    async def aclose_stream(self) -> None:
        await self._relay.aclose()


def _streaming_response(stream: AsyncGenerator[bytes, None], gen: Generation) -> RelayResponse:
    response = RelayResponse(stream, content_type="text/event-stream")
    response["cache-control"] = "no-cache"
    response["x-accel-buffering"] = "no"
    for name, value in gen.headers().items():
        response[name] = value
    return response


def _max_tokens(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


@gateway_view
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    _method(request, "POST")
    body = _parse(request, ChatCompletionRequest)
    identity, spec = await resolve(request, body.model)
    assert spec is not None
    _require_kind(spec, {"chat"}, "v1/chat/completions")
    try:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
    except ValueError as exc:
        raise invalid(str(exc), "messages") from exc
    prompt = await text.render_chat(spec, messages, identity.organization_id)
    prompt_ids = await text.encode(spec, prompt, "messages")
    gen = await _start_generation(
        request,
        identity,
        spec,
        prompt_ids,
        body,
        _max_tokens(body.max_completion_tokens, body.max_tokens),
    )
    completion_id = f"chatcmpl-{gen.request_id.removeprefix('req_')}"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(content: str | None, finish: str | None, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if first:
            delta = {"role": "assistant", "content": "", "refusal": None}
        elif content is not None:
            delta = {"content": content}
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": body.model,
            "system_fingerprint": f"fp_{spec.sha256[:10]}",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk() -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": gen.created,
            "model": body.model,
            "system_fingerprint": f"fp_{spec.sha256[:10]}",
            "choices": [],
            "usage": _usage(gen),
        }

    if body.stream:
        return _streaming_response(_stream(gen, chunk, include_usage, usage_chunk), gen)
    content, finish = await _gather(gen)
    return _json(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": gen.created,
            "model": body.model,
            "system_fingerprint": f"fp_{spec.sha256[:10]}",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(gen),
        },
        headers=gen.headers(),
    )


@gateway_view
async def completions(request: HttpRequest) -> HttpResponseBase:
    _method(request, "POST")
    body = _parse(request, CompletionRequest)
    identity, spec = await resolve(request, body.model)
    assert spec is not None
    _require_kind(spec, {"chat", "completion"}, "v1/completions")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid("Only one prompt per request is supported.", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = await text.encode(spec, prompt, "prompt")
    else:
        prompt_ids = text.check_token_ids(spec, prompt, "prompt")  # type: ignore[arg-type]
    if body.suffix:
        raise invalid("suffix is not supported", "suffix")
    if not prompt_ids:
        raise invalid("prompt must not be empty", "prompt")
    gen = await _start_generation(request, identity, spec, prompt_ids, body, body.max_tokens)
    completion_id = f"cmpl-{gen.request_id.removeprefix('req_')}"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(content: str | None, finish: str | None, first: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": gen.created,
            "model": body.model,
            "system_fingerprint": f"fp_{spec.sha256[:10]}",
            "choices": [
                {"text": content or "", "index": 0, "logprobs": None, "finish_reason": finish}
            ],
        }
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk() -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": gen.created,
            "model": body.model,
            "choices": [],
            "usage": _usage(gen),
        }

    if body.stream:
        return _streaming_response(_stream(gen, chunk, include_usage, usage_chunk), gen)
    content, finish = await _gather(gen)
    return _json(
        {
            "id": completion_id,
            "object": "text_completion",
            "created": gen.created,
            "model": body.model,
            "system_fingerprint": f"fp_{spec.sha256[:10]}",
            "choices": [{"text": content, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": _usage(gen),
        },
        headers=gen.headers(),
    )


# --- embeddings ---------------------------------------------------------------------------


async def _embedding_inputs(spec: EndpointSpec, value: Any) -> list[list[int]]:
    if isinstance(value, str):
        items: list[Any] = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise invalid("input must not be empty", "input")
    if len(items) > 2048:
        raise invalid("input may hold at most 2048 items", "input")
    out = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise invalid(f"input[{index}] must not be an empty string", "input")
            ids = await text.encode(spec, item, "input")
        else:
            if not item:
                raise invalid(f"input[{index}] must not be empty", "input")
            ids = text.check_token_ids(spec, item, "input")[: spec.max_input_tokens]
        out.append(ids)
    return out


@gateway_view
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    _method(request, "POST")
    body = _parse(request, EmbeddingRequest)
    identity, spec = await resolve(request, body.model)
    assert spec is not None
    _require_kind(spec, {"embedding"}, "v1/embeddings")
    if body.dimensions is not None and body.dimensions != spec.dimensions:
        raise invalid(
            f"This model produces {spec.dimensions}-dimensional embeddings; "
            f"dimensions={body.dimensions} is not supported.",
            "dimensions",
        )
    inputs = await _embedding_inputs(spec, body.input)
    prompt_tokens = sum(len(i) for i in inputs)
    limits = _limits(identity, spec)
    request_id = _request_id(request)
    admission = await _admit(limits, spec, identity.organization_id, prompt_tokens, 0, request_id)
    deadline = time.time() + settings.MANTLE_REQUEST_TIMEOUT_S
    payload = contract.EmbedRequest(
        request_id=request_id,
        model=_model_ref(spec),
        identity=_identity(identity, spec),
        inputs=tuple(tuple(i) for i in inputs),
        deadline=deadline,
        enqueued_at=time.time(),
    )
    ticket = await _submit(
        contract.TaskName.EMBED,
        payload,
        spec=spec,
        request_id=request_id,
        deadline=deadline,
        on_refused=lambda: _settle_money(identity.organization_id, request_id, admission, 0, 0),
    )
    matrix: np.ndarray | None = None
    try:
        async for event in dispatch.events(ticket):
            if event.get("type") == contract.EVENT_EMBEDDINGS:
                dims = int(event["dims"])
                raw = base64.b64decode(event["data"])
                matrix = np.frombuffer(raw, dtype="<f4").reshape(int(event["count"]), dims)
                prompt_tokens = int(event.get("prompt_tokens", prompt_tokens))
            elif event.get("type") == contract.EVENT_ERROR:
                raise dispatch.worker_error(event)
    except asyncio.CancelledError:
        await dispatch.cancel(request_id)
        await _settle_money(identity.organization_id, request_id, admission, 0, 0)
        raise
    except OpenAIError:
        await _settle_money(identity.organization_id, request_id, admission, 0, 0)
        raise
    await _settle_money(identity.organization_id, request_id, admission, prompt_tokens, 0)
    metrics.GATEWAY_TOKENS.labels("input").inc(prompt_tokens)
    if matrix is None:
        raise OpenAIError(500, "The worker returned no embeddings.", type_="server_error")
    data = []
    for index, row in enumerate(matrix):
        vector: Any = (
            base64.b64encode(row.astype("<f4").tobytes()).decode()
            if body.encoding_format == "base64"
            else row.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return _json(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        },
        headers=admission.headers(),
    )


# --- models -------------------------------------------------------------------------------


def _model_card(spec: EndpointSpec) -> dict[str, Any]:
    return {
        "id": spec.public_id,
        "object": "model",
        "created": spec.created,
        "owned_by": "mantle" if spec.public else spec.organization_id,
    }


def _visible_specs(organization_id: str) -> list[EndpointSpec]:
    return [endpoint_spec(e) for e in endpoints_visible_to(organization_id)]


@gateway_view
async def list_models(request: HttpRequest) -> HttpResponse:
    _method(request, "GET")
    identity, _ = await resolve(request, None)
    found = await database_read(_visible_specs, identity.organization_id)
    return _json({"object": "list", "data": [_model_card(s) for s in found if s.active]})


@gateway_view
async def no_route(request: HttpRequest) -> HttpResponse:
    """Any other path under /v1: OpenAI's JSON 404 (its wording), not Django's HTML page."""
    shown = request.path if len(request.path) <= 200 else f"{request.path[:200]}..."
    raise OpenAIError(404, f"Invalid URL ({request.method} {shown})", type_="invalid_request_error")


@gateway_view
async def retrieve_model(request: HttpRequest, model_id: str) -> HttpResponse:
    _method(request, "GET")
    try:
        _, spec = await resolve(request, model_id)
    except OpenAIError as exc:
        if exc.code == "endpoint_paused":
            raise model_not_found(model_id) from exc
        raise
    assert spec is not None
    return _json(_model_card(spec))
