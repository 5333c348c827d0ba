"""Sending work to a pool's queue and reading the worker's events back from Redis."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from config.redis import get_async_redis
from gateway import publish
from gateway.errors import OpenAIError, no_capacity
from workers import contract

logger = logging.getLogger(__name__)

_TERMINAL = {contract.EVENT_DONE, contract.EVENT_ERROR, contract.EVENT_EMBEDDINGS}
_POLL_MS = 1000


def worker_lost() -> OpenAIError:
    return OpenAIError(
        502,
        "The worker serving this request stopped before finishing it. No further tokens "
        "will arrive; retry the request.",
        type_="server_error",
        code="worker_lost",
    )


def timed_out(seconds: float) -> OpenAIError:
    return OpenAIError(
        504,
        f"The request did not complete within {seconds:.0f} seconds.",
        type_="server_error",
        code="timeout",
    )


def worker_error(fields: Mapping[str, str]) -> OpenAIError:
    code = fields.get("code") or "server_error"
    message = fields.get("message") or "the worker failed to run the request"
    status = 400 if code in {"invalid_request", "context_length_exceeded"} else 500
    type_ = "invalid_request_error" if status == 400 else "server_error"
    return OpenAIError(status, message, type_=type_, code=code)


async def submit(
    task: str, payload: Mapping[str, Any], *, queue: str, request_id: str, deadline: float
) -> None:
    await publish.publish(
        task,
        {"payload": dict(payload)},
        queue=queue,
        task_id=request_id,
        # Absolute time: Celery reads a number as "seconds from now" (and AMQP then
        # refuses the resulting per-message TTL).
        expires=datetime.fromtimestamp(deadline, tz=UTC),
        now=datetime.now(tz=UTC),
    )


async def cancel(request_id: str) -> None:
    await get_async_redis().set(contract.cancel_key(request_id), "1", ex=300)


async def events(request_id: str, *, pool: str, deadline: float) -> AsyncIterator[dict[str, str]]:
    """The worker's events for a request, ending with a terminal one.

    Raises a clean error instead of hanging when the worker dies (its heartbeat
    key expires), when the pool loses its last worker before the request starts,
    or when the deadline passes.
    """
    client = get_async_redis()
    key = contract.response_stream_key(request_id)
    last_id = "0-0"
    node = ""
    # The stream is not deleted here: the worker gives it a short expiry with its
    # final event, which saves a round trip per request.
    while True:
        remaining = deadline - time.time()
        if remaining <= 0:
            raise timed_out(settings.MANTLE_REQUEST_TIMEOUT_S)
        block = max(1, int(min(_POLL_MS, remaining * 1000)))
        reply: Any = await client.xread({key: last_id}, block=block, count=512)
        if not reply:
            await _check_progress(node, pool)
            continue
        entries: list[tuple[str, dict[str, str]]] = reply[0][1]
        for entry_id, fields in entries:
            last_id = entry_id
            kind = fields.get("type", "")
            if kind == contract.EVENT_STARTED:
                node = fields.get("worker", "")
            yield fields
            if kind in _TERMINAL:
                return


async def _check_progress(node: str, pool: str) -> None:
    client = get_async_redis()
    if node:
        if not await client.exists(contract.worker_info_key(node)):
            logger.warning("worker %s stopped heartbeating mid-request", node)
            raise worker_lost()
        return
    horizon = time.time() - contract.HEARTBEAT_TTL_S
    if not await client.zcount(contract.pool_live_key(pool), horizon, "+inf"):
        raise no_capacity(pool)
