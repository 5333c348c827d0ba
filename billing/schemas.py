"""Request and response shapes of the billing part of the management API.

Money is a decimal string ("12.34"), never a JSON number: a float cannot hold it exactly.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Literal

from ninja import Schema
from pydantic import ConfigDict, Field


class In(Schema):
    model_config = ConfigDict(extra="forbid")


class BalanceOut(Schema):
    currency: str
    mode: str = Field(description="prepaid | postpaid | unlimited")
    balance: str = Field(description="The sum of the credit ledger")
    available: str = Field(description="Credit not past its expiry: what can still be spent")
    month: str = Field(description="The current month, YYYY-MM (UTC)")
    month_spend: str = Field(description="This month's usage charges so far, before credits")


class CreditEntryOut(Schema):
    id: int
    kind: str
    amount: str
    currency: str
    grant_id: int | None
    expires_at: datetime | None
    reason: str
    reference: str
    created_at: datetime


class InvoiceOut(Schema):
    id: str
    number: str | None
    status: str
    currency: str
    period_start: datetime
    period_end: datetime
    subtotal: str
    tax: str = Field(description="the sum of the tax lines, computed at finalization (0 on drafts)")
    credits_applied: str
    total: str = Field(description="subtotal + tax - credits_applied: what is due")
    finalized_at: datetime | None
    paid_at: datetime | None
    voided_at: datetime | None
    payment_reference: str


class InvoiceLineOut(Schema):
    kind: str = Field(description="usage | adjustment (late usage of an earlier month) | discount")
    label: str
    usage_month: date | None
    model_name: str
    token_kind: str = Field(
        description="the unit: input | cached_input (prompt tokens served from the prefix "
        "cache, where the model has a cached price) | output | request | compute_ms, or the "
        "same of batch lines (Batch API): batch_input | batch_cached_input | batch_output | "
        "batch_request | batch_compute_ms"
    )
    quantity: int = Field(description="tokens")
    unit_price: str | None = Field(description="per million tokens")
    amount: str


class InvoiceTaxLineOut(Schema):
    label: str
    country: str = Field(
        description="the rate's country (ISO 3166-1 alpha-2); empty: the default rate"
    )
    rate: str = Field(description="percent")
    taxable_amount: str
    amount: str
    reverse_charge: bool
    note: str


class InvoiceDetailOut(InvoiceOut):
    lines: list[InvoiceLineOut]
    tax_lines: list[InvoiceTaxLineOut]


class BillingDetailsIn(In):
    """Whom invoices are made out to; billing.tax.billing_details_set checks each field."""

    legal_name: str = Field(max_length=1000, description="1 to 200 printable characters")
    address: str = Field(
        max_length=2000, description="1 to 500 printable characters, at most 6 lines ('\\n')"
    )
    country: str = Field(max_length=16, description="ISO 3166-1 alpha-2, e.g. DE")
    tax_id: str = Field(
        default="",
        max_length=200,
        description="VAT/GST number, checked by the country's rules where known; '' for none",
    )


class BillingDetailsOut(Schema):
    legal_name: str = Field(description="empty while the details are not set")
    address: str
    country: str
    tax_id: str
    updated_at: datetime | None


class BudgetIn(In):
    project_id: str | None = Field(default=None, description="None: the whole organization")
    monthly_amount: Decimal
    alert_thresholds: list[int] = Field(default_factory=lambda: [50, 80, 100], max_length=10)
    hard_limit: bool = False


class BudgetsIn(In):
    budgets: list[BudgetIn] = Field(max_length=1000)


class BudgetOut(Schema):
    id: int
    project_id: str | None
    monthly_amount: str
    currency: str
    alert_thresholds: list[int]
    hard_limit: bool
    month_spend: str
    updated_at: datetime


class KeyControlsIn(In):
    monthly_budget: Decimal | None = Field(
        default=None, description="The key's monthly budget (>= 0, 2 places); null: none"
    )
    budget_mode: Literal["hard", "soft"] = Field(
        default="hard", description="hard: refused at admission; soft: alerts only"
    )
    allowed_models: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Model (or endpoint) names the key may use; empty: every model",
    )


class KeyControlsOut(Schema):
    key_id: str
    monthly_budget: str | None
    budget_mode: str
    allowed_models: list[str]
    currency: str
    month: str
    month_spend: str


class BudgetAlertOut(Schema):
    id: int
    project_id: str | None
    month: str
    threshold: int
    budget_amount: str
    spend: str
    created_at: datetime


# --- the usage and cost API (OpenAI's organization usage and costs shape) -----------------


class UsageResultOut(Schema):
    object: str = "organization.usage.result"
    requests: int
    input_tokens: int = Field(description="Prompt tokens, the cached ones included")
    output_tokens: int
    cached_input_tokens: int = Field(description="Of input_tokens, those the prefix cache served")
    compute_ms: int = Field(description="Milliseconds of model compute")
    model: str | None = Field(description="When grouped by model")
    project_id: str | None = Field(description="When grouped by project_id")
    api_key_id: str | None = Field(description="When grouped by api_key_id")
    endpoint_id: str | None = Field(description="When grouped by endpoint_id")
    service_class: str | None = Field(
        description="When grouped by service_class: online, batch, priority, flex, provisioned"
    )


class AmountOut(Schema):
    value: str = Field(description="Exact decimal string, never rounded (invoices round lines)")
    currency: str


class CostResultOut(Schema):
    object: str = "organization.costs.result"
    amount: AmountOut
    line_item: str | None = Field(
        description="When grouped by token_kind: the invoice line's kind (input, batch_output, ...)"
    )
    model: str | None
    project_id: str | None
    api_key_id: str | None
    endpoint_id: str | None
    service_class: str | None


class UsageBucketOut(Schema):
    object: str = "bucket"
    start_time: int = Field(description="Unix seconds, inclusive")
    end_time: int = Field(description="Unix seconds, exclusive")
    start_time_iso: datetime
    end_time_iso: datetime
    results: list[UsageResultOut]


class CostBucketOut(Schema):
    object: str = "bucket"
    start_time: int
    end_time: int
    start_time_iso: datetime
    end_time_iso: datetime
    results: list[CostResultOut]


class UsagePageOut(Schema):
    object: str = "page"
    data: list[UsageBucketOut]
    has_more: bool
    next_page: str | None = Field(description="Pass as `page` for the next buckets")


class CostPageOut(Schema):
    object: str = "page"
    data: list[CostBucketOut]
    has_more: bool
    next_page: str | None
