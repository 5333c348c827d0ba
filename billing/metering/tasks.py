"""Billing-queue tasks of metering: monthly partitions of the raw usage table."""

from __future__ import annotations

from celery import shared_task

from billing import partitions


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
