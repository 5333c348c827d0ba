"""Billing-queue tasks for prices, invoices, credits, budgets and the wallet (all idempotent)."""

from __future__ import annotations

import logging

from celery import shared_task

from accounts.models import Organization

logger = logging.getLogger(__name__)


@shared_task(name="mantle.billing.wallet_sync_organization", queue="billing", ignore_result=True)
def wallet_sync_organization(organization_id: str) -> None:
    from billing.wallet import wallet_sync

    org = Organization.objects.filter(id=organization_id).first()
    if org is not None:
        wallet_sync(org)


@shared_task(name="mantle.billing.wallet_sync_all", queue="billing", ignore_result=True)
def wallet_sync_all() -> int:
    """Every organization that can be refused or has recent activity (beat, every 5 min)."""
    from billing.wallet import wallet_sync, wallet_sync_due

    synced = 0
    for org in Organization.objects.filter(id__in=wallet_sync_due()).order_by("id"):
        try:
            wallet_sync(org)
            synced += 1
        except Exception:  # one organization must not stop the others
            logger.exception("wallet sync failed for %s", org.id)
    return synced


@shared_task(
    name="mantle.billing.budgets_evaluate_organization", queue="billing", ignore_result=True
)
def budgets_evaluate_organization(organization_id: str) -> int:
    from billing.budgets import budgets_evaluate

    org = Organization.objects.filter(id=organization_id).first()
    return len(budgets_evaluate(org=org)) if org is not None else 0


@shared_task(name="mantle.billing.budgets_evaluate_all", queue="billing", ignore_result=True)
def budgets_evaluate_all() -> int:
    from billing.budgets import budgets_evaluate
    from billing.models import Budget

    created = 0
    org_ids = Budget.objects.values_list("organization_id", flat=True).distinct().order_by()
    for org in Organization.objects.filter(id__in=list(org_ids)).order_by("id"):
        try:
            created += len(budgets_evaluate(org=org))
        except Exception:
            logger.exception("budget evaluation failed for %s", org.id)
    return created


@shared_task(name="mantle.billing.invoices_refresh", queue="billing", ignore_result=True)
def invoices_refresh() -> int:
    from billing.invoicing import invoices_refresh_open

    return invoices_refresh_open()


@shared_task(name="mantle.billing.invoices_finalize_due", queue="billing", ignore_result=True)
def invoices_finalize_due() -> int:
    from billing.invoicing import invoices_finalize_due as finalize_due

    return len(finalize_due())


@shared_task(name="mantle.billing.credits_expire", queue="billing", ignore_result=True)
def credits_expire() -> int:
    from billing.credits import credits_expire as expire

    return len(expire())


@shared_task(name="mantle.billing.drain_lag_sample", queue="billing", ignore_result=True)
def drain_lag_sample() -> float:
    """One sample of the usage drain's lag for the back office's chart (beat, every minute)."""
    from billing.backoffice.selectors import drain_lag_record

    return drain_lag_record()
