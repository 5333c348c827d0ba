"""The usage drain: the Redis usage stream into raw events and hourly rollups, exactly once.

How a batch goes (docs/billing.md, "Metering", has the argument step by step):

1. XREADGROUP (group `billing-drain`) hands this consumer up to `batch_size` entries; they
   stay pending in the group until acknowledged. A reader thread fetches and parses the
   next batch while the database writes the current one.
2. One transaction: COPY the batch into a temp table, insert it into the raw table with
   (request_id, occurred_at) unique, upsert the hourly rollups from the rows actually
   inserted (never from duplicates), and write the batch's per-organization token counts
   to the spend outbox. Commit.
3. Apply the outbox to Redis (`mantle:spend:<org>`, guarded by a per-batch marker), run the
   `on_counted` hooks, delete the outbox row.
4. XACK. Malformed entries go to `mantle:usage:dead` with the reason, acked in the same
   MULTI.

A crash before 2 commits leaves the entries pending: they are read again (this consumer's
history at restart, or XAUTOCLAIM by another drain) and inserted then. A crash after the
commit leaves them pending too, but they are duplicates by then: nothing is counted twice,
and the outbox row, replayed at start, finishes step 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis
from django.db import DataError, IntegrityError, OperationalError, connection, transaction
from django.db.models import Sum
from prometheus_client import Counter, Gauge, Histogram

from billing import partitions
from billing.models import SpendOutbox, UsageRollup
from billing.models import UsageEvent as UsageEventRow
from workers.contract import USAGE_STREAM, UsageEvent

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

GROUP = "billing-drain"
DEAD_LETTER_STREAM = "mantle:usage:dead"
DEAD_LETTER_MAXLEN = 1_000_000
SPEND_APPLIED_TTL_S = 7 * 24 * 3600
"""How long a batch's spend marker outlives it: longer than any outbox row can wait."""

MAX_TOKENS_PER_EVENT = 10**12
MAX_FUTURE_S = 24 * 3600.0
"""Events dated further ahead than this are refused: a worker's clock has gone wrong."""

CRASH_ENV = "MANTLE_DRAIN_CRASH_AT"
CRASH_AFTER_ENV = "MANTLE_DRAIN_CRASH_AFTER"
CRASH_POINTS = ("before_insert", "before_commit", "before_spend", "after_commit_before_ack")
"""Test hook: with MANTLE_DRAIN_CRASH_AT set to one of these, the drain calls os._exit(1)
at that point of a batch, after MANTLE_DRAIN_CRASH_AFTER (default 0) whole batches."""

LAG = Gauge(
    "mantle_usage_drain_lag_seconds",
    "Age of the oldest usage event not yet counted by the drain (pending or unread)",
)
DRAINED = Counter("mantle_usage_events_drained_total", "Usage events counted (inserted) once")
DUPLICATES = Counter(
    "mantle_usage_duplicates_skipped_total", "Usage events skipped as already counted"
)
DEAD_LETTERS = Counter(
    "mantle_usage_dead_letters_total", "Usage stream entries moved to the dead-letter stream"
)
BATCH_SECONDS = Histogram(
    "mantle_usage_drain_batch_seconds",
    "Time to store and acknowledge one batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def spend_key(organization_id: str) -> str:
    """Hash of the tokens counted for an organization: `input_tokens`, `output_tokens`."""
    return f"mantle:spend:{organization_id}"


def spend_applied_key(batch: str) -> str:
    return f"mantle:spend-applied:{batch}"


# --- Hooks -------------------------------------------------------------------------------

CountedHook = Callable[[Sequence[UsageEvent]], None]
_hooks: list[CountedHook] = []


def on_counted(hook: CountedHook) -> CountedHook:
    """Register `hook(events)`, called after each commit with the events it counted.

    Usable as a decorator; register at import time (an AppConfig.ready). A hook runs in the
    drain process, after the commit and before the acknowledgement, at least once per
    counted event: if the drain dies or a hook raises, the batch is replayed from the spend
    outbox with the same events, so a hook must be idempotent by request id. Hooks should
    batch their own I/O: they are on the drain's hot path.
    """
    if hook not in _hooks:
        _hooks.append(hook)
    return hook


def registered_hooks() -> tuple[CountedHook, ...]:
    return tuple(_hooks)


# --- Parsing -------------------------------------------------------------------------------


class InvalidUsage(ValueError):
    """An entry of the usage stream that cannot be counted; it goes to the dead letters."""


def _to_int(raw: str) -> int:
    return int(raw or 0)


def _to_float(raw: str) -> float:
    return float(raw or 0)


def _to_str(raw: str) -> str:
    return raw


def _converter(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    # The rules of UsageEvent.from_fields, resolved once instead of per event.
    if f.type in ("int", int):
        return _to_int
    if f.type in ("float", float):
        return _to_float
    return _to_str


_CONTRACT_FIELDS = dataclasses.fields(UsageEvent)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in _CONTRACT_FIELDS)
_CONVERTERS = tuple((f.name, _converter(f)) for f in _CONTRACT_FIELDS)
_POS = {name: i for i, name in enumerate(FIELD_NAMES)}
_REQUIRED = tuple(_POS[n] for n in ("request_id", "organization_id", "model_name"))


def _max_length(name: str) -> int:
    model_field = UsageEventRow._meta.get_field(name)
    return int(getattr(model_field, "max_length", 0) or 0)


_STR_LIMITS = tuple(
    (i, name, _max_length(name)) for i, (name, conv) in enumerate(_CONVERTERS) if conv is _to_str
)
_COUNTS = tuple(_POS[n] for n in ("input_tokens", "output_tokens", "queue_ms", "compute_ms"))
_REQUEST_ID = _POS["request_id"]
_ORG = _POS["organization_id"]
_INPUT = _POS["input_tokens"]
_OUTPUT = _POS["output_tokens"]
_STARTED = _POS["started_at"]
_FINISHED = _POS["finished_at"]


_INTS = tuple(i for i, (_, conv) in enumerate(_CONVERTERS) if conv is _to_int)
_FLOATS = tuple(i for i, (_, conv) in enumerate(_CONVERTERS) if conv is _to_float)
_NAME_LIST = list(FIELD_NAMES)


def parse_entry(fields: Mapping[str, str], *, not_before: float, not_after: float) -> list[Any]:
    """The event's values in contract field order, converted as UsageEvent.from_fields does.

    `UsageEvent(*values)` is the event. Raises InvalidUsage for what the database would
    refuse or billing cannot attribute: missing ids, negative or absurd counts, strings
    longer than their column, times outside [not_before, not_after).
    """
    raw = [fields.get(name, "") for name in FIELD_NAMES]
    return _parse_values(raw, not_before=not_before, not_after=not_after)


def _parse_values(values: list[Any], *, not_before: float, not_after: float) -> list[Any]:
    # Converts in place: `values` are the raw strings in contract order.
    try:
        for i in _INTS:
            values[i] = int(values[i] or 0)
        for i in _FLOATS:
            values[i] = float(values[i] or 0)
    except (TypeError, ValueError) as exc:
        raise InvalidUsage(f"malformed field: {exc}") from None
    for i in _REQUIRED:
        if not values[i]:
            raise InvalidUsage(f"{FIELD_NAMES[i]} is empty")
    for i, name, limit in _STR_LIMITS:
        if len(values[i]) > limit:
            raise InvalidUsage(f"{name} is longer than {limit} characters")
    if "\x00" in "".join([values[i] for i, _, _ in _STR_LIMITS]):
        name = next(n for i, n, _ in _STR_LIMITS if "\x00" in values[i])
        raise InvalidUsage(f"{name} contains a NUL character")
    for i in _COUNTS:
        if not 0 <= values[i] <= MAX_TOKENS_PER_EVENT:
            raise InvalidUsage(f"{FIELD_NAMES[i]} out of range: {values[i]}")
    finished = values[_FINISHED]
    if not (math.isfinite(finished) and not_before <= finished < not_after):
        raise InvalidUsage(f"finished_at outside the accepted window: {finished}")
    if not math.isfinite(values[_STARTED]) or abs(values[_STARTED]) > 1e11:
        raise InvalidUsage(f"started_at is not a time: {values[_STARTED]}")
    return values


RawEntry = tuple[str, list[str] | None]
"""A stream entry as read: (id, its flat [field, value, ...] list, or None when it was
deleted from the stream while pending)."""


@dataclass(slots=True)
class Batch:
    """Entries read from the stream, parsed: what one transaction stores."""

    entry_ids: list[str] = field(default_factory=list)  # all of them, acked at the end
    rows: list[list[Any]] = field(default_factory=list)  # valid, one per request id
    row_entry_ids: list[str] = field(default_factory=list)  # the entry of each row
    dead: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    duplicates: int = 0  # further copies of a request id inside this batch
    read_at: float = 0.0


def assemble_batch(entries: Iterable[RawEntry], *, now: float | None = None) -> Batch:
    """Parse raw stream entries into a batch: valid rows, duplicates, dead letters."""
    now = time.time() if now is None else now
    not_before = partitions.retention_cutoff(now=datetime.fromtimestamp(now, UTC)).timestamp()
    not_after = now + MAX_FUTURE_S
    batch = Batch(read_at=now)
    seen: set[str] = set()
    for entry_id, raw in entries:
        batch.entry_ids.append(entry_id)
        if raw is None:
            continue  # trimmed from the stream while pending: nothing left to count
        values = _parse_flat(entry_id, raw, batch, not_before, not_after)
        if values is None:
            continue
        request_id = values[_REQUEST_ID]
        if request_id in seen:
            batch.duplicates += 1
            continue
        seen.add(request_id)
        batch.rows.append(values)
        batch.row_entry_ids.append(entry_id)
    return batch


def _parse_flat(
    entry_id: str, flat: list[str], batch: Batch, not_before: float, not_after: float
) -> list[Any] | None:
    try:
        if len(flat) % 2:
            raise InvalidUsage("odd number of field names and values")
        if flat[::2] == _NAME_LIST:
            # The worker writes the fields in contract order: take the values as they are.
            return _parse_values(flat[1::2], not_before=not_before, not_after=not_after)
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return parse_entry(fields, not_before=not_before, not_after=not_after)
    except InvalidUsage as exc:
        batch.dead.append((entry_id, str(exc), dict(zip(flat[::2], flat[1::2], strict=False))))
        return None


# --- Storing -------------------------------------------------------------------------------


@dataclass(slots=True)
class Stored:
    """What one committed batch counted."""

    inserted: int
    duplicates: int
    batch: str | None  # the spend outbox batch, None when nothing was inserted
    deltas: dict[str, tuple[int, int]]  # organization -> (input, output) tokens inserted
    events: list[UsageEvent]  # the inserted events, only when asked for


_INCOMING = "billing_usage_incoming"
_COPY_TYPE_OF: dict[Callable[[str], Any], str] = {
    _to_int: "int8",
    _to_float: "float8",
    _to_str: "text",
}
_COPY_TYPES = [_COPY_TYPE_OF[conv] for _, conv in _CONVERTERS]
# Text in byte order ("C"), like the id columns it goes to: sorting and matching with
# memcmp instead of the locale's strcoll.
_PG_TYPES = {"int8": "bigint", "float8": "double precision", "text": 'text COLLATE "C"'}
_CREATE_INCOMING = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_INCOMING} ("
    + ", ".join(f"{n} {_PG_TYPES[t]}" for n, t in zip(FIELD_NAMES, _COPY_TYPES, strict=True))
    + ") ON COMMIT DELETE ROWS"
)
_COPY_INCOMING = f"COPY {_INCOMING} ({', '.join(FIELD_NAMES)}) FROM STDIN (FORMAT BINARY)"
_ROW_COLUMNS = [
    "request_id",
    "occurred_at",
    "organization_id",
    "project_id",
    "api_key_id",
    "endpoint_id",
    "model_version_id",
    "model_name",
    "input_tokens",
    "output_tokens",
    "status",
    "started_at",
    "queue_ms",
    "compute_ms",
    "worker",
    "recorded_at",
]
_SELECT_INCOMING = ", ".join(
    {
        "occurred_at": "to_timestamp(finished_at)",
        "started_at": "to_timestamp(started_at)",
        "recorded_at": "now()",
    }.get(c, c)
    for c in _ROW_COLUMNS
)
_DIMS = "organization_id, project_id, api_key_id, endpoint_id, model_name"
# One statement, so the rollups and the outbox count exactly the rows this statement
# inserted (`counted`). Rollup keys are sorted so that concurrent drains lock rollup rows in
# one order and cannot deadlock on them; so are request ids when duplicates are expected
# (two drains inserting the same ids otherwise merely risk a deadlock error and a retry).
_STORE_SQL = f"""
WITH ins AS (
    INSERT INTO billing_usageevent ({", ".join(_ROW_COLUMNS)})
    SELECT {_SELECT_INCOMING} FROM {_INCOMING} {{order}}
    {{on_conflict}}
), counted AS (
    {{counted}}
), agg AS (
    SELECT {_DIMS}, date_trunc('hour', occurred_at, 'UTC') AS hour, count(*) AS requests,
           sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(compute_ms) AS compute_ms
    FROM counted GROUP BY {_DIMS}, 6
), rollup AS (
    INSERT INTO billing_usagerollup AS r
        ({_DIMS}, hour, requests, input_tokens, output_tokens, compute_ms, updated_at)
    SELECT {_DIMS}, hour, requests, input_tokens, output_tokens, compute_ms, now()
    FROM agg ORDER BY {_DIMS}, hour
    ON CONFLICT ({_DIMS}, hour) DO UPDATE SET
        requests = r.requests + EXCLUDED.requests,
        input_tokens = r.input_tokens + EXCLUDED.input_tokens,
        output_tokens = r.output_tokens + EXCLUDED.output_tokens,
        compute_ms = r.compute_ms + EXCLUDED.compute_ms,
        updated_at = EXCLUDED.updated_at
), per_org AS (
    SELECT organization_id, sum(input_tokens) AS i, sum(output_tokens) AS o
    FROM agg GROUP BY organization_id
), outbox AS (
    INSERT INTO billing_spendoutbox (batch, deltas, request_ids, created_at)
    SELECT %s::uuid, jsonb_object_agg(organization_id, jsonb_build_array(i, o)),
           {{outbox_ids}}, now()
    FROM per_org HAVING count(*) > 0
    RETURNING deltas
)
SELECT (SELECT count(*) FROM counted), (SELECT deltas FROM outbox), {{inserted_ids}}
"""  # noqa: S608 (module constants only; values are bound)
# Optimistic: a plain insert either inserts every row or fails on a duplicate (rare: a
# redelivery after a crash), so the rollups can be summed from the incoming rows directly,
# without ON CONFLICT's speculative insertion or RETURNING. On a duplicate the batch goes
# again under ON CONFLICT DO NOTHING, counting what RETURNING says was inserted.
_COUNTED_ALL = (
    f"SELECT request_id, {_DIMS}, to_timestamp(finished_at) AS occurred_at, "  # noqa: S608
    f"input_tokens, output_tokens, compute_ms FROM {_INCOMING}"
)
_COUNTED_RETURNED = "SELECT * FROM ins"
_RETURNING = f"RETURNING request_id, {_DIMS}, occurred_at, input_tokens, output_tokens, compute_ms"
# The outbox keeps the inserted request ids only when hooks may need them on a replay.
_STORE = {
    (safe, keep_ids): _STORE_SQL.format(
        order="ORDER BY request_id" if safe else "",
        on_conflict=f"ON CONFLICT DO NOTHING {_RETURNING}" if safe else "",
        counted=_COUNTED_RETURNED if safe else _COUNTED_ALL,
        inserted_ids="(SELECT array_agg(request_id) FROM counted)" if safe else "NULL::text[]",
        outbox_ids="(SELECT jsonb_agg(request_id) FROM counted)" if keep_ids else "NULL::jsonb",
    )
    for safe in (False, True)
    for keep_ids in (False, True)
}
# Rows of an earlier batch are still there if that batch was never committed and the
# connection lives on inside an outer transaction (a test's); ON COMMIT clears the rest.
_PREPARE_INCOMING = f"{_CREATE_INCOMING}; DELETE FROM {_INCOMING}"  # noqa: S608


def usage_batch_store(
    rows: Sequence[Sequence[Any]],
    *,
    with_events: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> Stored:
    """Insert the events not stored yet, roll them up and write the spend outbox: one commit.

    `rows` are `parse_entry` values, at most one per request id. Idempotent: storing the same
    rows again inserts and counts nothing. Partitions must exist (`usage_rows_months`).
    """
    if not rows:
        return Stored(inserted=0, duplicates=0, batch=None, deltas={}, events=[])
    batch = uuid.uuid4().hex
    with transaction.atomic():
        if partitions.is_partitioned():
            count, deltas_json, inserted_ids = _store_postgresql(rows, batch, with_events)
        else:
            count, deltas_json, inserted_ids = _store_portable(rows, batch, with_events)
        if before_commit is not None:
            before_commit()
    if isinstance(deltas_json, str):  # Django leaves jsonb undecoded on raw cursors
        deltas_json = json.loads(deltas_json)
    deltas = {org: (int(v[0]), int(v[1])) for org, v in (deltas_json or {}).items()}
    events: list[UsageEvent] = []
    if with_events and count:
        if inserted_ids is None:
            events = [UsageEvent(*r) for r in rows]
        else:
            wanted = set(inserted_ids)
            events = [UsageEvent(*r) for r in rows if r[_REQUEST_ID] in wanted]
    return Stored(
        inserted=count,
        duplicates=len(rows) - count,
        batch=batch if count else None,
        deltas=deltas,
        events=events,
    )


def _store_postgresql(
    rows: Sequence[Sequence[Any]], batch: str, keep_ids: bool
) -> tuple[int, dict[str, list[int]] | None, list[str] | None]:
    with connection.cursor() as cursor:
        cursor.execute(_PREPARE_INCOMING)
        with cursor.copy(_COPY_INCOMING) as copy:
            copy.set_types(_COPY_TYPES)
            for row in rows:
                copy.write_row(row)
        try:
            with transaction.atomic():
                cursor.execute(_STORE[False, keep_ids], [batch])
                count, deltas, _ = cursor.fetchone()
                return int(count), deltas, None
        except IntegrityError as exc:
            if getattr(exc.__cause__, "sqlstate", None) != "23505":  # unique_violation
                raise
        cursor.execute(_STORE[True, keep_ids], [batch])
        count, deltas, inserted_ids = cursor.fetchone()
        return int(count), deltas, list(inserted_ids or [])


_PORTABLE_INSERT = (
    f"INSERT INTO billing_usageevent ({', '.join(_ROW_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(['%s'] * len(_ROW_COLUMNS))}) ON CONFLICT DO NOTHING"
)
_PORTABLE_ROLLUP = (
    f"INSERT INTO billing_usagerollup ({_DIMS}, hour, requests, input_tokens, "  # noqa: S608
    "output_tokens, compute_ms, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
    f"ON CONFLICT ({_DIMS}, hour) DO UPDATE SET "
    "requests = requests + excluded.requests, "
    "input_tokens = input_tokens + excluded.input_tokens, "
    "output_tokens = output_tokens + excluded.output_tokens, "
    "compute_ms = compute_ms + excluded.compute_ms, "
    "updated_at = excluded.updated_at"
)


def _store_portable(
    rows: Sequence[Sequence[Any]], batch: str, keep_ids: bool
) -> tuple[int, dict[str, list[int]] | None, list[str] | None]:
    """SQLite (bin/run without DATABASE_URL): row by row, the same rules."""
    ops = connection.ops
    recorded = ops.adapt_datetimefield_value(datetime.now(UTC))
    inserted: list[Sequence[Any]] = []
    sums: dict[tuple[Any, ...], list[int]] = {}
    with connection.cursor() as cursor:
        for r in rows:
            occurred = datetime.fromtimestamp(r[_FINISHED], UTC)
            values = [
                r[_POS["request_id"]],
                ops.adapt_datetimefield_value(occurred),
                *(r[_POS[n]] for n in _ROW_COLUMNS[2:11]),
                ops.adapt_datetimefield_value(datetime.fromtimestamp(r[_STARTED], UTC)),
                r[_POS["queue_ms"]],
                r[_POS["compute_ms"]],
                r[_POS["worker"]],
                recorded,
            ]
            cursor.execute(_PORTABLE_INSERT, values)
            if cursor.rowcount != 1:
                continue
            inserted.append(r)
            hour = ops.adapt_datetimefield_value(
                occurred.replace(minute=0, second=0, microsecond=0)
            )
            key = (*(r[_POS[n]] for n in _DIMS.split(", ")), hour)
            acc = sums.setdefault(key, [0, 0, 0, 0])
            acc[0] += 1
            acc[1] += r[_INPUT]
            acc[2] += r[_OUTPUT]
            acc[3] += r[_POS["compute_ms"]]
        for key, (requests, tokens_in, tokens_out, compute) in sorted(sums.items()):
            cursor.execute(
                _PORTABLE_ROLLUP, [*key, requests, tokens_in, tokens_out, compute, recorded]
            )
    deltas: dict[str, list[int]] = {}
    for r in inserted:
        acc = deltas.setdefault(r[_ORG], [0, 0])
        acc[0] += r[_INPUT]
        acc[1] += r[_OUTPUT]
    ids = [r[_REQUEST_ID] for r in inserted]
    if deltas:
        SpendOutbox.objects.create(
            batch=batch, deltas=deltas, request_ids=ids if keep_ids else None
        )
    return len(inserted), deltas or None, ids


def usage_rows_months(rows: Sequence[Sequence[Any]]) -> list[datetime]:
    """The months the rows fall in (their partitions must exist before they are stored)."""
    if not rows:
        return []
    finished = [r[_FINISHED] for r in rows]
    first = partitions.month_start(datetime.fromtimestamp(min(finished), UTC))
    last = partitions.month_start(datetime.fromtimestamp(max(finished), UTC))
    months = [first]
    while months[-1] < last:
        months.append(partitions.add_months(months[-1], 1))
    return months


# --- Spend in Redis and the outbox -------------------------------------------------------

# Marker and increments in one script: a replay of the same batch finds the marker and adds
# nothing, and a crash cannot leave the increments without the marker or the reverse.
_APPLY_SPEND_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 2, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'input_tokens', ARGV[2 * i - 2])
  redis.call('HINCRBY', KEYS[i], 'output_tokens', ARGV[2 * i - 1])
end
return 1
"""


def spend_apply(
    client: redis.Redis, *, batch: str, deltas: Mapping[str, tuple[int, int] | Sequence[int]]
) -> bool:
    """Add a committed batch's tokens to `mantle:spend:<org>`, once per batch. True if added."""
    keys = [spend_applied_key(batch)]
    args: list[Any] = [SPEND_APPLIED_TTL_S]
    for org, (tokens_in, tokens_out) in sorted(deltas.items()):
        keys.append(spend_key(org))
        args += [int(tokens_in), int(tokens_out)]
    return bool(client.eval(_APPLY_SPEND_LUA, len(keys), *keys, *args))


def _run_hooks(hooks: Sequence[CountedHook], events: Sequence[UsageEvent]) -> bool:
    ok = True
    for hook in hooks:
        try:
            hook(events)
        except Exception:
            logger.exception("on_counted hook %r failed; its batch will be replayed", hook)
            ok = False
    return ok


def outbox_finish(
    client: redis.Redis,
    *,
    batch: str,
    deltas: Mapping[str, Sequence[int]],
    events: Sequence[UsageEvent] | None,
    hooks: Sequence[CountedHook],
) -> bool:
    """Apply a committed batch's spend and hooks, then delete its outbox row.

    Whoever locks the row does it (this drain, or another replaying the outbox); a batch
    whose hooks fail keeps its row for the next replay. True when the row is gone.
    """
    with transaction.atomic():
        row = SpendOutbox.objects.select_for_update(skip_locked=True).filter(batch=batch).first()
        if row is None:
            return True  # replayed by another drain, or in its hands right now
        spend_apply(client, batch=batch, deltas=deltas)
        if hooks:
            if events is None:
                events = _events_from_table(row)
            if not _run_hooks(hooks, events):
                return False
        row.delete()
    return True


def _events_from_table(row: SpendOutbox) -> list[UsageEvent]:
    """A replayed batch's events, read back from the raw table."""
    ids = row.request_ids
    if not ids:
        return []
    fields = [f if f != "finished_at" else "occurred_at" for f in FIELD_NAMES]
    events = []
    for values in UsageEventRow.objects.filter(request_id__in=ids).values_list(*fields):
        converted: list[Any] = [v.timestamp() if isinstance(v, datetime) else v for v in values]
        events.append(UsageEvent(*converted))
    return events


def outbox_replay(
    client: redis.Redis, *, hooks: Sequence[CountedHook] = (), limit: int = 100
) -> int:
    """Finish batches whose drain died after committing. Returns how many were finished."""
    done = 0
    pending = SpendOutbox.objects.order_by("id").values_list("batch", "deltas")[:limit]
    for batch, deltas in pending:
        if outbox_finish(client, batch=batch.hex, deltas=deltas, events=None, hooks=hooks):
            done += 1
    if done:
        logger.info("spend outbox: %d committed batch(es) finished", done)
    return done


# --- The stream ----------------------------------------------------------------------------


def ensure_group(client: redis.Redis) -> None:
    """Create the stream and the drain's consumer group (from the first entry) if missing."""
    try:
        client.xgroup_create(USAGE_STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def drain_lag_seconds(client: redis.Redis) -> float:
    """Age of the oldest event the drain has not counted: pending, or not delivered yet.

    Four cheap commands, whatever the stream's length: TIME (the server's clock, the one
    that stamped the ids), the group's last-delivered id, its oldest pending id, and the
    first entry after the last delivered one.
    """
    try:
        pipe = client.pipeline(transaction=False)
        pipe.time()
        pipe.xinfo_groups(USAGE_STREAM)
        pipe.xpending(USAGE_STREAM, GROUP)
        (seconds, micros), groups, pending = pipe.execute()
    except redis.ResponseError:
        return 0.0  # no stream or no group yet: nothing to drain
    group = next((g for g in groups if g["name"] == GROUP), None)
    if group is None:
        return 0.0
    oldest = []
    if pending["pending"]:
        oldest.append(_id_ms(str(pending["min"])))
    unread = client.xrange(USAGE_STREAM, min=f"({group['last-delivered-id']}", count=1)
    if unread:
        oldest.append(_id_ms(str(unread[0][0])))
    if not oldest:
        return 0.0
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return max(0.0, (now_ms - min(oldest)) / 1000)


def usage_stream_trim(client: redis.Redis) -> int:
    """Drop stream entries that every consumer group has delivered and acknowledged."""
    try:
        groups = client.xinfo_groups(USAGE_STREAM)
    except redis.ResponseError:
        return 0
    if not groups:
        return 0  # without a group nothing is known to be counted
    bounds = []
    for group in groups:
        pending = client.xpending(USAGE_STREAM, group["name"])
        if pending["pending"]:
            ms, seq = pending["min"].split("-")
            bounds.append((int(ms), int(seq)))
        else:
            ms, seq = group["last-delivered-id"].split("-")
            bounds.append((int(ms), int(seq) + 1))
    ms, seq = min(bounds)
    # Approximate trimming removes whole nodes only, never an id at or past the bound.
    return int(client.xtrim(USAGE_STREAM, minid=f"{ms}-{seq}", approximate=True))


# --- The drain ----------------------------------------------------------------------------


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


@dataclass(slots=True)
class DrainTotals:
    batches: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead: int = 0


class Drain:
    """One consumer of the usage stream. Several may run at once under different names.

    `consumer` should be stable across restarts of the same process slot (the host name
    by default), so that a restarted drain takes back its own pending entries at once;
    entries of a consumer that never comes back are claimed by the others after
    `claim_idle_ms`.
    """

    def __init__(
        self,
        *,
        consumer: str,
        client: redis.Redis,
        batch_size: int = 5000,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        claim_interval_s: float = 30.0,
        hooks: Sequence[CountedHook] | None = None,
    ) -> None:
        self.consumer = consumer
        self.client = client
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval_s = claim_interval_s
        self.hooks = tuple(registered_hooks() if hooks is None else hooks)
        self.totals = DrainTotals()
        # Reads return the server's reply as is: redis-py's dict-building callbacks cost
        # more than the rest of the parsing.
        self._reader = redis.Redis(connection_pool=client.connection_pool)
        for command in ("XREADGROUP", "XAUTOCLAIM"):
            self._reader.set_response_callback(command, _raw_reply)
        self._months_ready: set[datetime] = set()
        self._crash_at = os.environ.get(CRASH_ENV, "")
        self._crash_after = int(os.environ.get(CRASH_AFTER_ENV, "0") or 0)
        if self._crash_at and self._crash_at not in CRASH_POINTS:
            raise ValueError(f"{CRASH_ENV} must be one of {CRASH_POINTS}")
        self._last_lag = 0.0
        self._last_trim = 0.0
        self._last_replay = 0.0
        self._reader_error: BaseException | None = None

    # -- set-up and maintenance --

    def setup(self) -> None:
        ensure_group(self.client)
        partitions.usage_partitions_ensure()
        self._months_ready = {p.start for p in partitions.usage_partitions_list()}
        outbox_replay(self.client, hooks=self.hooks)
        self._last_replay = time.monotonic()

    def maintain(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_lag >= 1.0:
            LAG.set(drain_lag_seconds(self.client))
            self._last_lag = now
        if force or now - self._last_trim >= 10.0:
            usage_stream_trim(self.client)
            self._last_trim = now
        if now - self._last_replay >= 30.0:
            outbox_replay(self.client, hooks=self.hooks)
            self._last_replay = now

    # -- reading --

    def _entries(self, reply: Any) -> list[RawEntry]:
        if not reply:
            return []
        # RESP3 (redis-py's default) replies with a map of streams, RESP2 with pairs.
        entries = reply[USAGE_STREAM] if isinstance(reply, dict) else reply[0][1]
        return [(entry_id, flat) for entry_id, flat in entries]

    def read_pending(self, after: str = "0") -> list[RawEntry]:
        """This consumer's own delivered-but-unacknowledged entries after `after`."""
        reply = self._reader.xreadgroup(
            GROUP, self.consumer, {USAGE_STREAM: after}, count=self.batch_size
        )
        return self._entries(reply)

    def read_new(self, *, block: bool) -> list[RawEntry]:
        reply = self._reader.xreadgroup(
            GROUP,
            self.consumer,
            {USAGE_STREAM: ">"},
            count=self.batch_size,
            block=self.block_ms if block else None,
        )
        return self._entries(reply)

    def claim(self, start: str = "0-0") -> tuple[str, list[RawEntry]]:
        """Take over entries pending too long in other (dead) consumers. Returns the cursor."""
        reply = self._reader.xautoclaim(
            USAGE_STREAM,
            GROUP,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id=start,
            count=self.batch_size,
        )
        cursor, claimed = reply[0], reply[1]
        return cursor, [(entry_id, flat) for entry_id, flat in claimed]

    def _produce(self, out: queue.Queue[Batch | None], stop: threading.Event, once: bool) -> None:
        """The reader thread: own pending entries first, then claims and new entries."""

        def put(entries: list[RawEntry]) -> None:
            batch = assemble_batch(entries)
            while not stop.is_set():
                try:
                    out.put(batch, timeout=0.5)
                    return
                except queue.Full:
                    continue

        def retrying(read: Callable[[], _T]) -> _T | None:
            # Redis going away must not end the drain: wait and read again.
            while not stop.is_set():
                try:
                    return read()
                except redis.RedisError as exc:
                    logger.warning("usage stream read failed, retrying: %s", exc)
                    stop.wait(1.0)
            return None

        def claim_all() -> None:
            cursor = "0-0"
            while not stop.is_set():
                got = retrying(functools.partial(self.claim, cursor))
                if got is None:
                    return
                cursor, claimed = got
                if claimed:
                    logger.info("claimed %d stale usage entries", len(claimed))
                    put(claimed)
                if cursor == "0-0":
                    return

        try:
            after = "0"
            while not stop.is_set():
                own = retrying(functools.partial(self.read_pending, after))
                if not own:
                    break
                put(own)
                after = own[-1][0]
            claim_all()
            last_claim = time.monotonic()
            while not stop.is_set():
                if time.monotonic() - last_claim >= self.claim_interval_s:
                    claim_all()
                    last_claim = time.monotonic()
                entries = retrying(functools.partial(self.read_new, block=not once))
                if entries:
                    put(entries)
                elif once and entries is not None:
                    break
        except Exception as exc:
            logger.exception("usage drain reader failed")
            self._reader_error = exc
            stop.set()
        finally:
            with contextlib.suppress(queue.Full):
                out.put(None, timeout=5)

    # -- storing --

    def _crash(self, point: str) -> None:
        if self._crash_at == point and self.totals.batches >= self._crash_after:
            logger.warning("%s=%s: exiting now (test hook)", CRASH_ENV, point)
            os._exit(1)

    def process(self, batch: Batch) -> Stored:
        """Store, count and acknowledge one batch; raises (entries stay pending) on failure."""
        started = time.perf_counter()
        self._crash("before_insert")
        months = [m for m in usage_rows_months(batch.rows) if m not in self._months_ready]
        if months:
            partitions.usage_partitions_ensure(months=months)
            self._months_ready.update(months)
        try:
            stored = usage_batch_store(
                batch.rows,
                with_events=bool(self.hooks),
                before_commit=lambda: self._crash("before_commit"),
            )
        except (DataError, IntegrityError):
            # A value the database refuses, or a row for a partition dropped since the
            # batch was read (retention running at a month boundary): find the rows.
            stored = self._store_one_by_one(batch)
        self._crash("before_spend")
        if stored.batch is not None:
            outbox_finish(
                self.client,
                batch=stored.batch,
                deltas=stored.deltas,
                events=stored.events,
                hooks=self.hooks,
            )
        self._crash("after_commit_before_ack")
        self._acknowledge(batch)
        duplicates = stored.duplicates + batch.duplicates
        self.totals.batches += 1
        self.totals.inserted += stored.inserted
        self.totals.duplicates += duplicates
        self.totals.dead += len(batch.dead)
        DRAINED.inc(stored.inserted)
        DUPLICATES.inc(duplicates)
        DEAD_LETTERS.inc(len(batch.dead))
        BATCH_SECONDS.observe(time.perf_counter() - started)
        return stored

    def _store_one_by_one(self, batch: Batch) -> Stored:
        """A batch the database refused as a whole: store what it takes, dead-letter the rest."""
        total = Stored(inserted=0, duplicates=0, batch=None, deltas={}, events=[])
        for entry_id, row in zip(batch.row_entry_ids, batch.rows, strict=True):
            try:
                stored = usage_batch_store([row], with_events=bool(self.hooks))
            except (DataError, IntegrityError) as exc:
                fields = {n: str(v) for n, v in zip(FIELD_NAMES, row, strict=True)}
                batch.dead.append((entry_id, f"refused by the database: {exc}", fields))
                continue
            if stored.batch is not None:
                outbox_finish(
                    self.client,
                    batch=stored.batch,
                    deltas=stored.deltas,
                    events=stored.events,
                    hooks=self.hooks,
                )
            total.inserted += stored.inserted
            total.duplicates += stored.duplicates
        return total

    def _acknowledge(self, batch: Batch) -> None:
        if not batch.entry_ids:
            return
        pipe = self.client.pipeline(transaction=True)
        for entry_id, reason, fields in batch.dead:
            logger.warning("usage entry %s dead-lettered: %s", entry_id, reason)
            record: dict[Any, Any] = {**fields, "_source_id": entry_id, "_reason": reason}
            pipe.xadd(
                DEAD_LETTER_STREAM,
                record,
                maxlen=DEAD_LETTER_MAXLEN,
                approximate=True,
            )
        pipe.xack(USAGE_STREAM, GROUP, *batch.entry_ids)
        pipe.execute()

    def run(self, *, stop: threading.Event, once: bool = False) -> DrainTotals:
        """Drain until `stop` is set, or (once) until the stream has nothing for us."""
        self.setup()
        batches: queue.Queue[Batch | None] = queue.Queue(maxsize=1)
        reader = threading.Thread(
            target=self._produce, args=(batches, stop, once), name="usage-reader", daemon=True
        )
        reader.start()
        backoff = 0.5
        try:
            while True:
                try:
                    batch = batches.get(timeout=0.5)
                except queue.Empty:
                    self.maintain()
                    continue
                if batch is None:
                    break
                while True:
                    try:
                        self.process(batch)
                        backoff = 0.5
                        break
                    except (OperationalError, redis.ConnectionError, redis.TimeoutError) as exc:
                        # The batch stays pending; a database or Redis outage must not
                        # lose it, so the same batch is retried until it goes through.
                        logger.warning("usage batch failed (%s); retrying in %.1fs", exc, backoff)
                        connection.close()
                        if stop.wait(backoff):
                            return self.totals
                        backoff = min(backoff * 2, 30.0)
                self.maintain()
        finally:
            stop.set()
            reader.join(timeout=10)
        if self._reader_error is not None:
            raise RuntimeError("the usage stream reader failed") from self._reader_error
        self.maintain(force=True)
        return self.totals


def tune_gc_for_draining() -> None:
    """Process-wide, for a process that only drains (the command calls it).

    A batch in flight is hundreds of thousands of small acyclic lists and strings; with
    the default threshold (700 allocations) the cyclic collector runs thousands of times a
    second over all of them, about a third of the drain's CPU. Nothing here makes cycles.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(200_000, 50, 100)


def usage_drain(
    *,
    consumer: str,
    client: redis.Redis,
    once: bool = True,
    stop: threading.Event | None = None,
    **options: Any,
) -> DrainTotals:
    """Run a drain (see `Drain`); with `once`, until the stream has nothing left for it."""
    return Drain(consumer=consumer, client=client, **options).run(
        stop=stop or threading.Event(), once=once
    )


def rollup_totals(organization_id: str | None = None) -> dict[str, int]:
    """Sums over the rollups (tests, the back office): requests and tokens."""
    qs = UsageRollup.objects.all()
    if organization_id is not None:
        qs = qs.filter(organization_id=organization_id)
    sums = qs.aggregate(
        requests=Sum("requests"),
        input_tokens=Sum("input_tokens"),
        output_tokens=Sum("output_tokens"),
        compute_ms=Sum("compute_ms"),
    )
    return {k: int(v or 0) for k, v in sums.items()}
