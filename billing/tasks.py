"""Billing-queue tasks for prices, invoices, credits, budgets and the wallet (all idempotent).

Celery's autodiscovery imports this module for the billing app, so it also imports the
task modules of metering and payments: every billing task is registered through it.
Services queue these by name (billing.jobs), never by importing them.
"""

from __future__ import annotations

import logging

from celery import shared_task

from accounts.models import ApiKey, Organization
from billing import jobs
from billing.alerts import tasks as alerts_tasks
from billing.budgets import budgets_evaluate
from billing.credits import credits_expire as expire
from billing.invoicing import invoices_finalize_due as finalize_due
from billing.invoicing import invoices_refresh_open
from billing.key_budgets import key_budgets_evaluate
from billing.metering import tasks as metering_tasks
from billing.models import AutoRecharge, Budget
from billing.payments import tasks as payments_tasks
from billing.provisioned import provisioned_sync
from billing.wallet import wallet_sync, wallet_sync_due

logger = logging.getLogger(__name__)

__all__ = ["alerts_tasks", "metering_tasks", "payments_tasks"]


@shared_task(name=jobs.WALLET_SYNC_ORGANIZATION, queue="billing", ignore_result=True)
def wallet_sync_organization(organization_id: str) -> None:
    org = Organization.objects.filter(id=organization_id).first()
    if org is not None:
        wallet_sync(org)
        # The balance moved (a grant, a finalization, an expiry): check the organization's
        # auto-recharge threshold now rather than at the next beat.
        if AutoRecharge.objects.filter(organization=org, enabled=True).exists():
            jobs.queue_auto_recharge_evaluate(org.id)


@shared_task(name=jobs.WALLET_SYNC_ALL, queue="billing", ignore_result=True)
def wallet_sync_all() -> int:
    """Every organization that can be refused or has recent activity (beat, every 5 min)."""
    synced = 0
    for org in Organization.objects.filter(id__in=wallet_sync_due()).order_by("id"):
        try:
            wallet_sync(org)
            synced += 1
        except Exception:  # one organization must not stop the others
            logger.exception("wallet sync failed for %s", org.id)
    return synced


@shared_task(name="mantle.billing.provisioned_sync", queue="billing", ignore_result=True)
def provisioned_sync_all() -> int:
    """Provisioned throughput commitments in effect, written for the gateway (beat, every
    minute; also on every change)."""
    return provisioned_sync()


@shared_task(name=jobs.BUDGETS_EVALUATE_ORGANIZATION, queue="billing", ignore_result=True)
def budgets_evaluate_organization(organization_id: str) -> int:
    org = Organization.objects.filter(id=organization_id).first()
    if org is None:
        return 0
    return len(budgets_evaluate(org=org)) + len(key_budgets_evaluate(org=org))


@shared_task(name="mantle.billing.budgets_evaluate_all", queue="billing", ignore_result=True)
def budgets_evaluate_all() -> int:
    created = 0
    org_ids = set(Budget.objects.values_list("organization_id", flat=True).distinct().order_by())
    # Organizations with per-key budgets too (billing/key_budgets.py).
    keyed = ApiKey.objects.filter(monthly_budget__isnull=False, revoked_at__isnull=True)
    key_org_ids = set(keyed.values_list("organization_id", flat=True).distinct().order_by())
    for org in Organization.objects.filter(id__in=list(org_ids | key_org_ids)).order_by("id"):
        try:
            if org.id in org_ids:
                created += len(budgets_evaluate(org=org))
            if org.id in key_org_ids:
                created += len(key_budgets_evaluate(org=org))
        except Exception:
            logger.exception("budget evaluation failed for %s", org.id)
    return created


@shared_task(name="mantle.billing.invoices_refresh", queue="billing", ignore_result=True)
def invoices_refresh() -> int:
    return invoices_refresh_open()


@shared_task(name="mantle.billing.invoices_finalize_due", queue="billing", ignore_result=True)
def invoices_finalize_due() -> int:
    return len(finalize_due())


@shared_task(name="mantle.billing.credits_expire", queue="billing", ignore_result=True)
def credits_expire() -> int:
    return len(expire())
