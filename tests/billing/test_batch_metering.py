"""Batch lines in the usage drain: their part of every rollup sum, exactly once.

A usage event of service class `batch` is counted in the rollup's totals like any other and
in the batch part of each (`batch_requests`, `batch_input_tokens`...), which the rater bills
at batch prices (tests/billing/test_batch_usage.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from billing.metering import partitions, stream
from billing.metering.drain import DrainTotals, usage_drain
from billing.models import UsageEvent, UsageRollup
from core.redis import get_redis
from tests.billing.metering_support import (
    UsageEventFactory,
    emit,
    expected_totals,
    hour_start,
    pending_count,
    raw_totals,
    rollup_totals,
)
from workers.contract import USAGE_STREAM
from workers.contract import UsageEvent as ContractEvent

pytestmark = pytest.mark.django_db

BATCH_PARTS = (
    "batch_requests",
    "batch_input_tokens",
    "batch_output_tokens",
    "batch_compute_ms",
    "batch_cached_input_tokens",
)


def drain(**options: Any) -> DrainTotals:
    options.setdefault("hooks", ())
    return usage_drain(consumer="test", client=get_redis(), once=True, **options)


def batch_line(**fields: Any) -> ContractEvent:
    event: ContractEvent = UsageEventFactory(service_class="batch", **fields)
    return event


def parts(events: Iterable[ContractEvent]) -> tuple[int, ...]:
    """The batch parts the rollups should hold for `events`, in BATCH_PARTS order."""
    lines = [e for e in events if e.service_class == "batch"]
    return (
        len(lines),
        sum(e.input_tokens for e in lines),
        sum(e.output_tokens for e in lines),
        sum(e.compute_ms for e in lines),
        sum(e.cached_input_tokens for e in lines),
    )


def rollup_parts(**filters: Any) -> tuple[int, ...]:
    rows = UsageRollup.objects.filter(**filters).values_list(*BATCH_PARTS)
    return tuple(sum(row[i] for row in rows) for i in range(len(BATCH_PARTS)))


@pytest.mark.parametrize("portable", [False, True], ids=["postgresql", "row-by-row"])
def test_batch_lines_are_counted_apart_and_exactly_once(
    monkeypatch: pytest.MonkeyPatch, portable: bool
) -> None:
    if portable:  # the row-by-row path bin/run takes on SQLite, run here on PostgreSQL
        monkeypatch.setattr(partitions, "is_partitioned", lambda: False)
    client = get_redis()
    base = hour_start(7200)
    first = [
        batch_line(finished_at=base + 1, input_tokens=40, output_tokens=7, compute_ms=11),
        UsageEventFactory(finished_at=base + 2, input_tokens=9, output_tokens=3),
        batch_line(finished_at=base + 3, input_tokens=64, cached_input_tokens=32),
        batch_line(finished_at=base + 4, organization_id="org_globex", input_tokens=5),
    ]
    emit(client, first)
    drain(batch_size=2)
    # Redelivered copies (as after a crash) beside a new batch line of the same hour.
    late = batch_line(request_id="req_late", finished_at=base + 5, input_tokens=8)
    emit(client, [first[0], late, first[2]])

    totals = drain()

    assert (totals.inserted, totals.duplicates) == (1, 2)
    events = [*first, late]
    stored = dict(UsageEvent.objects.values_list("request_id", "service_class"))
    assert stored == {e.request_id: e.service_class for e in events}
    acme = [e for e in events if e.organization_id == "org_acme"]
    # 3 lines; 40 + 64 + 8 input, 7 + 20 + 20 output, 11 + 1500 + 1500 ms, 10 + 32 + 2 cached
    assert rollup_parts(organization_id="org_acme") == parts(acme) == (3, 112, 47, 3011, 44)
    assert rollup_parts(organization_id="org_globex") == (1, 5, 20, 1500, 1)
    # The totals count the batch lines too: a part of each sum, not beside it.
    assert raw_totals() == rollup_totals() == expected_totals(events)
    assert pending_count(client) == 0


def test_online_usage_has_no_batch_part() -> None:
    client = get_redis()
    emit(client, UsageEventFactory.create_batch(3))

    drain()

    assert rollup_parts() == (0, 0, 0, 0, 0)
    assert set(UsageEvent.objects.values_list("service_class", flat=True)) == {"online"}


def test_an_event_of_a_worker_without_the_service_class_is_online() -> None:
    client = get_redis()
    fields = UsageEventFactory(request_id="req_old_worker").to_fields()
    del fields["service_class"]
    client.xadd(USAGE_STREAM, fields)  # type: ignore[arg-type]

    totals = drain()

    assert totals.inserted == 1
    assert UsageEvent.objects.get(request_id="req_old_worker").service_class == "online"
    assert rollup_parts() == (0, 0, 0, 0, 0)


def test_an_unknown_service_class_goes_to_the_dead_letters() -> None:
    client = get_redis()
    good = batch_line()
    bad = UsageEventFactory(request_id="req_spot", service_class="spot")
    emit(client, [good, bad])

    totals = drain()

    assert (totals.inserted, totals.dead) == (1, 1)
    assert list(UsageEvent.objects.values_list("request_id", flat=True)) == [good.request_id]
    assert rollup_parts() == parts([good])
    [(_, dead)] = client.xrange(stream.DEAD_LETTER_STREAM)
    assert dead["_reason"] == "unknown service_class 'spot'"
    assert pending_count(client) == 0


def test_a_rollup_insert_that_names_no_batch_column_counts_no_batch_part() -> None:
    """A drain of the previous release upserts rollups without the batch columns: the
    database defaults hold them at 0 (its batch lines are billed as online ones)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing_usagerollup (organization_id, project_id, api_key_id, "
            "endpoint_id, model_name, hour, requests, input_tokens, output_tokens, updated_at) "
            "VALUES ('org_old', 'p', 'k', 'e', 'm', now(), 1, 10, 5, now())"
        )

    assert rollup_parts(organization_id="org_old") == (0, 0, 0, 0, 0)
