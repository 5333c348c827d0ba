"""Monthly budgets per organization and project: spend, threshold alerts, hard limits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from accounts.models import Organization, Project
from accounts.principal import Principal
from accounts.services import audit_record
from billing import jobs
from billing.alerts.events import alert_emit
from billing.invoicing import month_spend
from billing.models import AlertEvent, BillingAccount, Budget, BudgetAlert
from billing.money import CENT, MAX_AMOUNT, check_places, parse_decimal
from billing.periods import month_label, month_start
from core.errors import InvalidInput, NotFound

logger = logging.getLogger(__name__)

MAX_THRESHOLDS = 10
MAX_THRESHOLD_PERCENT = 1000


@dataclass(frozen=True)
class BudgetSpec:
    """One budget as the customer states it; project_id None: the whole organization."""

    monthly_amount: Decimal | str
    project_id: str | None = None
    alert_thresholds: Sequence[int] = field(default_factory=lambda: [50, 80, 100])
    hard_limit: bool = False


# --- Reads --------------------------------------------------------------------------------


def budgets(org: Organization) -> QuerySet[Budget]:
    # The organization's own budget first, then its projects'.
    return Budget.objects.filter(organization=org).order_by(
        F("project_id").asc(nulls_first=True), "id"
    )


def budget_alerts(org: Organization, limit: int = 100) -> QuerySet[BudgetAlert]:
    """The organization's budget notifications, newest first (shown in the console)."""
    return (
        BudgetAlert.objects.filter(organization=org)
        .select_related("budget")
        .order_by("-created_at", "-id")[:limit]
    )


def budget_spend(budget: Budget, month: datetime) -> Decimal:
    return month_spend(budget.organization, month, project_id=budget.project_id)


# --- Writes --------------------------------------------------------------------------------


def budgets_set(
    *, principal: Principal, org: Organization, specs: Sequence[BudgetSpec]
) -> list[Budget]:
    """Replaces the organization's budgets with `specs` (at most one per project).

    Budgets that stay (same project) are updated in place, so the alerts already
    recorded this month are not sent again.
    """
    cleaned = _clean_specs(org, specs)
    with transaction.atomic():
        existing = {
            b.project_id: b for b in Budget.objects.select_for_update().filter(organization=org)
        }
        before = [_describe(b) for b in existing.values()]
        kept: list[Budget] = []
        for project_id, amount, thresholds, hard in cleaned:
            budget = existing.pop(project_id, None) or Budget(
                organization=org, project_id=project_id
            )
            budget.monthly_amount = amount
            budget.alert_thresholds = thresholds
            budget.hard_limit = hard
            budget.currency = settings.MANTLE_BILLING_CURRENCY
            budget.updated_by = principal.user
            budget.save()
            kept.append(budget)
        for gone in existing.values():
            gone.delete()
        audit_record(
            principal=principal,
            action="billing.budgets_set",
            target=org,
            organization=org,
            metadata={"before": before, "after": [_describe(b) for b in kept]},
        )
        jobs.queue_budgets_evaluate(org.id)
        jobs.queue_wallet_sync(org.id)
    return kept


def budgets_evaluate(*, org: Organization, now: datetime | None = None) -> list[BudgetAlert]:
    """Records each threshold crossed this month, once per (budget, month, threshold)."""
    now = now or timezone.now()
    month = month_start(now)
    created: list[BudgetAlert] = []
    # Hard limits refuse requests only where the wallet caps (not in unlimited mode).
    mode = BillingAccount.objects.filter(organization=org).values_list("mode", flat=True).first()
    capped = (mode or settings.MANTLE_BILLING_DEFAULT_MODE) != BillingAccount.Mode.UNLIMITED
    for budget in budgets(org).select_related("organization"):
        thresholds = sorted(int(t) for t in budget.alert_thresholds)
        if not thresholds and not budget.hard_limit:
            continue
        spend = budget_spend(budget, month)
        if budget.hard_limit and capped and spend >= budget.monthly_amount:
            # From here admission refuses every request of the budget's scope this month.
            alert_emit(
                org=org,
                kind=AlertEvent.Kind.HARD_LIMIT_HIT,
                dedupe_key=f"hard_limit:{budget.id}:{month_label(month)}",
                data=_alert_data(budget, month, spend),
                now=now,
            )
        for threshold in thresholds:
            if spend * 100 < budget.monthly_amount * threshold:
                break
            # The unique constraint makes this exactly-once even with two evaluators.
            with transaction.atomic():
                alert, was_created = BudgetAlert.objects.get_or_create(
                    budget=budget,
                    month=month.date(),
                    threshold=threshold,
                    defaults={
                        "organization": org,
                        "project_id": budget.project_id,
                        "budget_amount": budget.monthly_amount,
                        "spend": spend,
                        "created_at": now,
                    },
                )
                # The people and webhooks are told once per (budget, month, threshold),
                # with the row (a threshold recorded before alerts existed is not resent).
                if was_created:
                    alert_emit(
                        org=org,
                        kind=AlertEvent.Kind.BUDGET_THRESHOLD,
                        dedupe_key=f"budget:{budget.id}:{month_label(month)}:{threshold}",
                        data={**_alert_data(budget, month, spend), "threshold": threshold},
                        now=now,
                    )
            if was_created:
                created.append(alert)
                logger.info(
                    "budget alert: %s reached %d%% of %s for %s in %s",
                    org.id,
                    threshold,
                    budget.monthly_amount,
                    budget.project_id or "the organization",
                    month_label(month),
                )
    return created


def _alert_data(budget: Budget, month: datetime, spend: Decimal) -> dict[str, object]:
    return {
        "budget_id": budget.id,
        "project_id": budget.project_id,
        "month": month_label(month),
        "budget_amount": str(budget.monthly_amount),
        "spend": str(spend),
        "currency": budget.currency,
        "hard_limit": budget.hard_limit,
    }


def _clean_specs(
    org: Organization, specs: Sequence[BudgetSpec]
) -> list[tuple[str | None, Decimal, list[int], bool]]:
    seen: set[str | None] = set()
    result = []
    projects = set(Project.objects.filter(organization=org).values_list("id", flat=True))
    for i, spec in enumerate(specs):
        at = f"budgets.{i}"
        if spec.project_id in seen:
            raise InvalidInput(
                "project_id repeats: at most one budget per project (and one for the organization)",
                param=f"{at}.project_id",
            )
        seen.add(spec.project_id)
        if spec.project_id is not None and spec.project_id not in projects:
            raise NotFound(f"project {spec.project_id!r} not found", param=f"{at}.project_id")
        param = f"{at}.monthly_amount"
        amount = check_places(parse_decimal(spec.monthly_amount, param=param), 2, param=param)
        if not Decimal(0) < amount <= MAX_AMOUNT:
            raise InvalidInput(f"{param} must be in (0, {MAX_AMOUNT}]", param=param)
        thresholds = list(spec.alert_thresholds)
        param = f"{at}.alert_thresholds"
        if len(thresholds) > MAX_THRESHOLDS:
            raise InvalidInput(f"{param}: at most {MAX_THRESHOLDS} thresholds", param=param)
        for t in thresholds:
            if isinstance(t, bool) or not isinstance(t, int):
                raise InvalidInput(f"{param} are whole percentages", param=param)
            if not 1 <= t <= MAX_THRESHOLD_PERCENT:
                raise InvalidInput(
                    f"{param} must be in [1, {MAX_THRESHOLD_PERCENT}] percent",
                    param=param,
                )
        if len(set(thresholds)) != len(thresholds):
            raise InvalidInput(f"{param} must not repeat", param=param)
        amount = amount.quantize(CENT)  # exact: at most two places were checked
        result.append((spec.project_id, amount, sorted(thresholds), bool(spec.hard_limit)))
    return result


def _describe(b: Budget) -> dict[str, object]:
    return {
        "project_id": b.project_id,
        "monthly_amount": str(b.monthly_amount),
        "alert_thresholds": list(b.alert_thresholds),
        "hard_limit": b.hard_limit,
    }
