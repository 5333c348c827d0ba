"""The usage drain in-process: exact rows and rollups, duplicates, dead letters, lag, hooks."""

from __future__ import annotations

import math
import operator
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db import DataError, connection
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from billing.metering import outbox, parse, partitions, store, stream
from billing.metering.drain import Drain, DrainTotals, usage_drain
from billing.models import SpendOutbox, UsageEvent, UsageRollup
from core.redis import get_redis
from tests.billing.metering_support import (
    UsageEventFactory,
    cached_spend,
    emit,
    expected_totals,
    hour_start,
    outbox_count,
    pending_count,
    raw_totals,
    rollup_rows,
    rollup_totals,
    spend,
)
from workers.contract import USAGE_STREAM
from workers.contract import UsageEvent as ContractEvent

pytestmark = pytest.mark.django_db


def drain(**options: Any) -> DrainTotals:
    options.setdefault("hooks", ())
    return usage_drain(consumer="test", client=get_redis(), once=True, **options)


def test_drain_writes_exact_raw_rows_rollups_and_spend() -> None:
    base = hour_start(7200)
    events = [
        UsageEventFactory(request_id="req_a", finished_at=base + 10, input_tokens=7),
        UsageEventFactory(request_id="req_b", finished_at=base + 20, output_tokens=5),
        UsageEventFactory(request_id="req_c", finished_at=base + 3600 + 1, input_tokens=1),
        UsageEventFactory(request_id="req_d", finished_at=base + 30, api_key_id="key_other"),
        UsageEventFactory(
            request_id="req_e", finished_at=base + 40, organization_id="org_globex", queue_ms=9
        ),
    ]
    emit(get_redis(), events)

    totals = drain()

    assert totals == DrainTotals(batches=1, inserted=5, duplicates=0, dead=0)
    stored = UsageEvent.objects.get(request_id="req_e")
    assert (stored.organization_id, stored.project_id, stored.api_key_id) == (
        "org_globex",
        "proj_acme",
        "key_acme",
    )
    assert (stored.endpoint_id, stored.model_version_id, stored.model_name) == (
        "ep-acme",
        "mv_smollm",
        "smollm2-135m-instruct",
    )
    assert (stored.input_tokens, stored.output_tokens, stored.status) == (100, 20, "stop")
    assert stored.occurred_at.timestamp() == base + 40
    assert stored.started_at.timestamp() == base + 38.5
    assert (stored.queue_ms, stored.compute_ms, stored.worker) == (9, 1500, "cpu-test")
    assert UsageEvent.objects.count() == 5
    model = "smollm2-135m-instruct"
    assert rollup_rows() == [
        ("org_acme", "proj_acme", "key_acme", "ep-acme", model, base, 2, 107, 25),
        ("org_acme", "proj_acme", "key_acme", "ep-acme", model, base + 3600, 1, 1, 20),
        ("org_acme", "proj_acme", "key_other", "ep-acme", model, base, 1, 100, 20),
        ("org_globex", "proj_acme", "key_acme", "ep-acme", model, base, 1, 100, 20),
    ]
    assert spend(get_redis(), "org_acme") == (208, 65)
    assert spend(get_redis(), "org_globex") == (100, 20)
    assert pending_count(get_redis()) == 0
    assert outbox_count() == 0


def test_later_batches_add_to_existing_rollups() -> None:
    base = hour_start(7200)
    emit(get_redis(), [UsageEventFactory(finished_at=base + 1, input_tokens=3)])
    drain()
    emit(get_redis(), [UsageEventFactory(finished_at=base + 2, input_tokens=4)])

    drain()

    model = "smollm2-135m-instruct"
    assert rollup_rows() == [
        ("org_acme", "proj_acme", "key_acme", "ep-acme", model, base, 2, 7, 40),
    ]
    assert spend(get_redis(), "org_acme") == (7, 40)


def test_same_event_twice_in_one_batch_is_counted_once() -> None:
    event = UsageEventFactory()
    emit(get_redis(), [event, event])

    totals = drain()

    assert (totals.inserted, totals.duplicates) == (1, 1)
    assert raw_totals() == expected_totals([event])
    assert rollup_totals() == expected_totals([event])
    assert spend(get_redis(), "org_acme") == (100, 20)
    assert pending_count(get_redis()) == 0


def test_same_event_in_two_batches_is_counted_once() -> None:
    # Batches of one: the second copy meets the stored row (the unique-violation path).
    event, other = UsageEventFactory(), UsageEventFactory()
    emit(get_redis(), [event, other, event])

    totals = drain(batch_size=1)

    assert (totals.batches, totals.inserted, totals.duplicates) == (3, 2, 1)
    assert raw_totals() == expected_totals([event, other])
    assert rollup_totals() == expected_totals([event, other])
    assert spend(get_redis(), "org_acme") == (200, 40)
    assert outbox_count() == 0


def test_batch_mixing_new_and_stored_events_counts_only_the_new_ones() -> None:
    old = UsageEventFactory.create_batch(3)
    emit(get_redis(), old)
    drain()
    new = UsageEventFactory.create_batch(2)
    emit(get_redis(), [*old, *new])

    totals = drain()

    assert (totals.inserted, totals.duplicates) == (2, 3)
    assert raw_totals() == expected_totals([*old, *new])
    assert rollup_totals() == expected_totals([*old, *new])
    assert spend(get_redis(), "org_acme") == (500, 100)


def test_entry_pending_in_a_dead_consumer_is_claimed_and_counted_once() -> None:
    client = get_redis()
    events = UsageEventFactory.create_batch(3)
    emit(client, events)
    stream.ensure_group(client)
    # A consumer took the entries and died before storing anything.
    client.xreadgroup(stream.GROUP, "dead", {USAGE_STREAM: ">"}, count=10)
    assert pending_count(client) == 3

    totals = drain(claim_idle_ms=0)

    assert totals.inserted == 3
    assert raw_totals() == expected_totals(events)
    assert pending_count(client) == 0


def test_entry_committed_but_not_acked_is_not_counted_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = get_redis()
    events = UsageEventFactory.create_batch(4)
    emit(client, events)
    # The first drain commits and dies before XACK: the entries stay pending.
    monkeypatch.setattr(Drain, "_acknowledge", lambda self, batch: None)
    usage_drain(consumer="first", client=client, once=True, hooks=())
    monkeypatch.undo()
    assert pending_count(client) == 4

    totals = usage_drain(consumer="second", client=client, once=True, hooks=(), claim_idle_ms=0)

    assert (totals.inserted, totals.duplicates) == (0, 4)
    assert raw_totals() == expected_totals(events)
    assert rollup_totals() == expected_totals(events)
    assert spend(client, "org_acme") == (400, 80)
    assert pending_count(client) == 0


def test_restarted_consumer_takes_back_its_own_pending_entries_at_once() -> None:
    client = get_redis()
    events = UsageEventFactory.create_batch(2)
    emit(client, events)
    stream.ensure_group(client)
    client.xreadgroup(stream.GROUP, "test", {USAGE_STREAM: ">"}, count=10)

    totals = drain()  # same consumer name; the default claim idle time has not passed

    assert totals.inserted == 2
    assert pending_count(client) == 0


BAD_FIELDS = [
    ({"input_tokens": "many"}, "malformed field"),
    ({"output_tokens": "-1"}, "output_tokens out of range"),
    ({"input_tokens": str(10**13)}, "input_tokens out of range"),
    ({"organization_id": ""}, "organization_id is empty"),
    ({"request_id": ""}, "request_id is empty"),
    ({"model_name": "m" * 201}, "model_name is longer than 200 characters"),
    ({"worker": "a\x00b"}, "worker contains a NUL character"),
    ({"finished_at": "nan"}, "finished_at outside the accepted window"),
    ({"finished_at": str(time.time() + 3 * 86400)}, "finished_at outside the accepted window"),
    ({"finished_at": "1000000000"}, "finished_at outside the accepted window"),
]


@pytest.mark.parametrize(("override", "reason"), BAD_FIELDS)
def test_bad_entry_goes_to_the_dead_letters_and_does_not_block_the_batch(
    override: dict[str, str], reason: str
) -> None:
    client = get_redis()
    good = UsageEventFactory()
    bad_fields = {**UsageEventFactory().to_fields(), **override}
    bad_id = client.xadd(USAGE_STREAM, bad_fields)  # type: ignore[arg-type]
    emit(client, [good])

    totals = drain()

    assert (totals.inserted, totals.dead) == (1, 1)
    assert raw_totals() == expected_totals([good])
    assert list(UsageEvent.objects.values_list("request_id", flat=True)) == [good.request_id]
    dead = client.xrange(stream.DEAD_LETTER_STREAM)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields["_source_id"] == bad_id
    assert fields["_reason"].startswith(reason)
    assert {k: v for k, v in fields.items() if not k.startswith("_")} == bad_fields
    assert pending_count(client) == 0


def test_lag_metric_moves_with_the_oldest_uncounted_event() -> None:
    client = get_redis()
    assert stream.drain_lag_seconds(client) == 0.0
    old_ms = int(time.time() * 1000) - 5000
    client.xadd(USAGE_STREAM, UsageEventFactory().to_fields(), id=f"{old_ms}-0")  # type: ignore[arg-type]
    emit(client, [UsageEventFactory()])
    drain_ = Drain(consumer="test", client=client, hooks=())
    drain_.setup()

    drain_.maintain(force=True)

    lag = REGISTRY.get_sample_value("mantle_usage_drain_lag_seconds")
    assert lag is not None
    assert 5.0 <= lag < 60.0
    assert stream.drain_lag_seconds(client) >= 5.0
    drain()
    assert stream.drain_lag_seconds(client) == 0.0


def test_lag_counts_entries_delivered_but_not_acknowledged() -> None:
    client = get_redis()
    old_ms = int(time.time() * 1000) - 8000
    client.xadd(USAGE_STREAM, UsageEventFactory().to_fields(), id=f"{old_ms}-0")  # type: ignore[arg-type]
    stream.ensure_group(client)
    client.xreadgroup(stream.GROUP, "slow", {USAGE_STREAM: ">"}, count=10)

    assert stream.drain_lag_seconds(client) >= 8.0


def test_stream_is_trimmed_only_below_what_every_group_has_counted() -> None:
    client = get_redis()
    emit(client, UsageEventFactory.create_batch(3))
    drain()
    kept = emit(client, UsageEventFactory.create_batch(2))  # not delivered yet

    stream.usage_stream_trim(client)

    remaining = [entry_id for entry_id, _ in client.xrange(USAGE_STREAM)]
    assert remaining[-2:] == kept  # undelivered entries are never trimmed
    drain()
    assert raw_totals().requests == 5


def test_hooks_get_the_inserted_events_only() -> None:
    client = get_redis()
    stored, new = UsageEventFactory(), UsageEventFactory(input_tokens=9)
    emit(client, [stored])
    drain()
    seen: list[ContractEvent] = []
    emit(client, [stored, new])

    usage_drain(consumer="test", client=client, once=True, hooks=[seen.extend])

    assert seen == [new]


def test_failing_hook_keeps_the_batch_in_the_outbox_until_a_replay_succeeds() -> None:
    client = get_redis()
    events = UsageEventFactory.create_batch(2)
    emit(client, events)
    calls: list[Sequence[ContractEvent]] = []

    def flaky(batch: Sequence[ContractEvent]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("downstream unavailable")

    usage_drain(consumer="test", client=client, once=True, hooks=[flaky])

    assert outbox_count() == 1
    assert spend(client, "org_acme") == (200, 40)  # spend applied once already

    assert outbox.outbox_replay(client, hooks=[flaky]) == 1

    assert outbox_count() == 0
    assert sorted(e.request_id for e in calls[1]) == sorted(e.request_id for e in events)
    assert spend(client, "org_acme") == (200, 40)  # not applied a second time


def test_outbox_replay_after_a_crash_between_commit_and_spend_applies_once() -> None:
    client = get_redis()
    events = UsageEventFactory.create_batch(3, organization_id="org_initech")
    rows = parse.assemble_batch([(str(i), _flat(e)) for i, e in enumerate(events)]).rows
    partitions.usage_partitions_ensure(months=store.usage_rows_months(rows))
    store.usage_batch_store(rows)  # committed; the drain "died" before Redis
    assert spend(client, "org_initech") == (0, 0)

    assert outbox.outbox_replay(client) == 1
    assert outbox.outbox_replay(client) == 0

    assert spend(client, "org_initech") == (300, 60)
    assert SpendOutbox.objects.count() == 0


def test_cached_input_tokens_are_stored_rolled_up_and_spent_exactly_once() -> None:
    client = get_redis()
    base = hour_start(7200)
    first = [
        UsageEventFactory(finished_at=base + 1, input_tokens=9, cached_input_tokens=9),
        UsageEventFactory(finished_at=base + 2, input_tokens=9, cached_input_tokens=0),
        UsageEventFactory(
            finished_at=base + 3, organization_id="org_globex", input_tokens=50,
            cached_input_tokens=32,
        ),
    ]  # fmt: skip
    emit(client, first)
    drain(batch_size=2)
    # Redelivered copies (as after a crash) next to one new event of the same hour.
    late = UsageEventFactory(
        request_id="req_d", finished_at=base + 4, input_tokens=5, cached_input_tokens=4
    )
    emit(client, [first[0], late, first[2]])

    totals = drain()

    assert (totals.inserted, totals.duplicates) == (1, 2)
    stored = dict(UsageEvent.objects.values_list("request_id", "cached_input_tokens"))
    assert stored == {e.request_id: e.cached_input_tokens for e in [*first, late]}
    assert sorted(stored.values()) == [0, 4, 9, 32]
    rollups = UsageRollup.objects.order_by("organization_id")
    assert [(r.organization_id, r.input_tokens, r.cached_input_tokens) for r in rollups] == [
        ("org_acme", 23, 13),
        ("org_globex", 50, 32),
    ]
    assert raw_totals() == rollup_totals() == expected_totals([*first, late])
    assert (cached_spend(client, "org_acme"), cached_spend(client, "org_globex")) == (13, 32)
    assert spend(client, "org_acme") == (23, 60)


def test_hooks_replayed_from_the_outbox_get_the_cached_counts() -> None:
    client = get_redis()
    events = [UsageEventFactory(input_tokens=40, cached_input_tokens=c) for c in (0, 17, 40)]
    emit(client, events)
    calls: list[list[ContractEvent]] = []

    def flaky(batch: Sequence[ContractEvent]) -> None:
        calls.append(list(batch))
        if len(calls) == 1:
            raise RuntimeError("downstream unavailable")

    usage_drain(consumer="test", client=client, once=True, hooks=[flaky])
    outbox.outbox_replay(client, hooks=[flaky])

    # The replay reads the events back from the raw table: the same events, counts and all.
    key = operator.attrgetter("request_id")
    assert sorted(calls[0], key=key) == sorted(calls[1], key=key) == sorted(events, key=key)


def test_an_outbox_row_of_the_previous_release_is_replayed_without_cached_counts() -> None:
    client = get_redis()
    # Written by a drain that predates cached input tokens: two numbers per organization.
    SpendOutbox.objects.create(batch=uuid.uuid4(), deltas={"org_old": [12, 34]})

    assert outbox.outbox_replay(client) == 1

    assert spend(client, "org_old") == (12, 34)
    assert cached_spend(client, "org_old") == 0


def test_an_event_of_a_worker_without_the_cached_count_has_none() -> None:
    client = get_redis()
    fields = UsageEventFactory(request_id="req_old_worker").to_fields()
    del fields["cached_input_tokens"]
    client.xadd(USAGE_STREAM, fields)  # type: ignore[arg-type]

    totals = drain()

    assert totals.inserted == 1
    stored = UsageEvent.objects.get(request_id="req_old_worker")
    assert (stored.input_tokens, stored.cached_input_tokens) == (100, 0)
    assert rollup_totals().cached_input_tokens == 0


def test_more_cached_than_input_tokens_goes_to_the_dead_letters() -> None:
    client = get_redis()
    good = UsageEventFactory()
    bad = UsageEventFactory(request_id="req_bad", input_tokens=10, cached_input_tokens=11)
    emit(client, [good, bad])

    totals = drain()

    assert (totals.inserted, totals.dead) == (1, 1)
    assert list(UsageEvent.objects.values_list("request_id", flat=True)) == [good.request_id]
    assert rollup_totals() == expected_totals([good])
    [(_, dead)] = client.xrange(stream.DEAD_LETTER_STREAM)
    assert dead["_reason"] == "cached_input_tokens 11 exceeds input_tokens 10"
    assert pending_count(client) == 0


def test_spend_apply_is_once_per_batch() -> None:
    client = get_redis()

    assert outbox.spend_apply(client, batch="b1", deltas={"org_x": (5, 6)}) is True
    assert outbox.spend_apply(client, batch="b1", deltas={"org_x": (5, 6)}) is False

    assert spend(client, "org_x") == (5, 6)


def test_storing_the_same_rows_again_inserts_nothing() -> None:
    events = UsageEventFactory.create_batch(3)
    rows = parse.assemble_batch([(str(i), _flat(e)) for i, e in enumerate(events)]).rows
    partitions.usage_partitions_ensure(months=store.usage_rows_months(rows))
    first = store.usage_batch_store(rows)

    again = store.usage_batch_store(rows)

    assert (first.inserted, again.inserted, again.duplicates) == (3, 0, 3)
    assert again.batch is None
    assert again.deltas == {}
    assert rollup_totals() == expected_totals(events)
    assert SpendOutbox.objects.count() == 1  # only the first batch's


def test_events_in_two_months_go_to_their_own_partitions() -> None:
    this_month = partitions.month_start(datetime.now(UTC))
    edge = this_month.timestamp()
    before, after = UsageEventFactory(finished_at=edge - 0.5), UsageEventFactory(finished_at=edge)
    emit(get_redis(), [before, after])

    drain()

    previous = partitions.partition_for(partitions.add_months(this_month, -1)).name
    current = partitions.partition_for(this_month).name
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT request_id FROM {previous}")  # noqa: S608
        assert cursor.fetchall() == [(before.request_id,)]
        cursor.execute(f"SELECT request_id FROM {current}")  # noqa: S608
        assert cursor.fetchall() == [(after.request_id,)]
    hours = [row[5] for row in rollup_rows()]
    assert hours == [edge - 3600, edge]


def _flat(event: ContractEvent) -> list[str]:
    flat: list[str] = []
    for name, value in event.to_fields().items():
        flat += [name, value]
    return flat


_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    event=st.builds(
        ContractEvent,
        request_id=_ids,
        organization_id=_ids,
        project_id=_ids,
        api_key_id=_ids,
        endpoint_id=_ids,
        model_version_id=_ids,
        model_name=_ids,
        input_tokens=st.integers(0, 10**12),
        output_tokens=st.integers(0, 10**12),
        status=st.sampled_from(["stop", "length", "cancelled", "error"]),
        started_at=st.floats(1.7e9, 1.8e9),
        finished_at=st.floats(1.7e9, 1.8e9),
        queue_ms=st.integers(0, 10**9),
        compute_ms=st.integers(0, 10**9),
        worker=st.text(max_size=20).filter(lambda s: "\x00" not in s),
    )
)
def test_parse_entry_reads_events_as_the_contract_does(event: ContractEvent) -> None:
    fields = event.to_fields()

    values = parse.parse_entry(fields, not_before=0.0, not_after=math.inf)

    assert ContractEvent(*values) == ContractEvent.from_fields(fields) == event


@pytest.mark.parametrize("worker", ["node\t7", "node\n7", "back\\slash", "tab\tand\tmore\t"])
def test_values_with_separators_are_stored_as_sent(worker: str) -> None:
    event = UsageEventFactory(worker=worker)
    emit(get_redis(), [event, UsageEventFactory()])

    totals = drain()

    assert totals.inserted == 2
    assert UsageEvent.objects.get(request_id=event.request_id).worker == worker


def test_entries_with_unknown_or_missing_fields_are_read_as_the_contract_says() -> None:
    client = get_redis()
    fields = UsageEventFactory().to_fields()
    extra = {**fields, "region": "eu", "request_id": "req_extra"}
    missing = {k: v for k, v in fields.items() if k not in ("worker", "queue_ms")}
    missing["request_id"] = "req_missing"
    client.xadd(USAGE_STREAM, extra)  # type: ignore[arg-type]
    client.xadd(USAGE_STREAM, missing)  # type: ignore[arg-type]

    totals = drain()

    assert totals.inserted == 2
    stored = UsageEvent.objects.get(request_id="req_missing")
    assert (stored.worker, stored.queue_ms) == ("", 0)


def test_rows_the_database_refuses_go_to_the_dead_letters_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = get_redis()
    good, poison = UsageEventFactory(), UsageEventFactory(request_id="req_poison")
    emit(client, [good, poison])
    real_store = store.usage_batch_store

    def picky_store(rows: Sequence[Sequence[Any]], **options: Any) -> store.Stored:
        if any(r[0] == "req_poison" for r in rows):
            raise DataError("value refused")
        return real_store(rows, **options)

    monkeypatch.setattr(store, "usage_batch_store", picky_store)

    totals = drain()

    assert (totals.inserted, totals.dead) == (1, 1)
    assert list(UsageEvent.objects.values_list("request_id", flat=True)) == [good.request_id]
    dead = client.xrange(stream.DEAD_LETTER_STREAM)
    assert [fields["request_id"] for _, fields in dead] == ["req_poison"]
    assert dead[0][1]["_reason"] == "refused by the database: value refused"
    assert pending_count(client) == 0


def test_a_failing_reader_stops_the_drain_with_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    client = get_redis()
    emit(client, [UsageEventFactory()])

    def broken(*args: Any, **kwargs: Any) -> parse.Batch:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(parse, "assemble_batch", broken)

    with pytest.raises(RuntimeError, match="reader failed"):
        drain()

    assert UsageEvent.objects.count() == 0
    assert pending_count(client) == 1  # left for the next start
