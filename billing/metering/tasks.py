"""Billing-queue tasks of metering: monthly partitions of the raw usage table, lag samples."""

from __future__ import annotations

from celery import shared_task

from billing.metering import lag, partitions


@shared_task(name="mantle.billing.usage_partitions_ensure", queue="billing", ignore_result=True)
def usage_partitions_ensure() -> list[str]:
    """Daily: this month's and next month's partitions exist before any event needs them."""
    return partitions.usage_partitions_ensure()


@shared_task(
    name="mantle.billing.usage_partitions_drop_expired", queue="billing", ignore_result=True
)
def usage_partitions_drop_expired() -> list[str]:
    """Daily: raw events past MANTLE_USAGE_RETENTION_MONTHS go, a whole month at a time."""
    return partitions.usage_partitions_drop_expired()


@shared_task(name="mantle.billing.drain_lag_sample", queue="billing", ignore_result=True)
def drain_lag_sample() -> float:
    """One sample of the usage drain's lag for the back office's chart (beat, every minute)."""
    return lag.drain_lag_record()
