"""Management API for billing: balance, credit ledger, invoices, budgets and their alerts,
and the usage and cost API (`/usage`, `/costs`)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from ninja import Router

from accounts.auth import usage_auth
from accounts.models import ApiKey
from accounts.permissions import Perm
from accounts.principal import Principal
from accounts.selectors import api_key_get, organization_for, organization_for_usage
from billing import budgets, key_budgets, selectors, tax, usage_buckets
from billing.credits import credit_entries
from billing.invoice_pdf import invoice_pdf_budget_take, invoice_pdf_response
from billing.models import (
    BillingDetails,
    Budget,
    BudgetAlert,
    CreditLedgerEntry,
    Invoice,
    InvoiceLine,
)
from billing.periods import month_label, month_start
from billing.schemas import (
    BalanceOut,
    BillingDetailsIn,
    BillingDetailsOut,
    BudgetAlertOut,
    BudgetOut,
    BudgetsIn,
    CostBucketOut,
    CostPageOut,
    CreditEntryOut,
    InvoiceDetailOut,
    InvoiceLineOut,
    InvoiceOut,
    InvoiceTaxLineOut,
    KeyControlsIn,
    KeyControlsOut,
    UsageBucketOut,
    UsagePageOut,
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
        "tax": str(inv.tax),
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
        tax_lines=[
            InvoiceTaxLineOut(
                label=t.label,
                country=t.country,
                rate=str(t.rate),
                taxable_amount=str(t.taxable_amount),
                amount=str(t.amount),
                reverse_charge=t.reverse_charge,
                note=t.note,
            )
            for t in inv.tax_lines.order_by("position")
        ],
    )


@router.get(
    f"{BILLING}/invoices/{{invoice_id}}/pdf",
    openapi_extra={
        "responses": {
            200: {
                "description": "The invoice as a PDF attachment (a draft is watermarked DRAFT)",
                "content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}},
            }
        }
    },
)
def invoice_pdf(request: HttpRequest, organization_id: str, invoice_id: str) -> HttpResponse:
    """The invoice as a PDF document (billing view)."""
    org = organization_for(_principal(request), organization_id, Perm.BILLING_VIEW)
    inv = selectors.invoice_get(org, invoice_id)
    invoice_pdf_budget_take(org.id)
    return invoice_pdf_response(inv)


def _details_out(org_details: BillingDetails | None) -> BillingDetailsOut:
    if org_details is None:
        return BillingDetailsOut(legal_name="", address="", country="", tax_id="", updated_at=None)
    return BillingDetailsOut(
        legal_name=org_details.legal_name,
        address=org_details.address,
        country=org_details.country,
        tax_id=org_details.tax_id,
        updated_at=org_details.updated_at,
    )


@router.get(f"{BILLING}/details", response=BillingDetailsOut)
def billing_details_get(request: HttpRequest, organization_id: str) -> BillingDetailsOut:
    """Whom the organization's invoices are made out to (empty until set)."""
    org = organization_for(_principal(request), organization_id, Perm.BILLING_VIEW)
    return _details_out(tax.billing_details_get(org))


@router.put(f"{BILLING}/details", response=BillingDetailsOut)
def billing_details_put(
    request: HttpRequest, organization_id: str, payload: BillingDetailsIn
) -> BillingDetailsOut:
    """Sets the legal name, address, country and tax id invoices finalized from now on carry."""
    principal = _principal(request)
    org = organization_for(principal, organization_id, Perm.BILLING_MANAGE)
    return _details_out(
        tax.billing_details_set(
            principal=principal,
            org=org,
            legal_name=payload.legal_name,
            address=payload.address,
            country=payload.country,
            tax_id=payload.tax_id,
        )
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


# --- Per-key controls (billing/key_budgets.py) -----------------------------------------


def _controls_out(key: ApiKey) -> KeyControlsOut:
    now = timezone.now()
    spend = key_budgets.key_month_spend(key.organization, [key.id], now=now)[key.id]
    return KeyControlsOut(
        key_id=key.id,
        monthly_budget=_money(key.monthly_budget),
        budget_mode=key.budget_mode,
        allowed_models=list(key.allowed_models or ()),
        currency=settings.MANTLE_BILLING_CURRENCY,
        month=month_label(month_start(now)),
        month_spend=str(spend),
    )


@router.get("/organizations/{organization_id}/api-keys/{key_id}/controls", response=KeyControlsOut)
def key_controls_get(request: HttpRequest, organization_id: str, key_id: str) -> KeyControlsOut:
    org = organization_for(_principal(request), organization_id, Perm.KEYS_VIEW)
    return _controls_out(api_key_get(org, key_id))


@router.put("/organizations/{organization_id}/api-keys/{key_id}/controls", response=KeyControlsOut)
def key_controls_set(
    request: HttpRequest, organization_id: str, key_id: str, payload: KeyControlsIn
) -> KeyControlsOut:
    """Replaces the key's budget, budget mode and allowed models. The allowlist needs
    keys.create; changing the budget or its mode needs billing.manage too."""
    principal = _principal(request)
    org = organization_for(principal, organization_id, Perm.KEYS_CREATE)
    key = api_key_get(org, key_id)
    if payload.monthly_budget != key.monthly_budget or (
        key.monthly_budget is not None and payload.budget_mode != key.budget_mode
    ):
        organization_for(principal, organization_id, Perm.BILLING_MANAGE)
    key = key_budgets.key_controls_set(
        principal=principal,
        key=key,
        monthly_budget=payload.monthly_budget,
        budget_mode=payload.budget_mode,
        allowed_models=payload.allowed_models,
    )
    return _controls_out(key)


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


# --- the usage and cost API -------------------------------------------------------------------

USAGE_PATH = "/organizations/{organization_id}"


def _param(name: str, description: str, schema: Mapping[str, object]) -> dict[str, object]:
    return {"in": "query", "name": name, "description": description, "schema": schema}


_LIST: Mapping[str, object] = {"type": "array", "items": {"type": "string"}}
_USAGE_PARAMETERS = [
    _param(
        "start_time",
        "Unix seconds or ISO 8601 (no offset: UTC); rounded down to its bucket's start",
        {"type": "string"},
    ),
    _param(
        "end_time",
        "Exclusive; default now; rounded up to a bucket's end. At most 31 days after "
        "start_time for 1h buckets, 366 for 1d and 1mo",
        {"type": "string"},
    ),
    _param("bucket_width", "1h, 1d (default) or 1mo", {"type": "string"}),
    _param(
        "group_by",
        "Repeated or comma-separated: model, project_id, api_key_id, endpoint_id, "
        "service_class; costs also token_kind (alias line_item)",
        _LIST,
    ),
    _param(
        "limit",
        "Buckets per page: 1h default 24, at most 168; 1d 7, 31; 1mo 12, 13",
        {"type": "integer"},
    ),
    _param("page", "The next_page cursor of the previous page", {"type": "string"}),
    *(
        _param(name, f"Only these {what} (repeated or comma-separated, at most 100)", _LIST)
        for name, what in (
            ("models", "models"),
            ("project_ids", "projects"),
            ("api_key_ids", "API keys"),
            ("endpoint_ids", "endpoints"),
        )
    ),
]


def _bucket_fields(bucket: usage_buckets.Bucket) -> dict[str, object]:
    return {
        "start_time": int(bucket.start.timestamp()),
        "end_time": int(bucket.end.timestamp()),
        "start_time_iso": bucket.start,
        "end_time_iso": bucket.end,
        "results": bucket.results,
    }


@router.get(
    f"{USAGE_PATH}/usage",
    response=UsagePageOut,
    auth=usage_auth,
    openapi_extra={"parameters": _USAGE_PARAMETERS},
    summary="Usage in time buckets (read-usage scope, or billing view)",
)
def usage(request: HttpRequest, organization_id: str) -> UsagePageOut:
    org = organization_for_usage(_principal(request), organization_id)
    usage_buckets.read_budget_take(org.id)
    query = usage_buckets.parse_query(request.GET, kind=usage_buckets.USAGE, organization_id=org.id)
    page = usage_buckets.usage_page(query)
    return UsagePageOut(
        data=[UsageBucketOut(**_bucket_fields(b)) for b in page.buckets],  # type: ignore[arg-type]
        has_more=page.next_page is not None,
        next_page=page.next_page,
    )


@router.get(
    f"{USAGE_PATH}/costs",
    response=CostPageOut,
    auth=usage_auth,
    openapi_extra={"parameters": _USAGE_PARAMETERS},
    summary="Costs in time buckets, rated as invoices are (read-usage scope, or billing view)",
)
def costs(request: HttpRequest, organization_id: str) -> CostPageOut:
    org = organization_for_usage(_principal(request), organization_id)
    usage_buckets.read_budget_take(org.id)
    query = usage_buckets.parse_query(request.GET, kind=usage_buckets.COSTS, organization_id=org.id)
    page = usage_buckets.cost_page(query)
    return CostPageOut(
        data=[CostBucketOut(**_bucket_fields(b)) for b in page.buckets],  # type: ignore[arg-type]
        has_more=page.next_page is not None,
        next_page=page.next_page,
    )
