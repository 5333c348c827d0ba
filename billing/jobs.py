"""Billing jobs queued after commit: the one way billing's services hand work to its worker.

A service that changes what the wallet or the budgets should say queues the job here, in
its transaction; the job runs once the transaction commits (at once outside one), so it
reads what was committed, and not at all if the transaction rolls back. Jobs are queued by
task name: the task modules import the services, so the services never import the tasks.
Every billing task is registered in every Django process (BillingConfig.ready), so a
queued job goes through the task's own apply_async (eager where tests run tasks eagerly).
"""

from __future__ import annotations

from django.db import transaction

from core.celery_app import app

QUEUE = "billing"

WALLET_SYNC_ORGANIZATION = "mantle.billing.wallet_sync_organization"
WALLET_SYNC_ALL = "mantle.billing.wallet_sync_all"
BUDGETS_EVALUATE_ORGANIZATION = "mantle.billing.budgets_evaluate_organization"


def queue_on_commit(task_name: str, *args: str) -> None:
    """Queue billing task `task_name` with `args` when the current transaction commits."""
    transaction.on_commit(lambda: app.signature(task_name, args=args, queue=QUEUE).delay())


def queue_wallet_sync(organization_id: str) -> None:
    """The organization's wallet and prices in Redis recomputed from the database."""
    queue_on_commit(WALLET_SYNC_ORGANIZATION, organization_id)


def queue_wallet_sync_all() -> None:
    """Every wallet that can be refused or has recent activity (a list price changed)."""
    queue_on_commit(WALLET_SYNC_ALL)


def queue_budgets_evaluate(organization_id: str) -> None:
    """The organization's budget thresholds checked against this month's spend."""
    queue_on_commit(BUDGETS_EVALUATE_ORGANIZATION, organization_id)


AUTO_RECHARGE_EVALUATE_ORGANIZATION = "mantle.billing.auto_recharge_evaluate_organization"


def queue_auto_recharge_evaluate(organization_id: str) -> None:
    """The organization's balance against its auto-recharge threshold (a charge if under)."""
    queue_on_commit(AUTO_RECHARGE_EVALUATE_ORGANIZATION, organization_id)


ALERT_DISPATCH = "mantle.billing.alert_dispatch"
WEBHOOK_DELIVER = "mantle.billing.webhook_deliver"


def queue_alert_dispatch(event_id: str) -> None:
    """An alert event's email to the billing contacts and its webhook deliveries."""
    queue_on_commit(ALERT_DISPATCH, event_id)


def queue_webhook_deliver(delivery_id: str) -> None:
    """One webhook delivery attempted once the current transaction commits."""
    queue_on_commit(WEBHOOK_DELIVER, delivery_id)


def queue_webhook_retry(delivery_id: str, countdown_s: float) -> None:
    """A delivery's next attempt, `countdown_s` from now (called by the delivery task, out
    of any transaction; the beat sweep catches one whose message is lost)."""
    app.signature(WEBHOOK_DELIVER, args=(delivery_id,), queue=QUEUE).apply_async(
        countdown=max(0.0, countdown_s)
    )
