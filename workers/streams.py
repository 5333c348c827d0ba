"""The Redis side of a request: response stream events and the exactly-once usage event."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.contract import (
    EMIT_USAGE_LUA,
    EVENT_CHOICE_DONE,
    EVENT_DELTA,
    EVENT_DONE,
    EVENT_EMBEDDINGS,
    EVENT_ERROR,
    EVENT_PROMPT_LOGPROBS,
    EVENT_STARTED,
    EVENT_TENSORS,
    FINAL_EVENTS,
    RESPONSE_STREAM_DONE_TTL_S,
    RESPONSE_STREAM_TTL_S,
    USAGE_GUARD_TTL_S,
    USAGE_STREAM,
    UsageEvent,
    response_stream_key,
    usage_emitted_key,
)

if TYPE_CHECKING:
    import redis

    from workers.engine.base import RequestResult

logger = logging.getLogger(__name__)

# USAGE_GUARD_TTL_S (workers/contract.py): longer than any redelivery window of the broker,
# so a late copy still finds the guard.

# Guard and append in one script: a crash between a separate SET and XADD would
# either lose the event or (if the order were reversed) allow a second one.
_EMIT_USAGE_LUA = EMIT_USAGE_LUA


class ResponseWriter:
    """Buffers response-stream events and writes them in one pipeline per flush.

    One writer is shared by every request in a worker process: an engine step
    produces one delta for each running sequence, and a single round trip for
    the whole batch keeps Redis off the per-token critical path. Thread-safe:
    task threads add `started` events while the engine thread adds deltas.
    """

    def __init__(self, client: redis.Redis, *, ttl_s: int = RESPONSE_STREAM_TTL_S) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._pending: list[tuple[str, dict[str, str]]] = []
        self._buffer_lock = threading.Lock()
        # Serialises flushes so that events of one request reach Redis in the
        # order they were added even when two threads flush at once.
        self._flush_lock = threading.Lock()
        # When each open stream's expiry was last pushed back (monotonic time).
        self._expiry_set: dict[str, float] = {}
        # Streams that live longer than RESPONSE_STREAM_DONE_TTL_S after their final event.
        self._done_ttl: dict[str, int] = {}
        # Requests billed with their final event (`bill_with_final`): how to make each one's
        # usage event from its result, the events waiting for the next flush, and whether
        # the flush that carried a final event appended its usage event (True) or found it
        # already there (False).
        self._billing: dict[str, Callable[[RequestResult], UsageEvent]] = {}
        self._usage_pending: list[UsageEvent] = []
        self._billed: dict[str, bool] = {}
        # Requests whose submitter still waits for `billing_outcome` (until `forget_billing`):
        # an outcome is kept only for them, so a late flush leaves nothing behind.
        self._awaiting: set[str] = set()

    def bill_with_final(
        self, request_id: str, usage_of: Callable[[RequestResult], UsageEvent]
    ) -> None:
        """Write the usage event of `request_id` in the same transaction as its final event.

        The engine hands the request's result with its final event (`done`, `error` or
        `embeddings` with `result=`); `usage_of(result)` makes the event, and the flush that
        writes the final event appends it under its guard, atomically (MULTI/EXEC). A worker
        killed between the two writes would otherwise leave an answered request unbilled:
        a redelivered copy finds the final event and takes the request as finished.
        `billing_outcome` tells the submitter whether this happened; `forget_billing` drops
        both."""
        with self._buffer_lock:
            self._billing[request_id] = usage_of
            self._awaiting.add(request_id)

    def billing_outcome(self, request_id: str) -> bool | None:
        """Whether the flush that carried the request's final event appended its usage event
        (True) or found one there already (False); None if no flush did (the final event
        came without a result, or the flush failed): the caller emits it itself."""
        with self._buffer_lock:
            return self._billed.pop(request_id, None)

    def keep_after_final(self, request_id: str, ttl_s: int) -> None:
        """Let the stream of `request_id` live `ttl_s` after its final event, not the usual
        RESPONSE_STREAM_DONE_TTL_S: a batch line's, so that a batch runner that died after
        the worker finished reads the answer again (contract.BATCH_STREAM_DONE_TTL_S).
        Called before the request's first event; used up by the final event, and `forget`
        drops it when no final event came from here."""
        with self._buffer_lock:
            self._done_ttl[response_stream_key(request_id)] = ttl_s

    def forget(self, request_id: str) -> None:
        """Drop what `keep_after_final` recorded, if the final event has not used it."""
        with self._buffer_lock:
            self._done_ttl.pop(response_stream_key(request_id), None)

    def forget_billing(self, request_id: str) -> None:
        """Drop what `bill_with_final` recorded and its outcome, if still here."""
        with self._buffer_lock:
            self._billing.pop(request_id, None)
            self._billed.pop(request_id, None)
            self._awaiting.discard(request_id)

    def started(self, request_id: str, *, worker: str, pool: str) -> None:
        self._add(request_id, {"type": EVENT_STARTED, "worker": worker, "pool": pool})

    def delta(
        self,
        request_id: str,
        text: str,
        tokens: int,
        index: int | None = None,
        logprobs: list[Any] | None = None,
    ) -> None:
        fields = {"type": EVENT_DELTA, "text": text, "tokens": str(tokens)}
        if index is not None:
            fields["index"] = str(index)
        if logprobs is not None:
            fields["logprobs"] = _compact_json(logprobs)
        self._add(request_id, fields)

    def prompt_logprobs(self, request_id: str, logprobs: list[Any]) -> None:
        self._add(request_id, {"type": EVENT_PROMPT_LOGPROBS, "logprobs": _compact_json(logprobs)})

    def choice_done(
        self, request_id: str, index: int, finish_reason: str, completion_tokens: int
    ) -> None:
        self._add(
            request_id,
            {
                "type": EVENT_CHOICE_DONE,
                "index": str(index),
                "finish_reason": finish_reason,
                "completion_tokens": str(completion_tokens),
            },
        )

    def done(
        self,
        request_id: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        cached_tokens: int = 0,
        result: RequestResult | None = None,
    ) -> None:
        fields = {
            "type": EVENT_DONE,
            "finish_reason": finish_reason,
            "prompt_tokens": str(prompt_tokens),
            "completion_tokens": str(completion_tokens),
        }
        if cached_tokens:
            fields["cached_tokens"] = str(cached_tokens)
        self._add(request_id, fields, result)

    def embeddings(
        self,
        request_id: str,
        vectors: np.ndarray,
        prompt_tokens: int,
        *,
        result: RequestResult | None = None,
    ) -> None:
        data = np.ascontiguousarray(vectors, dtype="<f4")
        count, dims = data.shape
        self._add(
            request_id,
            {
                "type": EVENT_EMBEDDINGS,
                "data": base64.b64encode(data.tobytes()).decode("ascii"),
                "count": str(count),
                "dims": str(dims),
                "prompt_tokens": str(prompt_tokens),
            },
            result,
        )

    def tensors(
        self,
        request_id: str,
        outputs: Sequence[tuple[str, str, tuple[int, ...], bytes]],
        batch_requests: int,
    ) -> None:
        """The outputs of a v2 inference: (name, datatype, shape, little-endian bytes) each."""
        encoded = [
            {
                "name": name,
                "datatype": datatype,
                "shape": list(shape),
                "data": base64.b64encode(data).decode("ascii"),
            }
            for name, datatype, shape, data in outputs
        ]
        self._add(
            request_id,
            {
                "type": EVENT_TENSORS,
                "outputs": json.dumps(encoded, separators=(",", ":")),
                "batch_requests": str(batch_requests),
            },
        )

    def error(
        self, request_id: str, code: str, message: str, *, result: RequestResult | None = None
    ) -> None:
        self._add(request_id, {"type": EVENT_ERROR, "code": code, "message": message}, result)

    def _add(
        self, request_id: str, fields: dict[str, str], result: RequestResult | None = None
    ) -> None:
        usage = None
        if result is not None:
            with self._buffer_lock:
                usage_of = self._billing.pop(request_id, None)
            if usage_of is not None:
                try:
                    usage = usage_of(result)
                except Exception:  # the answer still goes out; its task bills it itself
                    logger.exception("usage event of %s not made with its final event", request_id)
        with self._buffer_lock:
            # One critical section: no flush can take the final event without its usage.
            self._pending.append((request_id, fields))
            if usage is not None:
                self._usage_pending.append(usage)

    def flush(self) -> None:
        with self._flush_lock:
            with self._buffer_lock:
                pending, self._pending = self._pending, []
                usages, self._usage_pending = self._usage_pending, []
            if not pending:
                return
            # A final event and its request's usage event go in one MULTI/EXEC; a flush of
            # deltas only needs no transaction.
            pipe = self._redis.pipeline(transaction=bool(usages))
            now = time.monotonic()
            touched: dict[str, bool] = {}  # key -> whether its request is finished
            for request_id, fields in pending:
                key = response_stream_key(request_id)
                pipe.xadd(key, fields)  # type: ignore[arg-type]
                touched[key] = touched.get(key, False) or fields["type"] in FINAL_EVENTS
            done_ttl: dict[str, int] = {}
            if self._done_ttl:
                with self._buffer_lock:
                    for key, final in touched.items():
                        if final and key in self._done_ttl:
                            done_ttl[key] = self._done_ttl.pop(key)
            for key, final in touched.items():
                # Pushing the expiry back on every token would double the
                # commands per step; a tenth of the TTL is often enough to
                # keep a slow stream alive. The final event sets a short one: the
                # gateway has read the stream by then and does not delete it.
                last = self._expiry_set.get(key)
                if final:
                    pipe.expire(key, done_ttl.get(key, RESPONSE_STREAM_DONE_TTL_S))
                    self._expiry_set.pop(key, None)
                elif last is None or now - last > self._ttl_s / 10:
                    pipe.expire(key, self._ttl_s)
                    self._expiry_set[key] = now
            for usage in usages:
                # EVAL, not a registered script's EVALSHA: that would ask SCRIPT EXISTS in a
                # round trip of its own before every such flush.
                pipe.eval(
                    _EMIT_USAGE_LUA,
                    2,
                    usage_emitted_key(usage.request_id),
                    USAGE_STREAM,
                    USAGE_GUARD_TTL_S,
                    *_flat(usage.to_fields()),
                )
            replies = pipe.execute()
            if usages:
                appended = replies[len(replies) - len(usages) :]
                with self._buffer_lock:
                    for usage, entry_id in zip(usages, appended, strict=True):
                        if usage.request_id in self._awaiting:
                            self._billed[usage.request_id] = bool(entry_id)
            if len(self._expiry_set) > 10_000:
                # Streams that never got a final event (their task gave up) must
                # not pin memory here forever.
                stale = now - self._ttl_s
                self._expiry_set = {k: t for k, t in self._expiry_set.items() if t > stale}


def _flat(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _compact_json(value: Any) -> str:
    # Log probabilities are finite by construction (sampling.LOGPROB_FLOOR): no NaN here.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def waive_usage(client: redis.Redis, request_id: str) -> bool:
    """Settle a request's usage with no event: set its guard, so that nothing bills it
    afterwards (a copy still running on a node thought dead included). Returns whether
    this call set it (False: an event, or another waiver, was there first).

    For a batch line whose attempt was lost mid-way: its partial output never reaches the
    customer, and the batch runner runs the line again under a new request id.
    """
    waived = bool(client.set(usage_emitted_key(request_id), "1", nx=True, ex=USAGE_GUARD_TTL_S))
    if waived:
        logger.info("usage of %s waived (a lost batch attempt)", request_id)
    return waived


def emit_usage(client: redis.Redis, event: UsageEvent) -> bool:
    """Append the usage event of a request unless one was already appended.

    Returns whether this call appended it. Safe to call any number of times
    for the same request id (redelivered tasks, retries): billing sees one.
    """
    script = client.register_script(_EMIT_USAGE_LUA)
    entry_id = script(
        keys=[usage_emitted_key(event.request_id), USAGE_STREAM],
        args=[USAGE_GUARD_TTL_S, *_flat(event.to_fields())],
    )
    if entry_id:
        logger.debug("usage event for %s appended as %s", event.request_id, entry_id)
        return True
    logger.info("usage event for %s already emitted; not appending again", event.request_id)
    return False


# How long a finished request's usage event is retried through a Redis outage. The
# answer has been streamed by then: an event that is never written is an unbilled
# request, so the worker thread waits for Redis rather than give up quickly.
USAGE_EMIT_RETRY_S = 60.0


def emit_usage_durably(
    client: redis.Redis, event: UsageEvent, *, within_s: float = USAGE_EMIT_RETRY_S
) -> bool:
    """`emit_usage`, retried with backoff while Redis is unreachable.

    Safe because `emit_usage` is idempotent: a script that ran but whose reply was lost
    answers "already emitted" on the retry. After `within_s` the event is logged in full
    at CRITICAL (replayable with XADD to the usage stream) and the error is raised.
    """
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    delay = 0.05
    give_up = time.monotonic() + within_s
    while True:
        try:
            return emit_usage(client, event)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if time.monotonic() + delay > give_up:
                logger.critical(
                    "usage event for %s not written (%s); replay with XADD %s: %s",
                    event.request_id,
                    exc,
                    USAGE_STREAM,
                    json.dumps(event.to_fields()),
                )
                raise
            logger.warning("usage event for %s: Redis unreachable, retrying", event.request_id)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
