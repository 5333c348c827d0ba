"""HTTP replies of the /v1 API: JSON bodies, OpenAI-shaped errors, event streams, the 404.

The endpoint modules (gateway/endpoints/) shape their bodies from gateway.protocol's types
and hand them here; nothing in this module knows an endpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from core import metrics, turns
from gateway.backends import (
    DATABASE_DOWN,
    REDIS_DOWN,
    database_unavailable,
    forget_idle_redis_connections,
    redis_unavailable,
)
from gateway.errors import OpenAIError, internal_error
from gateway.pipeline import Delta, Generation, request_id_of

logger = logging.getLogger(__name__)

View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]


def json_reply(
    body: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> HttpResponse:
    response = HttpResponse(json.dumps(body), status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def gateway_view(view: View) -> View:
    """Turns OpenAIErrors into replies and times the request (openai-processing-ms)."""

    @csrf_exempt
    async def wrapper(request: HttpRequest, **kwargs: str) -> HttpResponseBase:
        started = time.perf_counter()
        nested = turns.holding()  # called by a view whose request holds the turn: its own
        metrics.INFLIGHT.inc()
        try:
            try:
                response = await view(request, **kwargs)
            finally:
                if not nested:
                    turns.give_up()  # before any error's handling, which may wait
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
            response = internal_error(request_id_of(request)).response()
        finally:
            metrics.INFLIGHT.dec()
        response["openai-processing-ms"] = str(int((time.perf_counter() - started) * 1000))
        return response

    wrapper.__name__ = view.__name__
    wrapper.__doc__ = view.__doc__
    return wrapper


# --- event streams --------------------------------------------------------------------------


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event: `data: <compact JSON>` and a blank line."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def relay_sse(
    generation: Generation,
    *,
    opening: Sequence[Mapping[str, Any]],
    chunks: Callable[[Delta], Sequence[Mapping[str, Any]]],
    usage: Callable[[], Mapping[str, Any]] | None,
) -> AsyncGenerator[bytes, None]:
    """A generation as OpenAI streams it: the opening chunks, the chunks the endpoint makes
    of each event read (text, a choice's finish, the end), the usage chunk if asked for,
    then `[DONE]`. A disconnect (the stream closed or cancelled) stops the worker; errors
    after the start travel in-band."""
    async with generation:
        # The handlers sit inside the block, so the order is the old relay's: cancel the
        # worker, send the error in-band, then settle on leaving (after an outage, on a
        # fresh connection: the idle ones are dropped first).
        try:
            for chunk in opening:
                yield sse(chunk)
            async for event in generation.events():
                read = generation.read(event)
                if read is not None:
                    for chunk in chunks(read):
                        yield sse(chunk)
            if generation.finished and usage is not None:
                yield sse(usage())
            yield b"data: [DONE]\n\n"
        except OpenAIError as exc:
            # Mid-stream errors travel in-band, the way OpenAI sends them.
            await generation.cancel()
            yield sse(exc.body())
        except REDIS_DOWN as exc:
            # The response has started: the outage travels in-band too. The cancel
            # cannot reach Redis now; the worker stops at the request's deadline.
            logger.warning("redis unreachable mid-stream of %s: %s", generation.request_id, exc)
            await forget_idle_redis_connections()
            yield sse(redis_unavailable().body())


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


def streaming_reply(stream: AsyncGenerator[bytes, None], generation: Generation) -> RelayResponse:
    response = RelayResponse(stream, content_type="text/event-stream")
    response["cache-control"] = "no-cache"
    response["x-accel-buffering"] = "no"
    for name, value in generation.headers().items():
        response[name] = value
    return response


# --- unrouted paths -------------------------------------------------------------------------


@gateway_view
async def no_route(request: HttpRequest) -> HttpResponse:
    """Any other path under /v1: OpenAI's JSON 404 (its wording), not Django's HTML page."""
    shown = request.path if len(request.path) <= 200 else f"{request.path[:200]}..."
    raise OpenAIError(404, f"Invalid URL ({request.method} {shown})", type_="invalid_request_error")
