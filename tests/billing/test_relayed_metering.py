"""Relayed requests in the usage drain: cost of goods and estimated counts, exactly once.

A request the gateway relays to an upstream provider (docs/providers.md) is metered through
the same usage stream; its event carries what the provider charges (`cost_nanos`), whether
its counts are the gateway's estimate (`estimated`) and the provider. The drain stores them
in the raw row and sums `cost_nanos` and `estimated_requests` in the hourly rollup, in the
same statement as every other sum, so a redelivered event adds nothing.
"""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import connection

from billing.metering import partitions, stream
from billing.metering.drain import Drain, DrainTotals, usage_drain
from billing.metering.store import rollup_totals
from billing.models import UsageEvent, UsageRollup
from core.redis import get_redis
from gateway import relay
from tests.billing.metering_support import (
    UsageEventFactory,
    emit,
    expected_totals,
    hour_start,
    pending_count,
    raw_totals,
)
from tests.billing.metering_support import rollup_totals as token_totals
from workers.contract import USAGE_STREAM
from workers.contract import UsageEvent as ContractEvent

pytestmark = pytest.mark.django_db


def drain(**options: Any) -> DrainTotals:
    options.setdefault("hooks", ())
    return usage_drain(consumer="test", client=get_redis(), once=True, **options)


def relayed(**fields: Any) -> ContractEvent:
    """A request served by an upstream provider (0.0025 of cost of goods by default)."""
    fields.setdefault("cost_nanos", 2_500_000)
    fields.setdefault("provider_id", "prv_azure")
    fields.setdefault("worker", "")
    fields.setdefault("cached_input_tokens", 0)
    event: ContractEvent = UsageEventFactory(**fields)
    return event


def relayed_sums(**filters: Any) -> tuple[int, int]:
    """(cost_nanos, estimated_requests) summed over the rollups matching `filters`."""
    rows = UsageRollup.objects.filter(**filters).values_list("cost_nanos", "estimated_requests")
    return sum(r[0] for r in rows), sum(r[1] for r in rows)


def expected_sums(events: list[ContractEvent]) -> tuple[int, int]:
    return sum(e.cost_nanos for e in events), sum(1 for e in events if e.estimated)


@pytest.mark.parametrize("portable", [False, True], ids=["postgresql", "row-by-row"])
def test_a_relayed_events_cost_lands_once_in_its_rollup(
    monkeypatch: pytest.MonkeyPatch, portable: bool
) -> None:
    if portable:  # the row-by-row path bin/run takes on SQLite, run here on PostgreSQL
        monkeypatch.setattr(partitions, "is_partitioned", lambda: False)
    client = get_redis()
    base = hour_start(7200)
    first = [
        relayed(request_id="req_r1", finished_at=base + 1, cost_nanos=1_234_567),
        relayed(request_id="req_r2", finished_at=base + 2, cost_nanos=10, estimated=1),
        UsageEventFactory(request_id="req_pool", finished_at=base + 3),  # a pool's: no cost
        relayed(
            request_id="req_r3",
            finished_at=base + 4,
            organization_id="org_globex",
            cost_nanos=999,
            estimated=1,
        ),
    ]
    # The same event twice in one batch, then again (as after a crash) in later batches of
    # one beside a new relayed event of the same hour.
    emit(client, [*first, first[0]])
    drain()
    late = relayed(request_id="req_late", finished_at=base + 5, cost_nanos=7, estimated=1)
    emit(client, [first[1], late, first[0], first[3]])

    totals = drain(batch_size=1)

    assert (totals.inserted, totals.duplicates) == (1, 3)
    events = [*first, late]
    acme = [e for e in events if e.organization_id == "org_acme"]
    # 1,234,567 + 10 + 0 + 7 nanos; req_r2 and req_late estimated
    assert relayed_sums(organization_id="org_acme") == expected_sums(acme) == (1_234_584, 2)
    assert relayed_sums(organization_id="org_globex") == (999, 1)
    assert rollup_totals()["cost_nanos"] == 1_235_583
    assert rollup_totals()["estimated_requests"] == 3
    # The raw rows carry the three fields as emitted.
    stored = {
        r[0]: r[1:]
        for r in UsageEvent.objects.values_list(
            "request_id", "estimated", "cost_nanos", "provider_id"
        )
    }
    assert stored == {e.request_id: (e.estimated, e.cost_nanos, e.provider_id) for e in events}
    assert stored["req_pool"] == (0, 0, "")
    # The tokens are counted once too, relayed or not.
    assert raw_totals() == token_totals() == expected_totals(events)
    assert pending_count(client) == 0


def test_a_relayed_event_committed_but_not_acked_is_not_costed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = get_redis()
    events = [relayed(cost_nanos=1_000 * n, estimated=n % 2) for n in range(1, 5)]
    emit(client, events)
    # The first drain commits and dies before XACK: the entries stay pending.
    monkeypatch.setattr(Drain, "_acknowledge", lambda self, batch: None)
    usage_drain(consumer="first", client=client, once=True, hooks=())
    monkeypatch.undo()
    assert pending_count(client) == 4

    totals = usage_drain(consumer="second", client=client, once=True, hooks=(), claim_idle_ms=0)

    assert (totals.inserted, totals.duplicates) == (0, 4)
    assert relayed_sums() == (10_000, 2)
    assert pending_count(client) == 0


def test_an_event_without_the_relay_fields_costs_nothing() -> None:
    """A worker of the previous release sends none of them: not estimated, no cost."""
    client = get_redis()
    fields = UsageEventFactory(request_id="req_old_worker").to_fields()
    for name in ("estimated", "cost_nanos", "provider_id"):
        del fields[name]
    client.xadd(USAGE_STREAM, fields)  # type: ignore[arg-type]

    totals = drain()

    assert totals.inserted == 1
    stored = UsageEvent.objects.get(request_id="req_old_worker")
    assert (stored.estimated, stored.cost_nanos, stored.provider_id) == (0, 0, "")
    assert relayed_sums() == (0, 0)
    assert rollup_totals()["requests"] == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"cost_nanos": -1}, "cost_nanos out of range: -1"),
        ({"cost_nanos": 10**15 + 1}, f"cost_nanos out of range: {10**15 + 1}"),
        ({"estimated": 2}, "estimated must be 0 or 1: 2"),
        ({"estimated": -1}, "estimated must be 0 or 1: -1"),
    ],
)
def test_a_bad_cost_or_estimate_goes_to_the_dead_letters(
    fields: dict[str, int], reason: str
) -> None:
    client = get_redis()
    good = relayed(cost_nanos=5)
    bad = relayed(request_id="req_bad", **fields)
    emit(client, [good, bad])

    totals = drain()

    assert (totals.inserted, totals.dead) == (1, 1)
    assert list(UsageEvent.objects.values_list("request_id", flat=True)) == [good.request_id]
    assert relayed_sums() == (5, 0)
    [(_, dead)] = client.xrange(stream.DEAD_LETTER_STREAM)
    assert dead["_reason"] == reason
    assert pending_count(client) == 0


def test_a_rollup_upsert_that_names_no_relayed_column_counts_no_cost() -> None:
    """A drain of the previous release upserts rollups and inserts raw rows without the new
    columns during a rolling deploy: the database defaults hold them at 0, and a later
    upsert of this release adds to them."""
    hour = hour_start(7200)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing_usagerollup (organization_id, project_id, api_key_id, "
            "endpoint_id, model_name, hour, requests, input_tokens, output_tokens, updated_at) "
            "VALUES ('org_acme', 'proj_acme', 'key_acme', 'ep-acme', "
            "'smollm2-135m-instruct', to_timestamp(%s), 1, 10, 5, now())",
            [hour],
        )
    assert relayed_sums() == (0, 0)
    emit(get_redis(), [relayed(finished_at=hour + 9, cost_nanos=42, estimated=1)])

    drain()

    [row] = UsageRollup.objects.all()
    assert (row.requests, row.cost_nanos, row.estimated_requests) == (2, 42, 1)


def test_an_event_the_relay_emits_twice_is_costed_once() -> None:
    """Through the relay's own emit (the workers' guard script): the second emit of a
    request id appends nothing, and the drain stores and costs the one event."""
    event = relayed(request_id="req_relayed", cost_nanos=123_456_789, estimated=1)

    first = async_to_sync(relay.emit_usage)(event)
    again = async_to_sync(relay.emit_usage)(event)
    totals = drain()

    assert (first, again) == (True, False)
    assert (totals.inserted, totals.duplicates, totals.dead) == (1, 0, 0)
    stored = UsageEvent.objects.get(request_id="req_relayed")
    assert (stored.estimated, stored.cost_nanos) == (1, 123_456_789)
    assert stored.provider_id == "prv_azure"
    assert relayed_sums() == (123_456_789, 1)
