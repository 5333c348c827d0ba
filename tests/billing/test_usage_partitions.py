"""Monthly partitions of the raw usage table: created ahead, dropped past retention."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.conf import settings
from django.db import connection

from billing.metering import parse, partitions, store
from billing.metering import tasks as metering_tasks
from billing.models import UsageEvent, UsageRollup
from config.celery import app
from tests.billing.metering_support import UsageEventFactory

pytestmark = pytest.mark.django_db


def _bounds(name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c WHERE c.relname = %s",
            [name],
        )
        row = cursor.fetchone()
    return str(row[0]) if row else ""


def _store(*events: object) -> None:
    rows = parse.assemble_batch(
        [(str(i), _flat(e)) for i, e in enumerate(events)],
        now=events[-1].finished_at,  # type: ignore[attr-defined]
    ).rows
    partitions.usage_partitions_ensure(months=store.usage_rows_months(rows))
    store.usage_batch_store(rows)


def _flat(event: object) -> list[str]:
    flat: list[str] = []
    for name, value in event.to_fields().items():  # type: ignore[attr-defined]
        flat += [name, value]
    return flat


def test_ensure_creates_this_month_and_the_next_once() -> None:
    now = datetime(2031, 12, 15, 8, 30, tzinfo=UTC)

    created = partitions.usage_partitions_ensure(now=now)

    assert created == ["billing_usageevent_p203112", "billing_usageevent_p203201"]
    assert partitions.usage_partitions_ensure(now=now) == []
    assert _bounds("billing_usageevent_p203112") == (
        "FOR VALUES FROM ('2031-12-01 00:00:00+00') TO ('2032-01-01 00:00:00+00')"
    )
    names = [p.name for p in partitions.usage_partitions_list()]
    assert names[-2:] == created


def test_the_migration_left_partitions_for_today() -> None:
    this_month = partitions.month_start(datetime.now(UTC))

    starts = [p.start for p in partitions.usage_partitions_list()]

    assert this_month in starts


def test_retention_drops_whole_months_before_the_cutoff_and_keeps_rollups() -> None:
    now = datetime.now(UTC)
    cutoff = partitions.retention_cutoff(now=now, months=13)
    old = UsageEventFactory(finished_at=partitions.add_months(cutoff, -2).timestamp() + 3600)
    older = UsageEventFactory(finished_at=partitions.add_months(cutoff, -3).timestamp() + 7200)
    kept = UsageEventFactory(finished_at=cutoff.timestamp() + 60)
    for event in (older, old, kept):
        _store(event)
    before = partitions.usage_partitions_list()

    dropped = partitions.usage_partitions_drop_expired(now=now, retention_months=13)

    assert dropped == [p.name for p in before if p.end <= cutoff]
    assert partitions.partition_for(partitions.add_months(cutoff, -3)).name in dropped
    assert partitions.partition_for(cutoff).name not in dropped
    assert list(UsageEvent.objects.values_list("request_id", flat=True)) == [kept.request_id]
    assert UsageRollup.objects.count() == 3  # invoices read rollups: they are kept
    remaining = [p.start for p in partitions.usage_partitions_list()]
    assert partitions.month_start(now) in remaining
    assert min(remaining) == cutoff


def test_retention_uses_the_setting_by_default() -> None:
    now = datetime(2031, 6, 10, tzinfo=UTC)

    cutoff = partitions.retention_cutoff(now=now)

    assert settings.MANTLE_USAGE_RETENTION_MONTHS == 13
    assert cutoff == datetime(2030, 5, 1, tzinfo=UTC)


def test_drain_refuses_events_older_than_retention() -> None:
    now = datetime.now(UTC).timestamp()
    cutoff = partitions.retention_cutoff().timestamp()
    inside, outside = (
        UsageEventFactory(finished_at=cutoff),
        UsageEventFactory(finished_at=cutoff - 1),
    )

    batch = parse.assemble_batch([("1-0", _flat(inside)), ("2-0", _flat(outside))], now=now)

    assert [r[0] for r in batch.rows] == [inside.request_id]
    assert [d[0] for d in batch.dead] == ["2-0"]


def test_partition_tasks_are_scheduled_daily_on_the_billing_queue() -> None:
    schedule = settings.CELERY_BEAT_SCHEDULE

    entries = [schedule["usage-partitions-ensure"], schedule["usage-partitions-drop-expired"]]

    assert [e["task"] for e in entries] == [
        "mantle.billing.usage_partitions_ensure",
        "mantle.billing.usage_partitions_drop_expired",
    ]
    assert all(e["schedule"] == 86400.0 and e["options"] == {"queue": "billing"} for e in entries)
    app.loader.import_default_modules()
    assert "mantle.billing.usage_partitions_ensure" in app.tasks
    assert "mantle.billing.usage_partitions_drop_expired" in app.tasks


def test_partition_tasks_run_the_services() -> None:
    created = metering_tasks.usage_partitions_ensure.delay().get()
    dropped = metering_tasks.usage_partitions_drop_expired.delay().get()

    assert created == []  # the migration made this month's and next month's
    assert dropped == []
