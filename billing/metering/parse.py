"""Parsing: usage stream entries into rows for the store, or dead letters with a reason.

Between reading (stream.py) and storing (store.py) in docs/billing.md's "Exactly once, step
by step". A row is the event's values in contract field order; entries that cannot be
counted (malformed, unattributable, outside the retention window) are set aside with the
reason, to be dead-lettered with the acknowledgement.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from billing.metering import partitions
from billing.metering.stream import RawEntry
from billing.models import UsageEvent as UsageEventRow
from workers.contract import ServiceClass, UsageEvent

MAX_TOKENS_PER_EVENT = 10**12
MAX_COST_NANOS_PER_EVENT = 10**15
"""A relayed request's cost of goods above this (a million in the currency) is a gateway's
error (a cost per token entered per million, say), not a request's cost."""
MAX_FUTURE_S = 24 * 3600.0
"""Events dated further ahead than this are refused: a worker's clock has gone wrong."""


class InvalidUsage(ValueError):
    """An entry of the usage stream that cannot be counted; it goes to the dead letters."""


def _field_type(f: dataclasses.Field[Any]) -> type:
    # The rules of UsageEvent.from_fields, resolved once instead of per event.
    if f.type in ("int", int):
        return int
    if f.type in ("float", float):
        return float
    return str


_CONTRACT_FIELDS = dataclasses.fields(UsageEvent)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in _CONTRACT_FIELDS)
FIELD_TYPES: tuple[type, ...] = tuple(_field_type(f) for f in _CONTRACT_FIELDS)
"""Each field's Python type after parsing (int, float or str), in contract order."""
POSITION: Mapping[str, int] = {name: i for i, name in enumerate(FIELD_NAMES)}
"""A field's index in a parsed row (`parse_entry`'s values)."""
_REQUIRED = tuple(POSITION[n] for n in ("request_id", "organization_id", "model_name"))


def _max_length(name: str) -> int:
    model_field = UsageEventRow._meta.get_field(name)
    return int(getattr(model_field, "max_length", 0) or 0)


_STR_LIMITS = tuple(
    (i, name, _max_length(name))
    for i, (name, kind) in enumerate(zip(FIELD_NAMES, FIELD_TYPES, strict=True))
    if kind is str
)
_COUNTS = tuple(
    POSITION[n]
    for n in ("input_tokens", "output_tokens", "queue_ms", "compute_ms", "cached_input_tokens")
)
_INPUT = POSITION["input_tokens"]
_CACHED = POSITION["cached_input_tokens"]
_CLASS = POSITION["service_class"]
_ESTIMATED = POSITION["estimated"]
_COST = POSITION["cost_nanos"]
_CLASSES = frozenset(c.value for c in ServiceClass)
_REQUEST_ID = POSITION["request_id"]
_STARTED = POSITION["started_at"]
_FINISHED = POSITION["finished_at"]


_INTS = tuple(i for i, kind in enumerate(FIELD_TYPES) if kind is int)
_FLOATS = tuple(i for i, kind in enumerate(FIELD_TYPES) if kind is float)
_NAME_LIST = list(FIELD_NAMES)


def parse_entry(fields: Mapping[str, str], *, not_before: float, not_after: float) -> list[Any]:
    """The event's values in contract field order, converted as UsageEvent.from_fields does.

    `UsageEvent(*values)` is the event. Raises InvalidUsage for what the database would
    refuse or billing cannot attribute: missing ids, negative or absurd counts, strings
    longer than their column, more cached input tokens than input tokens, a service class
    that is not a `ServiceClass` (a worker that predates the field sends none: online),
    a cost of goods below 0 or above MAX_COST_NANOS_PER_EVENT, `estimated` other than 0 or
    1 (an event that predates them has neither: 0), times outside [not_before, not_after).
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
    if values[_CACHED] > values[_INPUT]:
        # Cached tokens are a part of the prompt: more of them than the prompt had is a
        # worker's error, and would bill the prompt at the cheaper price.
        raise InvalidUsage(
            f"cached_input_tokens {values[_CACHED]} exceeds input_tokens {values[_INPUT]}"
        )
    if not 0 <= values[_COST] <= MAX_COST_NANOS_PER_EVENT:
        raise InvalidUsage(f"cost_nanos out of range: {values[_COST]}")
    if values[_ESTIMATED] not in (0, 1):
        raise InvalidUsage(f"estimated must be 0 or 1: {values[_ESTIMATED]}")
    if not values[_CLASS]:
        values[_CLASS] = ServiceClass.ONLINE.value
    elif values[_CLASS] not in _CLASSES:
        # A class of a later release: its price is unknown here, so it waits (dead-lettered,
        # replayable after the upgrade) rather than be billed at a guess.
        raise InvalidUsage(f"unknown service_class {values[_CLASS]!r}")
    finished = values[_FINISHED]
    if not (math.isfinite(finished) and not_before <= finished < not_after):
        raise InvalidUsage(f"finished_at outside the accepted window: {finished}")
    if not math.isfinite(values[_STARTED]) or abs(values[_STARTED]) > 1e11:
        raise InvalidUsage(f"started_at is not a time: {values[_STARTED]}")
    return values


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
