"""Per-key controls: an API key's monthly budget (hard or soft) and the models it may use.

docs/billing.md, "Per-key budgets". The key's fields live on `accounts.ApiKey`; this module
checks what a customer asks for against the catalog and the money rules (accounts cannot
see either), writes it through `accounts.services.api_key_controls_set` (which writes the
key's cached identity through, so the allowlist takes effect at once), and has the
wallet synced so a hard budget is enforced at admission. A soft budget never refuses:
`key_budgets_evaluate` records, once per key and month, that its spend reached it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts import services as accounts_services
from accounts.models import ApiKey, AuditLog, BudgetMode, Organization
from accounts.principal import SYSTEM, Principal
from accounts.services import audit_record
from billing import jobs
from billing.alerts.events import alert_emit
from billing.models import AlertEvent, UsageRollup
from billing.money import CENT, check_places, parse_decimal
from billing.periods import month_bounds, month_label, month_start
from billing.pricing import ROLLUP_SUMS, PriceBook
from catalog.models import Endpoint
from core.errors import InvalidInput

logger = logging.getLogger(__name__)

MAX_ALLOWED_MODELS = accounts_services.MAX_ALLOWED_MODELS
BUDGET_REACHED = "api_key.budget_reached"


def usable_model_names(org: Organization) -> set[str]:
    """The names a key of `org` may be limited to: the model names and endpoint names and
    ids of every endpoint visible to the organization (its own and the public ones)."""
    rows = Endpoint.objects.filter(
        Q(organization__isnull=True) | Q(organization_id=org.id)
    ).values_list("model_version__model__name", "name", "id")
    return {name for row in rows for name in row if name}


def key_controls_set(
    *,
    principal: Principal,
    key: ApiKey,
    monthly_budget: Decimal | str | None,
    budget_mode: str = BudgetMode.HARD,
    allowed_models: Sequence[str] = (),
) -> ApiKey:
    """Sets (or clears, with None and an empty list) a key's budget, mode and allowlist.

    Bad input is an InvalidInput naming the field: a budget below 0 or with more than two
    decimal places, an unknown mode, more than MAX_ALLOWED_MODELS names, or a name that is
    no model or endpoint the organization can use."""
    amount: Decimal | None = None
    if monthly_budget is not None:
        param = "monthly_budget"
        amount = check_places(parse_decimal(monthly_budget, param=param), 2, param=param)
        if amount < 0:
            raise InvalidInput("monthly_budget must be at least 0", param=param)
        amount = amount.quantize(CENT)
    names = [str(n).strip() for n in allowed_models]
    if len(set(names)) > MAX_ALLOWED_MODELS:
        raise InvalidInput(
            f"allowed_models names at most {MAX_ALLOWED_MODELS} models", param="allowed_models"
        )
    if names:
        known = usable_model_names(key.organization)
        for i, name in enumerate(names):
            if name not in known:
                raise InvalidInput(
                    f"allowed_models.{i}: no model or endpoint named {name[:64]!r} is "
                    "available to this organization",
                    param=f"allowed_models.{i}",
                )
    with transaction.atomic():
        key = accounts_services.api_key_controls_set(
            principal=principal,
            key=key,
            monthly_budget=amount,
            budget_mode=budget_mode,
            allowed_models=names,
        )
        jobs.queue_wallet_sync(key.organization_id)
        jobs.queue_budgets_evaluate(key.organization_id)
    return key


def key_month_spend(
    org: Organization, key_ids: Iterable[str], *, now: datetime | None = None, exact: bool = False
) -> dict[str, Decimal]:
    """Each key's usage charges this UTC month, rated as invoices rate them, to the cent
    (or `exact`): what the console shows against the key's budget. A key without usage: 0."""
    month = month_start(now or timezone.now())
    start, end = month_bounds(month)
    ids = list(key_ids)
    spend = dict.fromkeys(ids, Decimal(0))
    if not ids:
        return spend
    grouped = (
        UsageRollup.objects.filter(
            organization_id=org.id, hour__gte=start, hour__lt=end, api_key_id__in=ids
        )
        .values("api_key_id", "model_name", "hour")
        .annotate(**ROLLUP_SUMS)
        .order_by("hour", "model_name")
    )
    book = PriceBook.load(org.id)
    for row, rating in book.rate_rollups(grouped):
        amount = rating.amount
        if amount is not None:
            spend[row["api_key_id"]] += amount
    if exact:
        return spend
    return {key_id: value.quantize(CENT) for key_id, value in spend.items()}


def key_budgets_evaluate(*, org: Organization, now: datetime | None = None) -> list[str]:
    """Records once per key and month that a key's spend reached its monthly budget, hard
    or soft: an audit entry `api_key.budget_reached` and an alert (`hard_limit_hit` for a
    hard budget, `budget_threshold` at 100 for a soft one) for the billing contacts and
    webhooks. Returns the keys recorded now."""
    now = now or timezone.now()
    month = month_label(month_start(now))
    budgeted = list(
        ApiKey.objects.filter(
            organization=org, monthly_budget__isnull=False, revoked_at__isnull=True
        ).values_list("id", "monthly_budget", "budget_mode")
    )
    if not budgeted:
        return []
    spend = key_month_spend(org, [k for k, _, _ in budgeted], now=now, exact=True)
    recorded = []
    for key_id, amount, mode in budgeted:
        if amount is None or spend[key_id] < amount:
            continue
        with transaction.atomic():
            # The key's row serializes two evaluators: the entry is written once.
            key = ApiKey.objects.select_for_update().filter(id=key_id).first()
            if key is None:
                continue
            seen = AuditLog.objects.filter(
                action=BUDGET_REACHED, target_id=key_id, metadata__month=month
            ).exists()
            if seen:
                continue
            audit_record(
                principal=SYSTEM,
                action=BUDGET_REACHED,
                target=key,
                organization=org,
                metadata={
                    "month": month,
                    "budget": str(amount),
                    "budget_mode": mode,
                    "spend": str(spend[key_id].quantize(CENT)),
                },
            )
            # The people and webhooks are told once per key and month, as for a budget.
            hard = mode == BudgetMode.HARD
            alert_emit(
                org=org,
                kind=AlertEvent.Kind.HARD_LIMIT_HIT if hard else AlertEvent.Kind.BUDGET_THRESHOLD,
                dedupe_key=f"key_budget:{key_id}:{month}",
                data={
                    "api_key_id": key_id,
                    "project_id": key.project_id,
                    "month": month,
                    "budget_amount": str(amount),
                    "spend": str(spend[key_id].quantize(CENT)),
                    "currency": settings.MANTLE_BILLING_CURRENCY,
                    "hard_limit": hard,
                    "threshold": 100,
                },
                now=now,
            )
        recorded.append(key_id)
        logger.info(
            "API key %s of %s reached its %s monthly budget of %s in %s (spend %s)",
            key_id,
            org.id,
            mode,
            amount,
            month,
            spend[key_id],
        )
    return recorded
