"""Management API for billing: balance, credit ledger, invoices, budgets and their alerts."""

from __future__ import annotations

from decimal import Decimal

from django.http import HttpRequest
from django.utils import timezone
from ninja import Router

from accounts.permissions import Perm
from accounts.principal import Principal
from accounts.selectors import organization_for
from billing import budgets, selectors
from billing.credits import credit_entries
from billing.models import Budget, BudgetAlert, CreditLedgerEntry, Invoice, InvoiceLine
from billing.periods import month_label, month_start
from billing.schemas import (
    BalanceOut,
    BudgetAlertOut,
    BudgetOut,
    BudgetsIn,
    CreditEntryOut,
    InvoiceDetailOut,
    InvoiceLineOut,
    InvoiceOut,
)

router = Router(tags=["billing"])

BILLING = "/organizations/{organization_id}/billing"


def _principal(request: HttpRequest) -> Principal:
    principal: Principal = request.auth  # type: ignore[attr-defined]
    return principal


def _money(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


@router.get(f"{BILLING}/balance", response=BalanceOut)
def balance(request: HttpRequest, organization_id: str) -> BalanceOut:
    org = organization_for(_principal(request), organization_id, Perm.BILLING_VIEW)
    b = selectors.balance_summary(org)
    return BalanceOut(
        currency=b.currency,
        mode=b.mode,
        balance=str(b.balance.quantize(Decimal("0.01"))),
        available=str(b.available.quantize(Decimal("0.01"))),
        month=b.month,
        month_spend=str(b.month_spend),
    )


def _entry_out(e: CreditLedgerEntry) -> CreditEntryOut:
    return CreditEntryOut(
        id=e.id,
        kind=e.kind,
        amount=str(e.amount.quantize(Decimal("0.01"))),
        currency=e.currency,
        grant_id=e.grant_id,
        expires_at=e.expires_at,
        reason=e.reason,
        reference=e.reference,
        created_at=e.created_at,
    )


@router.get(f"{BILLING}/credits", response=list[CreditEntryOut])
def credit_ledger(
    request: HttpRequest, organization_id: str, limit: int = 100
) -> list[CreditEntryOut]:
    org = organization_for(_principal(request), organization_id, Perm.BILLING_VIEW)
    entries = credit_entries(org)[: max(1, min(limit, 1000))]
    return [_entry_out(e) for e in entries]


def _invoice_fields(inv: Invoice) -> dict[str, object]:
    return {
        "id": inv.id,
        "number": inv.number,
        "status": inv.status,
        "currency": inv.currency,
        "period_start": inv.period_start,
        "period_end": inv.period_end,
        "subtotal": str(inv.subtotal),
        "credits_applied": str(inv.credits_applied),
        "total": str(inv.total),
        "finalized_at": inv.finalized_at,
        "paid_at": inv.paid_at,
        "voided_at": inv.voided_at,
        "payment_reference": inv.payment_reference,
    }


def _line_out(line: InvoiceLine) -> InvoiceLineOut:
    return InvoiceLineOut(
        kind=line.kind,
        label=line.label,
        usage_month=line.usage_month,
        model_name=line.model_name,
        token_kind=line.token_kind,
        quantity=line.quantity,
        unit_price=_money(line.unit_price),
        amount=str(line.amount),
    )


@router.get(f"{BILLING}/invoices", response=list[InvoiceOut])
def invoice_list(request: HttpRequest, organization_id: str) -> list[InvoiceOut]:
    org = organization_for(_principal(request), organization_id, Perm.BILLING_VIEW)
    return [InvoiceOut(**_invoice_fields(inv)) for inv in selectors.invoices(org)]  # type: ignore[arg-type]


@router.get(f"{BILLING}/invoices/{{invoice_id}}", response=InvoiceDetailOut)
def invoice_get(request: HttpRequest, organization_id: str, invoice_id: str) -> InvoiceDetailOut:
    org = organization_for(_principal(request), organization_id, Perm.BILLING_VIEW)
    inv = selectors.invoice_get(org, invoice_id)
    return InvoiceDetailOut(
        **_invoice_fields(inv),  # type: ignore[arg-type]
        lines=[_line_out(line) for line in inv.lines.all()],
    )


def _budget_out(b: Budget) -> BudgetOut:
    return BudgetOut(
        id=b.id,
        project_id=b.project_id,
        monthly_amount=str(b.monthly_amount),
        currency=b.currency,
        alert_thresholds=list(b.alert_thresholds),
        hard_limit=b.hard_limit,
        month_spend=str(budgets.budget_spend(b, month_start(timezone.now()))),
        updated_at=b.updated_at,
    )


@router.get(f"{BILLING}/budgets", response=list[BudgetOut])
def budget_list(request: HttpRequest, organization_id: str) -> list[BudgetOut]:
    org = organization_for(_principal(request), organization_id, Perm.BILLING_VIEW)
    return [_budget_out(b) for b in budgets.budgets(org).select_related("organization")]


@router.put(f"{BILLING}/budgets", response=list[BudgetOut])
def budget_replace(
    request: HttpRequest, organization_id: str, payload: BudgetsIn
) -> list[BudgetOut]:
    principal = _principal(request)
    org = organization_for(principal, organization_id, Perm.BILLING_MANAGE)
    specs = [
        budgets.BudgetSpec(
            project_id=b.project_id,
            monthly_amount=b.monthly_amount,
            alert_thresholds=b.alert_thresholds,
            hard_limit=b.hard_limit,
        )
        for b in payload.budgets
    ]
    return [_budget_out(b) for b in budgets.budgets_set(principal=principal, org=org, specs=specs)]


def _alert_out(a: BudgetAlert) -> BudgetAlertOut:
    return BudgetAlertOut(
        id=a.id,
        project_id=a.project_id,
        month=month_label(a.month),
        threshold=a.threshold,
        budget_amount=str(a.budget_amount),
        spend=str(a.spend),
        created_at=a.created_at,
    )


@router.get(f"{BILLING}/alerts", response=list[BudgetAlertOut])
def alert_list(
    request: HttpRequest, organization_id: str, limit: int = 100
) -> list[BudgetAlertOut]:
    org = organization_for(_principal(request), organization_id, Perm.BILLING_VIEW)
    return [_alert_out(a) for a in budgets.budget_alerts(org, limit=max(1, min(limit, 1000)))]
