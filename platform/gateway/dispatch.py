"""Sending work to a pool's queue and reading the worker's events back from Redis."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from core.redis import get_async_redis
from gateway import publish
from gateway.errors import OpenAIError, no_capacity
from workers import contract

logger = logging.getLogger(__name__)

_TERMINAL = contract.FINAL_EVENTS
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


FLEX_RETRY_AFTER_S = 30
"""What a flex request refused for want of capacity is told to wait before trying again."""


def worker_error(fields: Mapping[str, str]) -> OpenAIError:
    code = fields.get("code") or "server_error"
    message = fields.get("message") or "the worker failed to run the request"
    if code == "resource_unavailable":
        # A flex request that could not start before its wait ran out: OpenAI's 429.
        return OpenAIError(
            429,
            f"Resource unavailable: {message}",
            type_="invalid_request_error",
            code="resource_unavailable",
            headers={"retry-after": str(FLEX_RETRY_AFTER_S)},
        )
    status = 400 if code in {"invalid_request", "context_length_exceeded"} else 500
    type_ = "invalid_request_error" if status == 400 else "server_error"
    return OpenAIError(status, message, type_=type_, code=code)


@dataclass
class Ticket:
    """A request sent to a pool: what was sent, so that it can be sent again."""

    task: str
    payload: Mapping[str, Any]
    queue: str
    pool: str
    request_id: str
    deadline: float
    submitted_at: float
    resent_for: set[str] = field(default_factory=set)
    """Dead nodes whose loss this request was already sent again for."""


async def submit(
    task: str,
    payload: Mapping[str, Any],
    *,
    queue: str,
    pool: str,
    request_id: str,
    deadline: float,
) -> Ticket:
    ticket = Ticket(task, dict(payload), queue, pool, request_id, deadline, time.time())
    await _publish(ticket)
    return ticket


async def _publish(ticket: Ticket) -> None:
    await publish.publish(
        ticket.task,
        {"payload": ticket.payload},
        queue=ticket.queue,
        task_id=ticket.request_id,
        # Absolute time: Celery reads a number as "seconds from now" (and AMQP then
        # refuses the resulting per-message TTL).
        expires=datetime.fromtimestamp(ticket.deadline, tz=UTC),
        now=datetime.now(tz=UTC),
    )


async def cancel(request_id: str) -> None:
    await get_async_redis().set(contract.cancel_key(request_id), "1", ex=300)


async def events(ticket: Ticket) -> AsyncIterator[dict[str, str]]:
    """The worker's events for a request, ending with a terminal one.

    Raises a clean error instead of hanging when the worker dies (its heartbeat
    key expires), when the pool loses its last worker before the request starts,
    or when the deadline passes. A request that a dead node took but never started
    is sent again, once per dead node, so a live worker of the pool runs it.
    """
    client = get_async_redis()
    key = contract.response_stream_key(ticket.request_id)
    last_id = "0-0"
    node = ""
    # The stream is not deleted here: the worker gives it a short expiry with its
    # final event, which saves a round trip per request.
    while True:
        remaining = ticket.deadline - time.time()
        if remaining <= 0:
            raise timed_out(settings.MANTLE_REQUEST_TIMEOUT_S)
        block = max(1, int(min(_POLL_MS, remaining * 1000)))
        reply: Any = await client.xread({key: last_id}, block=block, count=512)
        if not reply:
            await _check_progress(ticket, node)
            continue
        entries: list[tuple[str, dict[str, str]]] = reply[0][1]
        for entry_id, fields in entries:
            last_id = entry_id
            kind = fields.get("type", "")
            if kind == contract.EVENT_STARTED:
                worker = fields.get("worker", "")
                if node and worker != node:
                    # A node presumed dead (its request was sent again) came back and
                    # writes too: never mix two answers in one reply.
                    logger.warning(
                        "request %s: %s started it after %s did", ticket.request_id, worker, node
                    )
                    raise worker_lost()
                node = worker
            yield fields
            if kind in _TERMINAL:
                return


async def _check_progress(ticket: Ticket, node: str) -> None:
    """Nothing arrived for a while: is the request still in good hands?"""
    client = get_async_redis()
    if node:
        if not await client.exists(contract.worker_info_key(node)):
            logger.warning("worker %s stopped heartbeating mid-request", node)
            raise worker_lost()
        return
    # Not started yet: queued, or taken by a node that has not written yet. A node
    # that died holding it (taken from the broker, perhaps claimed) would keep it
    # until the broker's visibility timeout, far past the request's deadline.
    horizon = time.time() - contract.HEARTBEAT_TTL_S
    live_key = contract.pool_live_key(ticket.pool)
    pipe = client.pipeline(transaction=False)
    pipe.get(contract.task_claim_key(ticket.request_id))
    pipe.zcount(live_key, horizon, "+inf")
    # Nodes that beat since just before the request was sent and stopped since (dead
    # ones stay listed for a while after their last beat, see workers.heartbeat).
    pipe.zrangebyscore(live_key, ticket.submitted_at - contract.HEARTBEAT_TTL_S, f"({horizon}")
    owner, live, stopped = await pipe.execute()
    if not live:
        raise no_capacity(ticket.pool)
    dead = set(stopped)
    if owner and owner not in dead:
        beat = await client.zscore(live_key, owner)
        if beat is not None and beat >= horizon:
            return  # claimed by a live node: it writes soon
        dead.add(owner)  # claimed, then gone (its listing pruned, or never seen here)
    if not dead - ticket.resent_for:
        return
    ticket.resent_for |= dead
    logger.warning(
        "request %s: node %s stopped while the request was not started; sending it again",
        ticket.request_id,
        ", ".join(sorted(dead)),
    )
    await _publish(ticket)
