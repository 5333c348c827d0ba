"""Monthly partitions of the raw usage table (PostgreSQL): made ahead, dropped past retention."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.db import connection, transaction

logger = logging.getLogger(__name__)

PARENT = "billing_usageevent"
_NAME = re.compile(rf"^{PARENT}_p(\d{{4}})(\d{{2}})$")
# Serialises partition DDL between drains and the beat task (any constant works; this
# one is "usageprt" in ASCII).
_LOCK_ID = 0x7573616765707274


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    start: datetime  # first instant of the month, UTC
    end: datetime  # first instant of the next month (exclusive)


def month_start(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def add_months(start: datetime, months: int) -> datetime:
    index = start.year * 12 + (start.month - 1) + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def partition_for(start: datetime) -> Partition:
    start = month_start(start)
    return Partition(name=f"{PARENT}_p{start:%Y%m}", start=start, end=add_months(start, 1))


def is_partitioned() -> bool:
    """Only PostgreSQL partitions the raw table; SQLite keeps one plain table."""
    return connection.vendor == "postgresql"


def retention_cutoff(*, now: datetime | None = None, months: int | None = None) -> datetime:
    """Raw events before this instant are past retention: their partitions may be dropped.

    The current month and the `MANTLE_USAGE_RETENTION_MONTHS` whole months before it are kept.
    """
    if months is None:
        months = settings.MANTLE_USAGE_RETENTION_MONTHS
    return add_months(month_start(now or datetime.now(UTC)), -months)


def usage_partitions_list() -> list[Partition]:
    """The monthly partitions that exist, oldest first (others attached by hand are ignored)."""
    if not is_partitioned():
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass",
            [PARENT],
        )
        names = [row[0] for row in cursor.fetchall()]
    found = []
    for name in names:
        match = _NAME.match(name)
        if match:
            found.append(partition_for(datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)))
    return sorted(found, key=lambda p: p.start)


def usage_partitions_ensure(
    *, months: Iterable[datetime] = (), now: datetime | None = None, ahead: int = 1
) -> list[str]:
    """Create the partitions of the current month, `ahead` months after it, and `months`.

    Idempotent and safe to run from several processes at once. Returns the names created.
    """
    if not is_partitioned():
        return []
    current = month_start(now or datetime.now(UTC))
    wanted = {partition_for(add_months(current, i)) for i in range(ahead + 1)}
    wanted |= {partition_for(m) for m in months}
    created = []
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_ID])
        for part in sorted(wanted, key=lambda p: p.start):
            cursor.execute("SELECT to_regclass(%s)", [part.name])
            if cursor.fetchone()[0] is not None:
                continue
            # DDL takes no bound parameters; the bounds are our own UTC instants.
            cursor.execute(
                f'CREATE TABLE "{part.name}" PARTITION OF "{PARENT}" '
                f"FOR VALUES FROM ('{part.start.isoformat()}') TO ('{part.end.isoformat()}')"
            )
            created.append(part.name)
    for name in created:
        logger.info("usage partition %s created", name)
    return created


def usage_partitions_drop_expired(
    *, now: datetime | None = None, retention_months: int | None = None
) -> list[str]:
    """Drop the partitions whose whole month lies before the retention cutoff.

    Rollups are not touched: invoices and history read them, never raw events. Returns the
    names dropped.
    """
    if not is_partitioned():
        return []
    cutoff = retention_cutoff(now=now, months=retention_months)
    dropped = []
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_ID])
        for part in usage_partitions_list():
            if part.end <= cutoff:
                cursor.execute(f'DROP TABLE IF EXISTS "{part.name}"')
                dropped.append(part.name)
    for name in dropped:
        logger.info("usage partition %s dropped (retention cutoff %s)", name, cutoff.date())
    return dropped
