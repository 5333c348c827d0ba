"""Billing-queue tasks for Stripe: invoice push, meter hours, retry of stored webhook events,
auto-recharge."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from accounts.models import Organization
from billing import jobs
from billing.payments import auto_recharge, stripe_events, stripe_sync
from billing.payments.stripe_types import StripeRateLimited, StripeUnavailable

logger = logging.getLogger(__name__)

# Only transient failures are retried; a refused request (bad data, a bad key) is not.
_TRANSIENT = (StripeRateLimited, StripeUnavailable)


@shared_task(
    name="mantle.billing.stripe_push_invoice",
    queue="billing",
    ignore_result=True,
    autoretry_for=_TRANSIENT,
    retry_backoff=30,
    retry_backoff_max=3600,
    max_retries=12,
)
def stripe_push_invoice(invoice_id: str) -> None:
    """Idempotent: the push resumes the recorded draft and reuses its idempotency keys."""
    if stripe_sync.stripe_backend() is None:
        return
    stripe_sync.stripe_invoice_push(invoice_id=invoice_id)


@shared_task(
    name="mantle.billing.stripe_push_pending_invoices", queue="billing", ignore_result=True
)
def stripe_push_pending_invoices() -> int:
    """Every few minutes: finalized invoices not yet in Stripe get a push task each."""
    if stripe_sync.stripe_backend() is None or settings.MANTLE_STRIPE_USAGE_PUSH != "invoices":
        return 0
    pending = stripe_sync.stripe_invoices_pending()
    for invoice_id in pending:
        stripe_push_invoice.delay(invoice_id)
    return len(pending)


@shared_task(
    name="mantle.billing.stripe_push_meter_hour",
    queue="billing",
    ignore_result=True,
    autoretry_for=_TRANSIENT,
    retry_backoff=30,
    max_retries=12,
)
def stripe_push_meter_hour(hour_iso: str | None = None) -> int:
    """One closed hour of usage as meter events (default: the hour before the last one,
    so late usage has a full hour to land in the rollups). Only in meter mode."""
    if settings.MANTLE_STRIPE_USAGE_PUSH != "meter_events" or stripe_sync.stripe_backend() is None:
        return 0
    if hour_iso is None:
        hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    else:
        hour = datetime.fromisoformat(hour_iso)
    return stripe_sync.stripe_meter_push_hour(hour=hour)


@shared_task(name="mantle.billing.stripe_retry_events", queue="billing", ignore_result=True)
def stripe_retry_events() -> int:
    return stripe_events.stripe_events_retry()


@shared_task(
    name=jobs.AUTO_RECHARGE_EVALUATE_ORGANIZATION,
    queue="billing",
    ignore_result=True,
    autoretry_for=_TRANSIENT,
    retry_backoff=30,
    retry_backoff_max=600,
    max_retries=12,
)
def auto_recharge_evaluate_organization(organization_id: str) -> bool:
    """One organization's balance against its threshold; True if a charge was sent. A
    retry charges the crossing recorded before the transient error, under its key."""
    org = Organization.objects.filter(id=organization_id).first()
    return org is not None and auto_recharge.auto_recharge_evaluate(org) is not None


@shared_task(name="mantle.billing.auto_recharge_evaluate_all", queue="billing", ignore_result=True)
def auto_recharge_evaluate_all() -> int:
    """Every organization with auto-recharge on (beat, every minute); returns charges sent."""
    if stripe_sync.stripe_backend() is None:
        return 0
    charged = 0
    for org in Organization.objects.filter(id__in=auto_recharge.auto_recharge_due()).order_by("id"):
        try:
            charged += auto_recharge.auto_recharge_evaluate(org) is not None
        except Exception:  # one organization must not stop the others
            logger.exception("auto-recharge evaluation failed for %s", org.id)
    return charged
