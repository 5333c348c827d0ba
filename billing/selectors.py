"""Tenant-scoped reads for billing; every query filters by organization."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from accounts.models import Organization
from billing.credits import credit_available, credit_balance
from billing.invoicing import month_spend
from billing.models import Invoice
from billing.periods import month_label, month_start
from billing.wallet import billing_mode
from core.errors import NotFound


@dataclass(frozen=True)
class Balance:
    currency: str
    mode: str
    balance: Decimal
    available: Decimal
    month: str
    month_spend: Decimal


def balance_summary(org: Organization, *, now: datetime | None = None) -> Balance:
    now = now or timezone.now()
    return Balance(
        currency=settings.MANTLE_BILLING_CURRENCY,
        mode=billing_mode(org),
        balance=credit_balance(org),
        available=credit_available(org, now),
        month=month_label(month_start(now)),
        month_spend=month_spend(org, month_start(now)),
    )


def invoices(org: Organization) -> QuerySet[Invoice]:
    return Invoice.objects.filter(organization=org).order_by("-period_start")


def invoice_get(org: Organization, invoice_id: str) -> Invoice:
    found = invoices(org).filter(id=invoice_id).prefetch_related("lines").first()
    if found is None:
        raise NotFound(f"invoice {invoice_id!r} not found", param="invoice_id")
    return found
