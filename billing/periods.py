"""Billing periods: calendar months in UTC, and whole hours (the grain of the rollups)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta


def month_start(at: datetime | date) -> datetime:
    """The first instant (UTC) of the month containing `at`."""
    if isinstance(at, datetime):
        at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def next_month(start: datetime) -> datetime:
    start = month_start(start)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def previous_month(start: datetime) -> datetime:
    return month_start(month_start(start) - timedelta(days=1))


def month_bounds(month: datetime | date) -> tuple[datetime, datetime]:
    start = month_start(month)
    return start, next_month(start)


def month_label(month: datetime | date) -> str:
    """`2026-10`: how months appear in labels and in the wallet."""
    return f"{month.year:04d}-{month.month:02d}"


def parse_month(value: str) -> datetime:
    """`2026-10` -> the first instant of that month, UTC; ValueError otherwise."""
    year, _, mon = value.partition("-")
    if len(year) != 4 or len(mon) != 2 or not (year + mon).isdigit():
        raise ValueError(f"not a month (YYYY-MM): {value!r}")
    return datetime(int(year), int(mon), 1, tzinfo=UTC)


def hour_start(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def is_whole_hour(at: datetime) -> bool:
    return at.minute == 0 and at.second == 0 and at.microsecond == 0 and at.utcoffset() is not None
