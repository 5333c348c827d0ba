"""Storing: one transaction per batch puts the events, their rollups and the spend outbox row.

Step 3 of docs/billing.md's "Exactly once, step by step": COPY the batch into a temp table,
insert it into the raw table (unique on (request_id, occurred_at)), upsert the hourly
rollups and write the spend outbox row from the rows that statement actually inserted
(never from duplicates), commit. Either all of it is there or none of it, so storing the
same rows again inserts and counts nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import Sum

from billing.metering import partitions
from billing.metering.parse import FIELD_NAMES, FIELD_TYPES, POSITION
from billing.models import SpendOutbox, UsageRollup
from workers.contract import ServiceClass, UsageEvent

_REQUEST_ID = POSITION["request_id"]
_ORG = POSITION["organization_id"]
_INPUT = POSITION["input_tokens"]
_OUTPUT = POSITION["output_tokens"]
_CACHED = POSITION["cached_input_tokens"]
_CLASS = POSITION["service_class"]
_STARTED = POSITION["started_at"]
_FINISHED = POSITION["finished_at"]
_ESTIMATED = POSITION["estimated"]
_COST = POSITION["cost_nanos"]


@dataclass(slots=True)
class Stored:
    """What one committed batch counted."""

    inserted: int
    duplicates: int
    batch: str | None  # the spend outbox batch, None when nothing was inserted
    # organization -> (input, output, cached input) tokens inserted
    deltas: dict[str, tuple[int, int, int]]
    events: list[UsageEvent]  # the inserted events, only when asked for


_INCOMING = "billing_usage_incoming"
_COPY_TYPE_OF: dict[type, str] = {int: "int8", float: "float8", str: "text"}
_COPY_TYPES = [_COPY_TYPE_OF[kind] for kind in FIELD_TYPES]
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
    "cached_input_tokens",
    "service_class",
    "estimated",
    "cost_nanos",
    "provider_id",
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
# The sums of a rollup, and the part of each that batch lines make (billed at batch prices)
# and that each priced service tier makes (billed at its multiple of the online prices).
_SUMS = ("requests", "input_tokens", "output_tokens", "compute_ms", "cached_input_tokens")
_PARTS = (
    ServiceClass.BATCH.value,
    ServiceClass.PRIORITY.value,
    ServiceClass.FLEX.value,
    ServiceClass.PROVISIONED.value,
)
# Of requests relayed to upstream providers: what the providers charge (cost of goods,
# nanos) and how many had estimated counts. Totals only: no service class splits them.
_RELAYED_SUMS = ("cost_nanos", "estimated_requests")
_ROLLUP_SUMS = (
    *_SUMS,
    *(f"{part}_{name}" for part in _PARTS for name in _SUMS),
    *_RELAYED_SUMS,
)
_AGG_SUMS = ", ".join(
    [
        "count(*) AS requests",
        *(f"sum({name}) AS {name}" for name in _SUMS[1:]),
        *(
            item
            for part in _PARTS
            for item in (
                f"count(*) FILTER (WHERE service_class = '{part}') AS {part}_requests",
                *(
                    f"coalesce(sum({name}) FILTER (WHERE service_class = '{part}'), 0)"
                    f" AS {part}_{name}"
                    for name in _SUMS[1:]
                ),
            )
        ),
        "sum(cost_nanos) AS cost_nanos",
        "count(*) FILTER (WHERE estimated <> 0) AS estimated_requests",
    ]
)
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
    SELECT {_DIMS}, date_trunc('hour', occurred_at, 'UTC') AS hour, {_AGG_SUMS}
    FROM counted GROUP BY {_DIMS}, 6
), rollup AS (
    INSERT INTO billing_usagerollup AS r ({_DIMS}, hour, {", ".join(_ROLLUP_SUMS)}, updated_at)
    SELECT {_DIMS}, hour, {", ".join(_ROLLUP_SUMS)}, now()
    FROM agg ORDER BY {_DIMS}, hour
    ON CONFLICT ({_DIMS}, hour) DO UPDATE SET
        {"".join(f"{name} = r.{name} + EXCLUDED.{name}, " for name in _ROLLUP_SUMS)}
        updated_at = EXCLUDED.updated_at
), per_org AS (
    SELECT organization_id, sum(input_tokens) AS i, sum(output_tokens) AS o,
           sum(cached_input_tokens) AS c
    FROM agg GROUP BY organization_id
), outbox AS (
    INSERT INTO billing_spendoutbox (batch, deltas, request_ids, created_at)
    SELECT %s::uuid, jsonb_object_agg(organization_id, jsonb_build_array(i, o, c)),
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
    f"input_tokens, output_tokens, compute_ms, cached_input_tokens, service_class, "
    f"estimated, cost_nanos FROM {_INCOMING}"
)
_COUNTED_RETURNED = "SELECT * FROM ins"
_RETURNING = (
    f"RETURNING request_id, {_DIMS}, occurred_at, input_tokens, output_tokens, compute_ms, "
    "cached_input_tokens, service_class, estimated, cost_nanos"
)
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
    deltas = {org: spend_delta(v) for org, v in (deltas_json or {}).items()}
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
    f"INSERT INTO billing_usagerollup ({_DIMS}, hour, "  # noqa: S608
    f"{', '.join(_ROLLUP_SUMS)}, updated_at) "
    f"VALUES ({', '.join(['%s'] * (7 + len(_ROLLUP_SUMS)))}) "
    f"ON CONFLICT ({_DIMS}, hour) DO UPDATE SET "
    # Qualified (SQLite takes either; PostgreSQL, where tests run this path, needs it).
    + "".join(f"{name} = billing_usagerollup.{name} + excluded.{name}, " for name in _ROLLUP_SUMS)
    + "updated_at = excluded.updated_at"
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
                r[POSITION["request_id"]],
                ops.adapt_datetimefield_value(occurred),
                *(r[POSITION[n]] for n in _ROW_COLUMNS[2:11]),
                ops.adapt_datetimefield_value(datetime.fromtimestamp(r[_STARTED], UTC)),
                r[POSITION["queue_ms"]],
                r[POSITION["compute_ms"]],
                r[POSITION["worker"]],
                recorded,
                r[_CACHED],
                r[_CLASS],
                r[_ESTIMATED],
                r[_COST],
                r[POSITION["provider_id"]],
            ]
            cursor.execute(_PORTABLE_INSERT, values)
            if cursor.rowcount != 1:
                continue
            inserted.append(r)
            hour = ops.adapt_datetimefield_value(
                occurred.replace(minute=0, second=0, microsecond=0)
            )
            key = (*(r[POSITION[n]] for n in _DIMS.split(", ")), hour)
            acc = sums.setdefault(key, [0] * len(_ROLLUP_SUMS))
            counts = (1, *(r[POSITION[n]] for n in _SUMS[1:]))
            # A batch line or a tier's request counts in its part of each sum too (after
            # the totals, in _PARTS order).
            parts: tuple[int, ...] = (0,)
            if r[_CLASS] in _PARTS:
                parts = (0, len(_SUMS) * (1 + _PARTS.index(r[_CLASS])))
            for i, count in enumerate(counts):
                for offset in parts:
                    acc[offset + i] += count
            # The relayed sums, last (in _RELAYED_SUMS order).
            acc[-2] += r[_COST]
            acc[-1] += 1 if r[_ESTIMATED] else 0
        for key, totals in sorted(sums.items()):
            cursor.execute(_PORTABLE_ROLLUP, [*key, *totals, recorded])
    deltas: dict[str, list[int]] = {}
    for r in inserted:
        acc = deltas.setdefault(r[_ORG], [0, 0, 0])
        acc[0] += r[_INPUT]
        acc[1] += r[_OUTPUT]
        acc[2] += r[_CACHED]
    ids = [r[_REQUEST_ID] for r in inserted]
    if deltas:
        SpendOutbox.objects.create(
            batch=batch, deltas=deltas, request_ids=ids if keep_ids else None
        )
    return len(inserted), deltas or None, ids


def spend_delta(value: Sequence[Any]) -> tuple[int, int, int]:
    """An outbox row's (input, output, cached input) tokens of one organization. A row of
    the previous release (replayed after an upgrade) has no cached count: 0."""
    return int(value[0]), int(value[1]), int(value[2]) if len(value) > 2 else 0


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


def rollup_totals(organization_id: str | None = None) -> dict[str, int]:
    """Sums over the rollups (tests, the back office): requests, tokens, compute time, the
    batch lines' and each tier's part of each (`batch_requests`, `priority_requests`...),
    and of relayed requests the cost of goods (`cost_nanos`) and `estimated_requests`."""
    qs = UsageRollup.objects.all()
    if organization_id is not None:
        qs = qs.filter(organization_id=organization_id)
    sums = qs.aggregate(**{name: Sum(name) for name in _ROLLUP_SUMS})
    return {k: int(v or 0) for k, v in sums.items()}
