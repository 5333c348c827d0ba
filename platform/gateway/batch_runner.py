"""The batch runner: validates a batch's input file, runs its lines through the gateway's
own endpoints in the batch class of work, and writes the output and error files.

One runner process (`manage.py run_batches`, a Procfile entry) runs a few batches at once,
each under a lease in the database that it renews; a runner that dies leaves its leases to
expire and another one (or itself, restarted) resumes. How a batch stays exactly once
(docs/batches.md):

- **Lines**: each finished line is stored as a `BatchLine` row, unique on (batch, line),
  in a transaction that also checks the lease; a resumed batch skips the stored lines. The
  output and error files are written from those rows, so every `custom_id` appears once.
- **Billing**: a line's request id is fixed by the batch, the line and the attempt. A
  runner that died after the worker answered and before the line was stored runs the line
  again under the same id: the worker never runs or bills a request id twice, and the
  answer is read again from its stream (kept `BATCH_STREAM_DONE_TTL_S`). An attempt lost
  with its worker is not billed (the worker's redelivery path) and runs again as the next
  attempt.
- **Priority**: lines go to the same pool queues as online traffic, but a runner keeps at
  most what the pool's live nodes say they take now (`batch_capacity` in their heartbeats)
  in flight, counted across runners in Redis; the engines admit online requests first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, OuterRef, Q, Subquery, Sum
from django.db.models.functions import Coalesce, Length
from django.http import HttpRequest, HttpResponseBase
from django.utils import timezone
from pydantic import ValidationError

from accounts.models import ApiKey, Organization
from catalog.selectors import endpoint_spec_load
from core.redis import get_async_redis
from gateway import files
from gateway.backends import database_read
from gateway.batches import ACTIVE, QUEUED, Status, output_expiry
from gateway.endpoints import chat, completions, embeddings, responses
from gateway.limits import model_allowed
from gateway.models import Batch, BatchLine
from gateway.pipeline import serving_class
from gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from gateway.protocol_batches import (
    ERRORS_LISTED,
    BatchError,
    BatchLineRequest,
    LineError,
    OutputLine,
)
from gateway.protocol_responses import ResponseCreateRequest
from workers import contract

logger = logging.getLogger(__name__)

View = Callable[..., Awaitable[HttpResponseBase]]
VIEWS: dict[str, View] = {
    "/v1/chat/completions": chat.chat_completions,
    "/v1/completions": completions.completions,
    "/v1/embeddings": embeddings.embeddings,
    "/v1/responses": responses.responses,
}
# The endpoints' own request models: the queue limit's estimate reads a line's numbers as
# the endpoint will (`"n": "8"` is 8 to it, so it is 8 to the estimate too).
REQUESTS: dict[str, type[Any]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/responses": ResponseCreateRequest,
}

MAX_ATTEMPTS = 3
"""Tries of a line that failed for the platform's reasons (a lost worker, a timeout, a 5xx)."""
RETRIED = frozenset({500, 502, 503, 504})
FLUSH_ROWS = 500
FLUSH_S = 0.25
READ_AHEAD = 1024
"""Input lines read ahead of those running: the input is streamed, never held whole."""
SLOT_TTL_S = 20.0
"""A runner renews its lines' slots in the pool's Redis set; a dead runner's expire."""
CAPACITY_TTL_S = 1.0
MESSAGE_MAX_CHARS = 256
PARAM_MAX_CHARS = 64
"""A validation error's texts are cut to these: 100 errors stay a few tens of KB."""


def runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def slots_key(pool: str) -> str:
    return f"mantle:batch:slots:{pool}"


# --- leases ---------------------------------------------------------------------------------


def batch_claim(runner: str, exclude: list[str]) -> Batch | None:
    """Takes a batch that needs a runner and has none (no lease, or an expired one; a
    parked batch's back-off is a lease with no runner): its lease is this runner's for
    MANTLE_BATCH_LEASE_S. Organizations take turns: the batch chosen belongs to the
    organization with the fewest batches running now, its oldest first, and an organization
    with MANTLE_BATCH_ORG_RUNNING batches running already waits, so one customer's pile of
    batches cannot hold every runner while another's waits."""
    now = timezone.now()
    running = Batch.objects.filter(status__in=ACTIVE, lease_until__gte=now).exclude(runner="")
    busy = (
        running.values("organization_id")
        .annotate(running=Count("id"))
        .filter(running__gte=settings.MANTLE_BATCH_ORG_RUNNING)
        .values("organization_id")
    )
    its_running = (
        running.filter(organization_id=OuterRef("organization_id"))
        .order_by()
        .values("organization_id")
        .annotate(c=Count("id"))
        .values("c")
    )
    with transaction.atomic():
        found = (
            Batch.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(status__in=ACTIVE)
            .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
            .exclude(id__in=exclude)
            .exclude(organization_id__in=busy)
            .annotate(org_running=Coalesce(Subquery(its_running), 0))
            .order_by("org_running", "created_at")
            .first()
        )
        if found is None:
            return None
        found.runner = runner
        found.lease_until = now + timedelta(seconds=settings.MANTLE_BATCH_LEASE_S)
        found.save(update_fields=["runner", "lease_until"])
    return found


def batch_renew(batch_id: str, runner: str) -> tuple[str, datetime] | None:
    """Extends this runner's lease; the batch's status and end of its window, or None when
    the lease is lost."""
    until = timezone.now() + timedelta(seconds=settings.MANTLE_BATCH_LEASE_S)
    updated = Batch.objects.filter(id=batch_id, runner=runner).update(lease_until=until)
    if not updated:
        return None
    status, expires_at = Batch.objects.values_list("status", "expires_at").get(id=batch_id)
    return status, expires_at


def batch_release(batch_id: str, runner: str, *, back_off_s: float = 0.0) -> None:
    """Lets go of the batch; with `back_off_s`, no runner takes it for that long (a batch
    parked while its pool has no capacity for batches)."""
    until = timezone.now() + timedelta(seconds=back_off_s) if back_off_s > 0 else None
    Batch.objects.filter(id=batch_id, runner=runner).update(lease_until=until, runner="")


class LeaseLost(Exception):
    """Another runner holds the batch now: this one stops without writing anything."""


class LinesNotStored(Exception):
    """Finished lines could not all be stored (or a finalize found fewer stored lines than the
    batch holds): the batch is taken up again later and runs what is missing."""


def _held(batch_id: str, runner: str) -> Batch:
    found = Batch.objects.select_for_update().filter(id=batch_id, runner=runner).first()
    if found is None:
        raise LeaseLost(batch_id)
    return found


# --- validation -----------------------------------------------------------------------------


@dataclass
class Validated:
    total: int = 0
    model: str = ""
    tokens: int = 0
    errors: list[BatchError] = field(default_factory=list)
    error_count: int = 0

    def fail(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        """Records an error; its texts are cut (a customer's member names end up in them, and
        the errors are stored on the batch and read with it)."""
        self.error_count += 1
        if len(self.errors) < ERRORS_LISTED:
            shown = param[:PARAM_MAX_CHARS] if param is not None else None
            self.errors.append(
                {"code": code, "message": message[:MESSAGE_MAX_CHARS], "param": shown, "line": line}
            )


def _max_tokens_of(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return int(settings.MANTLE_DEFAULT_MAX_TOKENS)


def estimate_tokens(raw: bytes, body: dict[str, Any], endpoint: str) -> int:
    """A line's enqueued tokens for the batch queue limit: its bytes / 4 for the input (no
    tokenizer runs at validation), plus what it may generate (`max_tokens` or the default,
    times `n`), read through the endpoint's own request model so that numbers the endpoint
    coerces (`"8"`, `8.0`) count as it will run them. A body the endpoint refuses counts its
    bytes only: that line will be a 400, never run nor billed."""
    tokens = len(raw) // 4 + 1
    if endpoint == "/v1/embeddings":
        return tokens
    try:
        parsed = REQUESTS[endpoint].model_validate(body)
    except ValidationError:
        return tokens
    numbers = parsed.model_dump(
        include={"max_completion_tokens", "max_tokens", "max_output_tokens", "n"}
    )
    n = numbers.get("n")
    return tokens + _max_tokens_of(numbers) * (n if isinstance(n, int) and n > 0 else 1)


NOT_ALLOWED_PREFIX = "This API key is not allowed to use the model "


def validate_lines(batch: Batch, lines: Iterator[tuple[int, bytes]]) -> Validated:
    """Every line checked before anything runs: JSON, `custom_id` unique, `method`, `url`
    the batch's endpoint, one model that exists and that the organization may use, no
    streaming, the size of a request body. Errors name their line numbers."""
    out = Validated()
    seen: set[bytes] = set()
    max_lines = settings.MANTLE_BATCH_MAX_LINES
    max_line = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    models_checked: dict[str, str] = {}  # model -> "" (usable) or the error
    # The key that created the batch may be limited to some models (its allowlist).
    allowed = ApiKey.objects.filter(id=batch.api_key_id).values_list("allowed_models", flat=True)
    allowed_models: list[str] = list(allowed.first() or ())
    for number, raw in lines:
        if not raw.strip():
            continue  # a blank line (a trailing newline, say) is no request
        out.total += 1
        if out.total > max_lines:
            out.fail(
                None,
                "too_many_requests",
                f"A batch holds at most {max_lines} requests (MANTLE_BATCH_MAX_LINES).",
            )
            break
        if len(raw) > max_line:
            out.fail(
                number,
                "line_too_large",
                f"The line is {len(raw)} bytes; a request body may be at most {max_line}.",
            )
            continue
        try:
            parsed = BatchLineRequest.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p)[:PARAM_MAX_CHARS] for p in err["loc"])[:PARAM_MAX_CHARS] or None
            code = "invalid_json_line" if err["type"] == "json_invalid" else "invalid_request"
            out.fail(number, code, f"{where or 'line'}: {err['msg']}", where)
            continue
        digest = hashlib.blake2b(parsed.custom_id.encode(), digest_size=16).digest()
        if digest in seen:
            out.fail(
                number,
                "duplicate_custom_id",
                f"The custom_id '{parsed.custom_id[:64]}' is used by an earlier line.",
                "custom_id",
            )
            continue
        seen.add(digest)
        if parsed.url != batch.endpoint:
            out.fail(
                number,
                "invalid_url",
                f"The line's url '{parsed.url}' is not the batch's endpoint {batch.endpoint}.",
                "url",
            )
            continue
        if parsed.body.get("stream"):
            out.fail(number, "invalid_request", "A batch line cannot stream.", "body.stream")
            continue
        model = parsed.body.get("model")
        if not isinstance(model, str) or not model:
            out.fail(number, "missing_required_parameter", "body.model is required.", "body.model")
            continue
        if model not in models_checked:
            spec = endpoint_spec_load(model) if len(model) <= 256 else None
            usable = spec is not None and spec.visible_to(batch.organization_id)
            models_checked[model] = (
                ""
                if usable
                else f"The model `{model[:64]}` does not exist or you do not have access to it."
            )
            if (
                spec is not None
                and usable
                and not model_allowed(allowed_models, spec.model_name, spec.name, spec.id)
            ):
                models_checked[model] = NOT_ALLOWED_PREFIX + f"'{model[:64]}'."
        if models_checked[model]:
            message = models_checked[model]
            code = (
                "model_not_allowed" if message.startswith(NOT_ALLOWED_PREFIX) else "model_not_found"
            )
            out.fail(number, code, message, "body.model")
            continue
        if out.model and model != out.model:
            out.fail(
                number,
                "mismatched_model",
                f"Every line of a batch uses one model: '{out.model}' before, '{model[:64]}' here.",
                "body.model",
            )
            continue
        out.model = model
        out.tokens += estimate_tokens(raw, parsed.body, batch.endpoint)
    if out.total == 0 and not out.errors:
        out.fail(None, "empty_file", "The input file holds no requests.")
    return out


def numbered(file: Any) -> Iterator[tuple[int, bytes]]:
    yield from enumerate(files.iter_lines(file), start=1)


def batch_validate(batch_id: str, runner: str) -> str:
    """Validates the input file and moves the batch to in_progress, or to failed with the
    line errors (nothing ran, nothing is billed). Returns the new status."""
    batch = Batch.objects.get(id=batch_id)
    if batch.runner != runner:
        raise LeaseLost(batch_id)
    file = files.get_file(batch.organization_id, batch.input_file_id)
    if file is None:
        result = Validated()
        result.fail(None, "file_not_found", f"The input file {batch.input_file_id} is gone.")
    else:
        try:
            result = validate_lines(batch, numbered(file))
        except files.LineTooLong as exc:
            result = Validated()
            result.fail(exc.line, "line_too_large", str(exc))
    with transaction.atomic():
        # The organization's row serializes the queue-limit check of its batches.
        Organization.objects.select_for_update().filter(id=batch.organization_id).first()
        held = _held(batch_id, runner)
        if held.status != Status.VALIDATING:
            return held.status  # cancelled meanwhile: the run path writes it out
        now = timezone.now()
        if not result.errors:
            limit = settings.MANTLE_BATCH_QUEUE_TOKENS
            queued = 0
            for other in Batch.objects.filter(
                organization_id=batch.organization_id, status__in=QUEUED
            ).exclude(id=batch_id):
                queued += int(json.loads(other.model_tokens_json or "{}").get(result.model, 0))
            if queued + result.tokens > limit:
                result.fail(
                    None,
                    "token_limit_exceeded",
                    f"Enqueued token limit reached for {result.model}: this batch's "
                    f"{result.tokens} estimated tokens on top of {queued} already queued "
                    f"exceed the organization's {limit} (MANTLE_BATCH_QUEUE_TOKENS). Wait for "
                    "batches to finish, or split this one.",
                )
        if result.errors:
            listed = list(result.errors)
            if result.error_count > len(listed):
                listed[-1]["message"] += f" ({result.error_count} errors in all)"
            held.status = Status.FAILED
            held.failed_at = now
            held.errors_json = json.dumps(listed)
            held.request_total = result.total
            held.runner, held.lease_until = "", None
        else:
            held.status = Status.IN_PROGRESS
            held.in_progress_at = now
            held.request_total = result.total
            held.model_tokens_json = json.dumps({result.model: result.tokens})
        held.save()
        return held.status


# --- running --------------------------------------------------------------------------------


def batch_load(batch_id: str) -> Batch:
    return Batch.objects.get(id=batch_id)


def batch_done_lines(batch_id: str) -> set[int]:
    return set(BatchLine.objects.filter(batch_id=batch_id).values_list("line", flat=True))


_INSERT_LINES = (
    f"INSERT INTO {BatchLine._meta.db_table} (batch_id, line, ok, output_json) "  # noqa: S608
    "VALUES {values} ON CONFLICT (batch_id, line) DO NOTHING RETURNING ok"
)
_COUNT_LINES = (
    f"UPDATE {Batch._meta.db_table} SET request_completed = request_completed + %s, "  # noqa: S608
    "request_failed = request_failed + %s WHERE id = %s"
)


def batch_store_lines(batch_id: str, runner: str, rows: list[tuple[int, bool, str]]) -> None:
    """Stores finished lines once each (a line already stored is left as it is) and counts
    those that were new, under the lease."""
    if not rows:
        return
    with transaction.atomic():
        _held(batch_id, runner)
        values = ",".join(["(%s,%s,%s,%s)"] * len(rows))
        params: list[Any] = []
        for line, ok, text in rows:
            params += [batch_id, line, ok, text]
        with connection.cursor() as cursor:
            cursor.execute(_INSERT_LINES.format(values=values), params)
            inserted = [r[0] for r in cursor.fetchall()]
        completed = sum(1 for ok in inserted if ok)
        failed = len(inserted) - completed
        if inserted:
            with connection.cursor() as cursor:
                cursor.execute(_COUNT_LINES, [completed, failed, batch_id])


def batch_output_bytes(batch_id: str) -> int:
    """The bytes of the batch's stored lines (what its output and error files will hold)."""
    total = BatchLine.objects.filter(batch_id=batch_id).aggregate(n=Sum(Length("output_json")))
    return int(total["n"] or 0)


def batch_key_digest(api_key_id: str) -> str:
    """The digest of the key that created the batch ("" once the key is deleted): its
    lines run under that key, so a revoked key stops them."""
    found = ApiKey.objects.filter(id=api_key_id).values_list("digest", flat=True).first()
    return found or ""


def batch_pool(model: str) -> str:
    spec = endpoint_spec_load(model)
    return spec.pool if spec is not None else ""


def batch_mark_expired(batch_id: str, runner: str) -> None:
    """Records that the window ended with lines not run (the batch ends `expired`)."""
    with transaction.atomic():
        held = _held(batch_id, runner)
        if held.expired_at is None:
            held.expired_at = timezone.now()
            held.save(update_fields=["expired_at"])


def batch_set_status(batch_id: str, runner: str, status: str) -> None:
    with transaction.atomic():
        held = _held(batch_id, runner)
        now = timezone.now()
        held.status = status
        stamp = {
            Status.FINALIZING: "finalizing_at",
            Status.EXPIRED: "expired_at",
            Status.CANCELLED: "cancelled_at",
        }.get(status)
        fields = ["status"]
        if stamp and getattr(held, stamp) is None:
            setattr(held, stamp, now)
            fields.append(stamp)
        held.save(update_fields=fields)


def line_request(path: str, body: bytes, request_id: str, digest: str) -> HttpRequest:
    """A line as the endpoint's view takes it: the body, the batch's key (by its digest,
    never a secret), the line's request id."""
    request = HttpRequest()
    request.method = "POST"
    request.path = request.path_info = path
    request.META = {
        "REQUEST_METHOD": "POST",
        "CONTENT_TYPE": "application/json",
        "REMOTE_ADDR": "batch-runner",
    }
    request._body = body
    request.request_id = request_id  # type: ignore[attr-defined]
    request.batch_key_digest = digest  # type: ignore[attr-defined]
    return request


_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  return 1
end
return 0
"""


class PoolSlots:
    """The batch lines in flight on a pool, across runners: at most the sum of what the
    pool's live nodes take now (`batch_capacity` in their heartbeats)."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._capacity = 0
        self._read_at = 0.0
        self.held: set[str] = set()

    async def capacity(self) -> int:
        now = time.time()
        if now - self._read_at < CAPACITY_TTL_S:
            return self._capacity
        client = get_async_redis()
        nodes = [
            str(n)
            for n in await client.zrangebyscore(
                contract.pool_live_key(self.pool), now - contract.HEARTBEAT_TTL_S, "+inf"
            )
        ]
        total = 0
        if nodes:
            infos = await client.mget([contract.worker_info_key(n) for n in nodes])
            for raw in infos:
                if not raw:
                    continue
                info = json.loads(raw)
                if "batch_capacity" in info:
                    total += int(info["batch_capacity"] or 0)
                else:  # a node of a release before batches: half its free threads
                    total += int(info.get("free_slots", 0) or 0) // 2
        self._capacity, self._read_at = total, now
        return total

    async def acquire(
        self,
        member: str,
        stopping: Callable[[], bool],
        may_park: Callable[[], bool] = lambda: False,
    ) -> bool | None:
        """Waits for a slot: True once it holds one, False if `stopping()` turns true first,
        None when the pool has offered batches nothing for MANTLE_BATCH_PARK_AFTER_S while
        `may_park()` (the batch has no line in flight and can let go of its runner)."""
        client = get_async_redis()
        delay = 0.01
        empty_since: float | None = None
        while not stopping():
            capacity = await self.capacity()
            if capacity <= 0:
                now = time.monotonic()
                empty_since = empty_since if empty_since is not None else now
                if now - empty_since >= settings.MANTLE_BATCH_PARK_AFTER_S and may_park():
                    return None
            else:
                empty_since = None
                now = time.time()
                got = await client.eval(
                    _ACQUIRE,
                    1,
                    slots_key(self.pool),
                    str(now),
                    str(capacity),
                    str(now + SLOT_TTL_S),
                    member,
                )
                if got:
                    self.held.add(member)
                    return True
            await asyncio.sleep(delay)
            delay = min(0.2, delay * 2)
        return False

    async def release(self, member: str) -> None:
        self.held.discard(member)
        await get_async_redis().zrem(slots_key(self.pool), member)

    async def renew(self) -> None:
        if self.held:
            until = time.time() + SLOT_TTL_S
            await get_async_redis().zadd(
                slots_key(self.pool), dict.fromkeys(self.held, until), xx=True
            )


class BatchRun:
    """One batch in one runner, from its current status to the end (or a lost lease)."""

    def __init__(self, batch: Batch, runner: str) -> None:
        self.batch = batch
        self.id = batch.id
        self.runner = runner
        self.short = batch.id.removeprefix("batch_")
        self.status = batch.status
        self.lost = False
        self.rows: list[tuple[int, bool, str]] = []
        self.slots: PoolSlots | None = None
        self.digest = ""
        self.draining = False  # the process stops: start no line, let those running finish
        self.parked = False  # the pool offers batches nothing: let go of the runner a while
        self.output_bytes = 0  # the stored lines' bytes, bounded by MANTLE_BATCH_OUTPUT_MAX_BYTES
        # Lines whose worker died under them twice (an input that kills workers, not a node
        # lost once), bounded by MANTLE_BATCH_MAX_WORKERS_LOST.
        self.workers_lost = 0

    def stopping(self) -> bool:
        return (
            self.lost
            or self.draining
            or self.status in (Status.CANCELLING, Status.CANCELLED)
            or self.output_full()
            or self.workers_lost >= settings.MANTLE_BATCH_MAX_WORKERS_LOST
            or self.expired()
        )

    def output_full(self) -> bool:
        return self.output_bytes >= settings.MANTLE_BATCH_OUTPUT_MAX_BYTES

    def expired(self) -> bool:
        return timezone.now() >= self.batch.expires_at

    async def run(self) -> None:
        keeper = asyncio.create_task(self._keep_lease())
        try:
            if self.status == Status.VALIDATING:
                self.status = await database_read(batch_validate, self.id, self.runner)
            if self.status in (Status.IN_PROGRESS, Status.CANCELLING):
                await self._run_lines()
            if self.draining or self.parked:
                return
            if self.status == Status.FINALIZING or self.status in (
                Status.IN_PROGRESS,
                Status.CANCELLING,
            ):
                await database_read(batch_finalize, self.id, self.runner)
        except LeaseLost:
            logger.warning("batch %s: lease lost to another runner; stopping", self.id)
        except Exception:
            # Stored lines stay stored; the batch is taken up again (here or elsewhere)
            # after a pause, from where it was.
            logger.exception("batch %s: the run failed; it resumes later", self.id)
            await asyncio.sleep(settings.MANTLE_BATCH_LEASE_S)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if not self.lost:
                back_off = settings.MANTLE_BATCH_PARK_S if self.parked else 0.0
                if self.parked:
                    logger.info(
                        "batch %s: pool %s offers batches no capacity; parked for %.0f s",
                        self.id,
                        self.slots.pool if self.slots else "",
                        back_off,
                    )
                try:
                    release = functools.partial(batch_release, back_off_s=back_off)
                    await database_read(release, self.id, self.runner)
                except Exception:  # the lease expires on its own
                    logger.warning("batch %s: releasing failed", self.id, exc_info=True)

    async def _keep_lease(self) -> None:
        every = max(1.0, settings.MANTLE_BATCH_LEASE_S / 3)
        while True:
            await asyncio.sleep(every)
            try:
                renewed = await database_read(batch_renew, self.id, self.runner)
            except Exception:
                logger.warning("batch %s: lease renewal failed", self.id, exc_info=True)
                continue
            if renewed is None:
                self.lost = True
                return
            status, self.batch.expires_at = renewed
            if status == Status.CANCELLING and self.status == Status.IN_PROGRESS:
                self.status = status
            if self.slots is not None:
                with contextlib.suppress(Exception):
                    await self.slots.renew()

    async def _run_lines(self) -> None:
        batch = self.batch = await database_read(batch_load, self.id)
        if batch.in_progress_at is None:
            # Cancelled while validating: no line was accepted, so none is written out.
            await database_read(batch_set_status, self.id, self.runner, Status.FINALIZING)
            self.status = Status.FINALIZING
            return
        model = next(iter(json.loads(batch.model_tokens_json or "{}")), "")
        self.digest = await database_read(batch_key_digest, batch.api_key_id)
        pool = await database_read(batch_pool, model) if model else ""
        self.slots = PoolSlots(pool)
        done = await database_read(batch_done_lines, self.id)
        self.output_bytes = await database_read(batch_output_bytes, self.id)
        file = await database_read(files.get_file, batch.organization_id, batch.input_file_id)
        running: set[asyncio.Task[None]] = set()
        flusher = asyncio.create_task(self._flush_every())
        try:
            if file is not None and not self.stopping():
                async for number, raw in _read_lines(file):
                    if number in done or not raw.strip():
                        continue
                    member = f"{self.id}:{number}"
                    got = await self.slots.acquire(member, self.stopping, lambda: not running)
                    if got is None:
                        self.parked = True
                    if not got:
                        break
                    task = asyncio.create_task(self._line(number, raw, member))
                    running.add(task)
                    task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            for task in running:
                task.cancel()
        if self.lost:
            raise LeaseLost(self.id)
        await self._flush_all()
        if self.draining or self.parked:
            return  # the runner lets go: the next one resumes from the stored lines
        if file is None or self.stopping():
            # Cancelled, expired or its input gone: every line that did not run is written
            # to the error file as such, so each custom_id still appears once.
            code, message = self._unrun_reason(file is None)
            if code == "batch_expired":
                await database_read(batch_mark_expired, self.id, self.runner)
            done = await database_read(batch_done_lines, self.id)
            if file is not None:
                async for number, raw in _read_lines(file):
                    if number in done or not raw.strip():
                        continue
                    self._unrun(number, raw, code, message)
                    if len(self.rows) >= FLUSH_ROWS:
                        await self._flush_all()
            await self._flush_all()
        final = Status.FINALIZING
        await database_read(batch_set_status, self.id, self.runner, final)
        self.status = final

    def _unrun_reason(self, file_gone: bool) -> tuple[str, str]:
        if file_gone:
            return "file_not_found", "The batch's input file was deleted before this line ran."
        if self.status in (Status.CANCELLING, Status.CANCELLED):
            return "batch_cancelled", "The batch was cancelled before this line ran."
        if self.workers_lost >= settings.MANTLE_BATCH_MAX_WORKERS_LOST:
            return (
                "batch_workers_lost",
                f"{self.workers_lost} of the batch's lines lost their worker on two tries "
                "(MANTLE_BATCH_MAX_WORKERS_LOST); it was stopped before this line ran.",
            )
        if self.output_full():
            limit = settings.MANTLE_BATCH_OUTPUT_MAX_BYTES
            return (
                "batch_output_limit",
                f"The batch's answers reached {limit} bytes (MANTLE_BATCH_OUTPUT_MAX_BYTES) "
                "before this line ran; run it in another batch.",
            )
        return "batch_expired", "The batch's completion window ended before this line ran."

    def _unrun(self, number: int, raw: bytes, code: str, message: str) -> None:
        try:
            custom_id = str(json.loads(raw).get("custom_id", ""))
        except ValueError:
            custom_id = ""
        error: LineError = {"code": code, "message": message}
        out: OutputLine = {
            "id": f"batch_req_{self.short}_{number}",
            "custom_id": custom_id,
            "response": None,
            "error": error,
        }
        self.rows.append((number, False, json.dumps(out)))

    async def _line(self, number: int, raw: bytes, member: str) -> None:
        assert self.slots is not None
        try:
            parsed = json.loads(raw)
            body = json.dumps(parsed["body"]).encode()
            status, reply, request_id = 0, None, ""
            lost = 0
            for attempt in range(1, MAX_ATTEMPTS + 1):
                request_id = f"req_{self.short}_{number}_{attempt}"
                status, reply = await self._call(body, request_id)
                if _worker_lost(status, reply):
                    # Not billed (the worker died): an input that kills workers is run at
                    # most twice, and a batch of them is stopped (stopping()).
                    lost += 1
                    if lost >= 2:
                        self.workers_lost += 1
                        break
                if status not in RETRIED or attempt == MAX_ATTEMPTS or self.lost:
                    break
                await asyncio.sleep(min(10.0, 0.5 * 2**attempt))
            out: OutputLine = {
                "id": f"batch_req_{self.short}_{number}",
                "custom_id": str(parsed["custom_id"]),
                "response": {"status_code": status, "request_id": request_id, "body": reply},
                "error": None,
            }
            text = json.dumps(out)
            self.output_bytes += len(text)
            self.rows.append((number, 200 <= status < 300, text))
        except Exception:
            # Never a line left out of both files: it is written as a failure.
            logger.exception("batch %s line %d failed unexpectedly", self.id, number)
            self._unrun(number, raw, "internal_error", "The line could not be run.")
        finally:
            await self.slots.release(member)

    async def _call(self, body: bytes, request_id: str) -> tuple[int, Any]:
        if not self.digest:
            gone = {
                "message": "The API key that created this batch has been deleted.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
            return 401, {"error": gone}
        view = VIEWS[self.batch.endpoint]
        request = line_request(self.batch.endpoint, body, request_id, self.digest)
        with serving_class(contract.ServiceClass.BATCH):
            response = await view(request)
        content = getattr(response, "content", b"")
        limit = settings.MANTLE_BATCH_LINE_OUTPUT_MAX_BYTES
        if len(content) > limit:
            too_large = {
                "message": f"The answer is {len(content)} bytes; a batch line's answer may be at "
                f"most {limit} (MANTLE_BATCH_LINE_OUTPUT_MAX_BYTES). Ask for less in this line "
                "(fewer inputs, logprobs, choices or tokens).",
                "type": "invalid_request_error",
                "param": None,
                "code": "output_too_large",
            }
            return 413, {"error": too_large}
        try:
            reply = json.loads(content) if content else None
        except ValueError:
            reply = None
        return response.status_code, reply

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self._flush()

    async def _flush(self) -> None:
        while len(self.rows) > FLUSH_ROWS:  # one statement holds at most FLUSH_ROWS lines
            head, tail = self.rows[:FLUSH_ROWS], self.rows[FLUSH_ROWS:]
            self.rows = head
            await self._flush_some()
            if self.rows:  # storing failed: kept for the next flush
                self.rows += tail
                return
            self.rows = tail
        await self._flush_some()

    async def _flush_all(self) -> None:
        """Flushes, and raises unless every finished line is stored: a batch never moves on
        (to finalizing, or to another runner) with an answer held only in memory."""
        await self._flush()
        if self.lost:
            raise LeaseLost(self.id)
        if self.rows:
            raise LinesNotStored(f"{len(self.rows)} finished lines of {self.id} are not stored")

    async def _flush_some(self) -> None:
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        try:
            await database_read(batch_store_lines, self.id, self.runner, rows)
        except LeaseLost:
            self.lost = True
        except Exception:
            # Kept for the next flush: a line is stored once whatever happens.
            self.rows = rows + self.rows
            logger.warning("batch %s: storing %d lines failed", self.id, len(rows), exc_info=True)


def _worker_lost(status: int, reply: Any) -> bool:
    if status != 502 or not isinstance(reply, dict):
        return False
    error = reply.get("error")
    return isinstance(error, dict) and error.get("code") == "worker_lost"


async def _read_lines(file: Any) -> Any:
    """The file's numbered lines, read in a thread a bounded way ahead of the consumer."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(READ_AHEAD)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for item in numbered(file):
                if stop.is_set():
                    return
                asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()
        except BaseException as exc:  # handed to the consumer
            failure.append(exc)
        finally:
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    thread = threading.Thread(target=produce, name="batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
        while not queue.empty():  # unblocks a producer waiting on a full queue
            queue.get_nowait()


# --- finalizing -----------------------------------------------------------------------------


def _rows(batch_id: str, ok: bool) -> Iterator[bytes]:
    rows = (
        BatchLine.objects.filter(batch_id=batch_id, ok=ok)
        .order_by("line")
        .values_list("output_json", flat=True)
    )
    for text in rows.iterator(chunk_size=100):
        yield text.encode() + b"\n"


def batch_finalize(batch_id: str, runner: str) -> None:
    """Writes the stored lines to the output and error files, then ends the batch:
    completed, cancelled or expired. Each file is recorded on the batch as soon as it is
    written, so a runner that dies here writes only what is missing when it resumes."""
    batch = Batch.objects.get(id=batch_id)
    if batch.runner != runner:
        raise LeaseLost(batch_id)
    if batch.in_progress_at is not None:
        stored = BatchLine.objects.filter(batch_id=batch_id).count()
        if stored < batch.request_total:
            # Never a batch ended with lines in neither file: it runs what is missing first.
            with transaction.atomic():
                held = _held(batch_id, runner)
                held.status = (
                    Status.CANCELLING if held.cancelling_at is not None else Status.IN_PROGRESS
                )
                held.save(update_fields=["status"])
            raise LinesNotStored(
                f"{batch_id}: {stored} lines stored of {batch.request_total}; running the rest"
            )
    if batch.status not in (Status.FINALIZING,):
        batch_set_status(batch_id, runner, Status.FINALIZING)
    keep = output_expiry(batch)
    expires_at: datetime | None = batch.created_at + keep if keep else None
    for ok, name in ((True, "output_file_id"), (False, "error_file_id")):
        if getattr(batch, name):
            continue
        if not BatchLine.objects.filter(batch_id=batch_id, ok=ok).exists():
            continue
        written = files.write_file(
            organization_id=batch.organization_id,
            purpose="batch_output",
            filename=f"{batch_id}_{'output' if ok else 'error'}.jsonl",
            chunks=_rows(batch_id, ok),
            expires_at=expires_at,
            # Paid for already, and bounded by MANTLE_BATCH_OUTPUT_MAX_BYTES: written past the
            # organization's file quota rather than held (docs/batches.md).
            over_quota=True,
        )
        with transaction.atomic():
            held = _held(batch_id, runner)
            setattr(held, name, written.id)
            held.save(update_fields=[name])
        setattr(batch, name, written.id)
    with transaction.atomic():
        held = _held(batch_id, runner)
        now = timezone.now()
        if held.cancelling_at is not None:
            held.status, held.cancelled_at = Status.CANCELLED, now
        elif held.expired_at is not None:
            held.status = Status.EXPIRED
        else:
            held.status, held.completed_at = Status.COMPLETED, now
        held.runner, held.lease_until = "", None
        held.save()
        BatchLine.objects.filter(batch_id=batch_id).delete()


# --- the process ----------------------------------------------------------------------------


def _forget(running: dict[str, asyncio.Task[None]], key: str, _: object) -> None:
    running.pop(key, None)


async def run_forever(stop: asyncio.Event, *, runner: str | None = None) -> None:
    """Claims batches and runs up to MANTLE_BATCH_RUNNER_BATCHES of them at once until
    `stop` is set; then waits for the running ones to let go of their leases."""
    name = runner or runner_name()
    running: dict[str, asyncio.Task[None]] = {}
    runs: dict[str, BatchRun] = {}
    logger.info("batch runner %s started", name)
    while not stop.is_set():
        for key in [k for k in runs if k not in running]:
            del runs[key]
        claimed = None
        if len(running) < settings.MANTLE_BATCH_RUNNER_BATCHES:
            try:
                claimed = await database_read(batch_claim, name, list(running))
            except Exception:
                logger.warning("batch runner: claiming failed", exc_info=True)
        if claimed is not None:
            logger.info("batch %s: taken by %s (%s)", claimed.id, name, claimed.status)
            run = runs[claimed.id] = BatchRun(claimed, name)
            task = asyncio.create_task(run.run())
            running[claimed.id] = task
            task.add_done_callback(functools.partial(_forget, running, claimed.id))
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.MANTLE_BATCH_POLL_S)
    # Lines in flight finish and are stored; none starts. Cancelling them instead would tell
    # their workers to stop, and the next runner would read those cut answers back.
    for key in list(running):
        if key in runs:
            runs[key].draining = True
    await asyncio.gather(*running.values(), return_exceptions=True)
