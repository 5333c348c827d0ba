"""Billing-queue tasks of the alerts: an event's fan-out, one delivery attempt, the sweep,
the low-balance check. Registered through billing/tasks.py; queued by name (billing.jobs)."""

from __future__ import annotations

import logging

from celery import shared_task

from accounts.models import Organization
from billing import jobs
from billing.alerts import balance, delivery
from billing.models import AlertSettings, BillingAccount

logger = logging.getLogger(__name__)


@shared_task(name=jobs.ALERT_DISPATCH, queue="billing", ignore_result=True)
def alert_dispatch(event_id: str) -> int:
    return delivery.alert_dispatch(event_id)


@shared_task(name=jobs.WEBHOOK_DELIVER, queue="billing", ignore_result=True)
def webhook_deliver(delivery_id: str) -> str | None:
    return delivery.webhook_deliver(delivery_id)


@shared_task(name="mantle.billing.webhook_deliveries_due", queue="billing", ignore_result=True)
def webhook_deliveries_due() -> int:
    return delivery.webhook_deliveries_due()


@shared_task(name="mantle.billing.low_balance_evaluate_all", queue="billing", ignore_result=True)
def low_balance_evaluate_all() -> int:
    """Every prepaid organization's balance against its low-balance amount (beat)."""
    ids = set(
        BillingAccount.objects.filter(mode=BillingAccount.Mode.PREPAID).values_list(
            "organization_id", flat=True
        )
    )
    ids |= set(
        AlertSettings.objects.filter(low_balance_amount__isnull=False).values_list(
            "organization_id", flat=True
        )
    )
    emitted = 0
    for org in Organization.objects.filter(id__in=ids).order_by("id"):
        try:
            emitted += balance.low_balance_evaluate(org) is not None
        except Exception:  # one organization must not stop the others
            logger.exception("low-balance check failed for %s", org.id)
    return emitted
