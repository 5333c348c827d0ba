"""Low prepaid balance: the balance admission spends (credit available less unbilled
usage) under the organization's low-balance amount emits one event per crossing."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import Organization
from billing.alerts.events import Kind, alert_emit
from billing.credits import credit_available
from billing.invoicing import unbilled_usage
from billing.models import AlertEvent, AlertSettings, BillingAccount, CreditLedgerEntry
from billing.money import CENT


def low_balance_amount(org: Organization) -> Decimal | None:
    found = AlertSettings.objects.filter(organization=org).first()
    if found is not None and found.low_balance_amount is not None:
        return found.low_balance_amount
    raw = settings.MANTLE_ALERT_LOW_BALANCE_DEFAULT
    return Decimal(raw) if raw else None


def spendable_balance(org: Organization, *, now: datetime | None = None) -> Decimal:
    """What a prepaid organization can still spend, to the cent: credit available less
    usage on no issued invoice (the same figure admission's cap works from). Unbilled
    usage is read first, so a finalization between the reads counts twice (lower, the
    safe side), never not at all."""
    unbilled = unbilled_usage(org)
    return (credit_available(org, now or timezone.now()) - unbilled).quantize(CENT)


def low_balance_evaluate(org: Organization, *, now: datetime | None = None) -> AlertEvent | None:
    """Emits `low_balance` when a prepaid organization's balance is under its amount.

    Once per crossing: the dedupe key names the latest credit added (a grant, a credit
    note, a positive adjustment) and the amount, so the event comes again only after the
    balance was topped up and fell again, or the amount changed."""
    now = now or timezone.now()
    account = BillingAccount.objects.filter(organization=org).first()
    mode = account.mode if account else settings.MANTLE_BILLING_DEFAULT_MODE
    if mode != BillingAccount.Mode.PREPAID:
        return None
    threshold = low_balance_amount(org)
    if threshold is None:
        return None
    balance = spendable_balance(org, now=now)
    if balance >= threshold:
        return None
    latest_credit = (
        CreditLedgerEntry.objects.filter(
            Q(kind__in=CreditLedgerEntry.GRANT_KINDS) | Q(amount__gt=0), organization=org
        )
        .order_by("-created_at", "-id")
        .values_list("id", flat=True)
        .first()
    )
    with transaction.atomic():
        return alert_emit(
            org=org,
            kind=Kind.LOW_BALANCE,
            dedupe_key=f"low_balance:{latest_credit or 'none'}:{threshold}",
            data={
                "balance": str(balance),
                "threshold": str(threshold),
                "currency": settings.MANTLE_BILLING_CURRENCY,
            },
            now=now,
        )
