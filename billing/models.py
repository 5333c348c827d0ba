"""Billing rows: usage (metering), prices, credits, budgets and invoices."""

from __future__ import annotations

from typing import ClassVar

from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from accounts.models import Organization, Project, User
from core import ids

# =========================================================================================
# Prices, credits, budgets, invoices (pricing / invoicing). Units: docs/billing.md.
# Unit prices are per million tokens, 9 decimals; ledger amounts 6 decimals; invoice
# amounts are rounded to cents once, at the line (docs/billing.md, "Invoices").
# =========================================================================================


def new_invoice_id() -> str:
    return ids.new_id("inv_")


class TokenKind(models.TextChoices):
    """The units a price is per million of (the name predates the tensor units).

    Text models are billed by `input` and `output` tokens, and by `cached_input` for the
    prompt tokens the prefix cache served, when the model has such a price (otherwise they
    are billed as `input`); tensor models by `request` (one per inference call) and
    `compute_ms` (milliseconds of model compute a worker measured): see
    `billing.pricing.billed_units` and `PriceBook.billed`.

    Each unit has a `batch_` twin: the same usage of batch lines (the Batch API), billed at
    the batch price where one is set and not above the online one, else at the online
    price (`billing.pricing.BATCH_OF`, `PriceBook.billed`); and `priority_` and `flex_`
    twins: the usage of those service tiers, billed at the online price times the tier's
    multiplier (`TierMultiplier`, `billing.pricing.TIER_OF`).
    """

    INPUT = "input"
    OUTPUT = "output"
    REQUEST = "request"
    COMPUTE_MS = "compute_ms"
    CACHED_INPUT = "cached_input"
    BATCH_INPUT = "batch_input"
    BATCH_OUTPUT = "batch_output"
    BATCH_REQUEST = "batch_request"
    BATCH_COMPUTE_MS = "batch_compute_ms"
    BATCH_CACHED_INPUT = "batch_cached_input"
    PRIORITY_INPUT = "priority_input"
    PRIORITY_OUTPUT = "priority_output"
    PRIORITY_REQUEST = "priority_request"
    PRIORITY_COMPUTE_MS = "priority_compute_ms"
    PRIORITY_CACHED_INPUT = "priority_cached_input"
    FLEX_INPUT = "flex_input"
    FLEX_OUTPUT = "flex_output"
    FLEX_REQUEST = "flex_request"
    FLEX_COMPUTE_MS = "flex_compute_ms"
    FLEX_CACHED_INPUT = "flex_cached_input"
    # Usage within provisioned throughput units: paid per unit-hour, so 0 per token.
    PROVISIONED_INPUT = "provisioned_input"
    PROVISIONED_OUTPUT = "provisioned_output"
    PROVISIONED_REQUEST = "provisioned_request"
    PROVISIONED_COMPUTE_MS = "provisioned_compute_ms"
    PROVISIONED_CACHED_INPUT = "provisioned_cached_input"


TOKEN_KIND_LENGTH = 24
"""max_length of every token_kind column (the longest kind is `provisioned_cached_input`)."""

# The service tiers priced by a multiplier of the online price (docs/service_tiers.md).
PRICED_TIERS = ("priority", "flex")


class TierMultiplier(models.Model):
    """The price of a service tier's usage as a multiple of the online price, for one model
    (or, with a blank model, every model without its own), from `effective_from` on.

    A priority or flex unit (`priority_input`, `flex_output`...) is billed at the price the
    organization pays for the online unit then (list price, contract rate or discount),
    times the tier's multiplier, rounded to the nano per million (`PriceBook.billed`): the
    operator sets a premium or a discount once and it follows every price change. Never
    updated: a change is a new row, so every past rating can be reproduced. The defaults
    (migration 0010: priority 2, flex 0.5, every model) are rows like any other.
    """

    class Tier(models.TextChoices):
        PRIORITY = "priority"
        FLEX = "flex"

    model_name = models.CharField(max_length=120, blank=True)
    service_tier = models.CharField(max_length=16, choices=Tier.choices)
    multiplier = models.DecimalField(max_digits=8, decimal_places=4)
    effective_from = models.DateTimeField()
    reason = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["model_name", "service_tier", "effective_from"],
                name="uniq_tier_multiplier_version",
            ),
            # Priority is a premium (at least the online price), flex a discount (more than
            # nothing, at most the online price).
            models.CheckConstraint(
                condition=Q(service_tier="priority", multiplier__gte=1, multiplier__lte=100)
                | Q(service_tier="flex", multiplier__gt=0, multiplier__lte=1),
                name="tier_multiplier_in_range",
            ),
        ]

    def __str__(self) -> str:
        model = self.model_name or "every model"
        return f"{model} {self.service_tier} x{self.multiplier} from {self.effective_from}"


class Price(models.Model):
    """A list price per million tokens of one kind of one model, from `effective_from` on.

    Never updated: a change is a new row, so every past rating can be reproduced.
    """

    model_name = models.CharField(max_length=120)
    token_kind = models.CharField(max_length=TOKEN_KIND_LENGTH, choices=TokenKind.choices)
    currency = models.CharField(max_length=3, default="USD")
    unit_price = models.DecimalField(max_digits=20, decimal_places=9)
    effective_from = models.DateTimeField()
    reason = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["model_name", "token_kind", "currency", "effective_from"],
                name="uniq_price_version",
            ),
            models.CheckConstraint(condition=Q(unit_price__gte=0), name="price_not_negative"),
        ]
        indexes: ClassVar = [models.Index(fields=["model_name", "token_kind", "effective_from"])]

    def __str__(self) -> str:
        return f"{self.model_name} {self.token_kind} {self.unit_price}/M from {self.effective_from}"


class ProvisionedCommitment(models.Model):
    """Provisioned throughput: `units` model units of one endpoint sold to an organization
    for [starts_at, ends_at), billed per unit-hour whether used or not (docs/provisioned.md).

    A unit is one request in flight on the endpoint's pool, reserved for the organization
    and served ahead of every pay-as-you-go tier; `tokens_per_minute_per_unit` is the
    throughput a unit is guaranteed, measured for the model and pool (bench/provisioned.py)
    and copied here when sold. Requests past the units spill to pay-as-you-go (`spill`) or
    are refused with a 429 (`refuse`), as the organization chose. Never changed but to be
    ended: a change ends the row at an hour and starts a new one there.
    """

    class Overflow(models.TextChoices):
        SPILL = "spill"
        REFUSE = "refuse"

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="provisioned_commitments"
    )
    endpoint = models.ForeignKey(
        "catalog.Endpoint", on_delete=models.PROTECT, related_name="provisioned_commitments"
    )
    model_name = models.CharField(max_length=120)  # the endpoint's model when sold (invoices)
    units = models.PositiveIntegerField()
    tokens_per_minute_per_unit = models.PositiveIntegerField()
    unit_hour_price = models.DecimalField(max_digits=20, decimal_places=9)
    currency = models.CharField(max_length=3, default="USD")
    overflow = models.CharField(max_length=8, choices=Overflow.choices, default=Overflow.SPILL)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=500)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.CheckConstraint(condition=Q(units__gte=1), name="provisioned_units_positive"),
            models.CheckConstraint(
                condition=Q(unit_hour_price__gte=0), name="provisioned_price_not_negative"
            ),
            models.CheckConstraint(
                condition=Q(ends_at__isnull=True) | Q(ends_at__gt=F("starts_at")),
                name="provisioned_ends_after_start",
            ),
        ]
        indexes: ClassVar = [models.Index(fields=["organization", "starts_at"])]

    def __str__(self) -> str:
        return f"{self.organization_id} {self.units} units of {self.endpoint_id}"


class PriceOverride(models.Model):
    """An organization's contract terms, valid in [effective_from, effective_until).

    - rate: a negotiated unit price per million for one (model, token kind); replaces the
      list price.
    - discount: a percentage off the list price, for one model and kind, one model (blank
      kind) or everything (blank model and kind); the most specific one applies.
    - commit_tier: a percentage off the part of the month's usage charges above
      `threshold` (marginal, like tax brackets); an invoice line, never a unit price.
    A rate beats a discount; they never stack. Rows are not edited, only ended.
    """

    class Kind(models.TextChoices):
        RATE = "rate"
        DISCOUNT = "discount"
        COMMIT_TIER = "commit_tier"

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="price_overrides"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    model_name = models.CharField(max_length=120, blank=True)
    token_kind = models.CharField(
        max_length=TOKEN_KIND_LENGTH, choices=TokenKind.choices, blank=True
    )
    unit_price = models.DecimalField(max_digits=20, decimal_places=9, null=True, blank=True)
    discount_percent = models.DecimalField(max_digits=5, decimal_places=2, null=True, blank=True)
    threshold = models.DecimalField(max_digits=20, decimal_places=2, null=True, blank=True)
    effective_from = models.DateTimeField()
    effective_until = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=500)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.CheckConstraint(
                condition=(
                    Q(kind="rate", unit_price__isnull=False, discount_percent__isnull=True)
                    & ~Q(model_name="")
                    & ~Q(token_kind="")
                )
                | Q(kind="discount", unit_price__isnull=True, discount_percent__isnull=False)
                | Q(
                    kind="commit_tier",
                    unit_price__isnull=True,
                    discount_percent__isnull=False,
                    threshold__isnull=False,
                ),
                name="price_override_shape",
            ),
        ]
        indexes: ClassVar = [models.Index(fields=["organization", "kind", "effective_from"])]

    def __str__(self) -> str:
        return f"{self.kind} for {self.organization_id} from {self.effective_from}"


class BillingAccount(models.Model):
    """How an organization pays. Absent: settings.MANTLE_BILLING_DEFAULT_MODE."""

    class Mode(models.TextChoices):
        PREPAID = "prepaid"  # spends its credit balance; admission refuses beyond it
        POSTPAID = "postpaid"  # invoiced monthly; only a hard budget limits admission
        UNLIMITED = "unlimited"  # no money check at admission (internal, trials by contract)

    organization = models.OneToOneField(
        Organization, primary_key=True, on_delete=models.CASCADE, related_name="billing_account"
    )
    mode = models.CharField(max_length=16, choices=Mode.choices)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.organization_id}: {self.mode}"


class CreditLedgerEntry(models.Model):
    """One movement of credit. The balance is the sum of `amount`, never a stored number.

    Grants (prepaid_purchase, promotional) are positive and stand alone; every other
    entry draws on (or tops up) one grant through `grant`, so each grant's remainder is
    its amount plus its movements, and credits can be applied in a documented order.
    """

    class Kind(models.TextChoices):
        PREPAID_PURCHASE = "prepaid_purchase"
        PROMOTIONAL = "promotional"
        CONSUMPTION = "consumption"  # applied to an invoice at finalization (negative)
        EXPIRY = "expiry"  # a grant's remainder written off at its expiry (negative)
        ADJUSTMENT = "adjustment"  # a correction of one grant (either sign)
        # Money given back on an issued invoice (billing/credit_notes.py): a grant, made
        # only through a CreditNote, never by credit_grant.
        CREDIT_NOTE = "credit_note"

    GRANT_KINDS: ClassVar[tuple[str, ...]] = (
        Kind.PREPAID_PURCHASE,
        Kind.PROMOTIONAL,
        Kind.CREDIT_NOTE,
    )
    # What staff grant directly (credit_grant); credit-note grants come with their note.
    STAFF_GRANT_KINDS: ClassVar[tuple[str, ...]] = (Kind.PREPAID_PURCHASE, Kind.PROMOTIONAL)

    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="credit_entries"
    )
    kind = models.CharField(max_length=20, choices=Kind.choices)
    amount = models.DecimalField(max_digits=20, decimal_places=6)
    currency = models.CharField(max_length=3, default="USD")
    grant = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="movements"
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=500)
    reference = models.CharField(max_length=100, blank=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints: ClassVar = [
            models.CheckConstraint(
                condition=Q(
                    kind__in=["prepaid_purchase", "promotional", "credit_note"],
                    amount__gt=0,
                    grant__isnull=True,
                )
                | Q(kind__in=["consumption", "expiry"], amount__lt=0, grant__isnull=False)
                | (Q(kind="adjustment", grant__isnull=False) & ~Q(amount=0)),
                name="credit_entry_shape",
            ),
        ]
        indexes: ClassVar = [
            models.Index(fields=["organization", "created_at"]),
            models.Index(fields=["organization", "kind", "expires_at"]),
        ]
        verbose_name_plural = "credit ledger entries"

    def __str__(self) -> str:
        return f"{self.kind} {self.amount} {self.currency} ({self.organization_id})"


class Budget(models.Model):
    """A monthly spending budget for an organization, or one of its projects."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="budgets")
    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.CASCADE, related_name="budgets"
    )
    monthly_amount = models.DecimalField(max_digits=20, decimal_places=2)
    currency = models.CharField(max_length=3, default="USD")
    # Percentages of monthly_amount, ascending, e.g. [50, 80, 100].
    alert_thresholds = models.JSONField(default=list)
    hard_limit = models.BooleanField(default=False)
    updated_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["organization", "project"], name="uniq_project_budget"),
            models.UniqueConstraint(
                fields=["organization"],
                condition=Q(project__isnull=True),
                name="uniq_organization_budget",
            ),
            models.CheckConstraint(condition=Q(monthly_amount__gt=0), name="budget_positive"),
        ]

    def __str__(self) -> str:
        return f"budget {self.monthly_amount} for {self.project_id or self.organization_id}"


class BudgetAlert(models.Model):
    """A threshold of a budget crossed in a month: recorded once, shown in the console."""

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="budget_alerts"
    )
    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="alerts")
    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    month = models.DateField()  # the first day of the month
    threshold = models.PositiveSmallIntegerField()  # percent
    budget_amount = models.DecimalField(max_digits=20, decimal_places=2)
    spend = models.DecimalField(max_digits=20, decimal_places=2)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["budget", "month", "threshold"], name="uniq_budget_alert"
            ),
        ]
        indexes: ClassVar = [models.Index(fields=["organization", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.threshold}% of budget {self.budget_id} in {self.month:%Y-%m}"


# --- Alerts that reach people (billing/alerts/, docs/billing.md "Alerts and webhooks") -----


def new_alert_event_id() -> str:
    return ids.new_id("evt_")


def new_webhook_endpoint_id() -> str:
    return ids.new_id("whe_")


class AlertSettings(models.Model):
    """Who is told: the organization's billing contacts (empty: its owners and billing
    members), and the prepaid balance under which it is warned (null: the platform's)."""

    organization = models.OneToOneField(
        Organization, primary_key=True, on_delete=models.CASCADE, related_name="alert_settings"
    )
    billing_emails = models.JSONField(default=list)
    low_balance_amount = models.DecimalField(max_digits=20, decimal_places=2, null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"alert settings of {self.organization_id}"


class AlertEvent(models.Model):
    """Something a person must hear about, created once per `dedupe_key` per organization;
    emailed once and delivered once to each subscribed webhook endpoint."""

    class Kind(models.TextChoices):
        BUDGET_THRESHOLD = "budget_threshold"
        HARD_LIMIT_HIT = "hard_limit_hit"
        LOW_BALANCE = "low_balance"
        PAYMENT_FAILED = "payment_failed"
        INVOICE_FINALIZED = "invoice_finalized"
        TEST = "test"  # the console's test send: webhooks only, no email

    id = models.CharField(
        primary_key=True, max_length=40, default=new_alert_event_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="alert_events"
    )
    kind = models.CharField(max_length=32, choices=Kind.choices)
    dedupe_key = models.CharField(max_length=200)
    payload = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)
    # Set when the email to the billing contacts was claimed for sending (once per event).
    emailed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["organization", "dedupe_key"], name="uniq_alert_event_dedupe"
            ),
        ]
        indexes: ClassVar = [models.Index(fields=["organization", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.id} ({self.organization_id})"


class WebhookEndpoint(models.Model):
    """An HTTPS URL of the organization's that receives its alert events, signed with a
    secret shown once at creation and stored sealed (core/secretbox.py)."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_webhook_endpoint_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="webhook_endpoints"
    )
    url = models.CharField(max_length=2000)
    description = models.CharField(max_length=200, blank=True, default="")
    # Event kinds subscribed to; empty: every kind.
    event_types = models.JSONField(default=list)
    secret_sealed = models.TextField()
    secret_hint = models.CharField(max_length=16, default="")
    enabled = models.BooleanField(default=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes: ClassVar = [models.Index(fields=["organization", "created_at"])]

    def __str__(self) -> str:
        return f"webhook {self.id} ({self.organization_id})"


class WebhookDelivery(models.Model):
    """One event to one endpoint: attempted until delivered or out of attempts."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"  # out of attempts, or the endpoint was removed or disabled

    event = models.ForeignKey(AlertEvent, on_delete=models.CASCADE, related_name="deliveries")
    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="webhook_deliveries"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    response_code = models.PositiveIntegerField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["event", "endpoint"], name="uniq_webhook_delivery"),
        ]
        indexes: ClassVar = [
            models.Index(fields=["endpoint", "-created_at"]),
            models.Index(fields=["status", "next_attempt_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} to {self.endpoint_id}: {self.status}"


class Invoice(models.Model):
    """A month of one organization's usage: draft -> finalized -> paid | void."""

    class Status(models.TextChoices):
        DRAFT = "draft"
        FINALIZED = "finalized"
        PAID = "paid"
        VOID = "void"

    id = models.CharField(primary_key=True, max_length=40, default=new_invoice_id, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="invoices"
    )
    period_start = models.DateTimeField()  # first instant of the month, UTC
    period_end = models.DateTimeField()  # first instant of the next month (exclusive)
    number = models.CharField(max_length=32, null=True, blank=True, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    currency = models.CharField(max_length=3, default="USD")
    subtotal = models.DecimalField(max_digits=20, decimal_places=2, default=0)
    credits_applied = models.DecimalField(max_digits=20, decimal_places=2, default=0)
    total = models.DecimalField(max_digits=20, decimal_places=2, default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    refreshed_at = models.DateTimeField(null=True, blank=True)
    finalized_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)
    voided_at = models.DateTimeField(null=True, blank=True)
    payment_reference = models.CharField(max_length=200, blank=True)
    void_reason = models.CharField(max_length=500, blank=True)
    stripe_invoice_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    # Tax (billing/tax.py): the sum of the tax lines, computed at finalization on the
    # subtotal; total = subtotal + tax - credits_applied. 0 on drafts and where no rate applies.
    tax = models.DecimalField(max_digits=20, decimal_places=2, default=0)
    # The seller's and the buyer's details as they were at finalization (billing.tax.Party
    # as a dict): what the PDF shows, whatever the settings or the organization say later.
    # Empty on drafts (the PDF shows the current details) and on invoices finalized before.
    seller = models.JSONField(default=dict, blank=True)
    buyer = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["organization", "period_start"], name="uniq_invoice_period"
            ),
        ]
        indexes: ClassVar = [models.Index(fields=["status", "period_end"])]

    def __str__(self) -> str:
        return f"{self.number or self.id} ({self.status})"


class InvoiceLine(models.Model):
    """One line: tokens of one model and kind at one unit price, or a discount."""

    class Kind(models.TextChoices):
        USAGE = "usage"  # the invoice's own month
        ADJUSTMENT = "adjustment"  # usage of an earlier, already invoiced month
        DISCOUNT = "discount"  # committed-spend tier (negative)
        # Held (unpriced) usage an operator priced afterwards (HeldUsage.release_price).
        RELEASED = "released"
        # Unit-hours of a provisioned throughput commitment (quantity: unit-hours).
        PROVISIONED = "provisioned"

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveIntegerField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # The month the tokens were used in (usage and adjustment lines).
    usage_month = models.DateField(null=True, blank=True)
    model_name = models.CharField(max_length=120, blank=True)
    token_kind = models.CharField(
        max_length=TOKEN_KIND_LENGTH, choices=TokenKind.choices, blank=True
    )
    quantity = models.BigIntegerField(default=0)  # tokens
    unit_price = models.DecimalField(max_digits=20, decimal_places=9, null=True, blank=True)
    amount = models.DecimalField(max_digits=20, decimal_places=2)
    label = models.CharField(max_length=200)

    class Meta:
        ordering: ClassVar = ["invoice", "position"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["invoice", "position"], name="uniq_invoice_line"),
        ]

    def __str__(self) -> str:
        return f"{self.label}: {self.amount}"


class InvoiceTaxLine(models.Model):
    """One tax of a finalized invoice: a rate on the taxable amount, or a reverse-charge
    note (rate and amount 0). Written once, at finalization (billing/tax.py)."""

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="tax_lines")
    position = models.PositiveIntegerField()
    label = models.CharField(max_length=200)  # e.g. "VAT 19% (DE)"
    country = models.CharField(max_length=2, blank=True)  # the rate's country ("" for the default)
    rate = models.DecimalField(max_digits=6, decimal_places=3)  # percent
    taxable_amount = models.DecimalField(max_digits=20, decimal_places=2)
    amount = models.DecimalField(max_digits=20, decimal_places=2)
    reverse_charge = models.BooleanField(default=False)
    note = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering: ClassVar = ["invoice", "position"]
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["invoice", "position"], name="uniq_invoice_tax_line"),
        ]

    def __str__(self) -> str:
        return f"{self.label}: {self.amount}"


class TaxRate(models.Model):
    """The tax charged to buyers in one country (ISO 3166-1 alpha-2), from `effective_from` on.

    A blank country is the default: buyers of a country without a row of its own, and
    buyers who gave no country. With `reverse_charge`, a buyer with a tax id in another
    country than the seller's is charged no tax and the invoice says the buyer accounts for
    it (B2B reverse charge). No row for a buyer: no tax line. Never updated: a change is a
    new row, so every past finalization can be reproduced (billing/tax.py).
    """

    country = models.CharField(max_length=2, blank=True)
    label = models.CharField(max_length=32)  # "VAT", "GST", "Sales tax"
    rate = models.DecimalField(max_digits=6, decimal_places=3)  # percent
    reverse_charge = models.BooleanField(default=False)
    effective_from = models.DateTimeField()
    reason = models.CharField(max_length=500)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["country", "effective_from"], name="uniq_tax_rate_version"
            ),
            models.CheckConstraint(
                condition=Q(rate__gte=0, rate__lte=100), name="tax_rate_in_range"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.label} {self.rate}% ({self.country or 'default'}) from {self.effective_from}"


class BillingDetails(models.Model):
    """Whom an organization's invoices are made out to: its legal name, postal address,
    country and tax id (VAT/GST number), set by its billing managers in the console and
    copied onto each invoice at finalization (billing/tax.py checks every field)."""

    organization = models.OneToOneField(
        Organization, primary_key=True, on_delete=models.CASCADE, related_name="billing_details"
    )
    legal_name = models.CharField(max_length=200)
    address = models.CharField(max_length=500)  # lines separated by "\n"
    country = models.CharField(max_length=2)  # ISO 3166-1 alpha-2
    tax_id = models.CharField(max_length=32, blank=True)  # compact form
    updated_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "billing details"

    def __str__(self) -> str:
        return f"billing details of {self.organization_id}"


class InvoiceNumberSequence(models.Model):
    """The last invoice number issued in a year; locked and bumped inside finalization."""

    year = models.PositiveIntegerField(primary_key=True)
    last_number = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.year}: {self.last_number}"


class HeldUsage(models.Model):
    """Usage that no price covered when its invoice was computed: held, not billed.

    An unpriced model must not stop the rest of an invoice, nor be billed at zero by
    accident. Its quantity is recorded here per (usage month, model, unit) with the invoice
    that found it; while that invoice is a draft the rows are recomputed with its lines.
    Once the invoice is issued an operator either releases the usage at a unit price (it is
    billed as a `released` line on the organization's next invoice) or writes it off.
    """

    class Status(models.TextChoices):
        HELD = "held"  # waiting for the operator
        RELEASED = "released"  # priced by the operator; on `billed_invoice` once drafted
        BILLED = "billed"  # on an issued invoice (`billed_invoice`)
        WRITTEN_OFF = "written_off"

    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="held_usage"
    )
    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="held_usage")
    usage_month = models.DateField()
    model_name = models.CharField(max_length=120)
    token_kind = models.CharField(max_length=TOKEN_KIND_LENGTH, choices=TokenKind.choices)
    quantity = models.BigIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.HELD)
    unit_price = models.DecimalField(max_digits=20, decimal_places=9, null=True, blank=True)
    billed_invoice = models.ForeignKey(
        Invoice, null=True, blank=True, on_delete=models.SET_NULL, related_name="released_usage"
    )
    reason = models.CharField(max_length=500, blank=True)
    resolved_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    resolved_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints: ClassVar = [
            models.CheckConstraint(condition=Q(quantity__gt=0), name="held_usage_positive"),
        ]
        indexes: ClassVar = [models.Index(fields=["organization", "status"])]
        verbose_name_plural = "held usage"

    def __str__(self) -> str:
        return f"{self.quantity} {self.token_kind} of {self.model_name} ({self.status})"


# ======================================= end of pricing / invoicing ======================


# =========================================================================================
# Metering (billing/metering/): raw usage events and hourly rollups. Ids are plain
# strings, not foreign keys: usage must outlive deleted keys and endpoints, and an insert
# must not look anything up. On PostgreSQL the raw table is partitioned by month and
# created by hand in the migration (docs/billing.md, "Metering").
# =========================================================================================


class UsageEvent(models.Model):
    """One finished request as its worker reported it. Append-only; never updated.

    `occurred_at` is the worker's `finished_at`: fixed in the event, so (request_id,
    occurred_at) identifies a delivery and is the key that makes the drain idempotent.
    """

    pk = models.CompositePrimaryKey("request_id", "occurred_at")
    request_id = models.CharField(max_length=128)
    occurred_at = models.DateTimeField()
    organization_id = models.CharField(max_length=64)
    project_id = models.CharField(max_length=64)
    api_key_id = models.CharField(max_length=64)
    endpoint_id = models.CharField(max_length=64)
    model_version_id = models.CharField(max_length=64)
    model_name = models.CharField(max_length=200)
    input_tokens = models.BigIntegerField()
    output_tokens = models.BigIntegerField()
    status = models.CharField(max_length=16)
    started_at = models.DateTimeField()
    queue_ms = models.BigIntegerField()
    compute_ms = models.BigIntegerField()
    worker = models.CharField(max_length=128, blank=True)
    recorded_at = models.DateTimeField(default=timezone.now)
    # Of input_tokens, those the prefix cache served. A database default: a drain of the
    # previous release (rolling deploy) still inserts rows without naming it.
    cached_input_tokens = models.BigIntegerField(default=0, db_default=0)
    # The class of work (workers.contract.ServiceClass): batch lines are rated at the
    # model's batch prices. A database default for the same reason.
    service_class = models.CharField(max_length=16, default="online", db_default="online")
    # A request relayed to an upstream provider (docs/providers.md): whether its counts are
    # the gateway's estimate (the provider returned no usage), what the provider charges
    # for it (cost of goods, nanos of the currency) and which provider served it.
    estimated = models.SmallIntegerField(default=0, db_default=0)
    cost_nanos = models.BigIntegerField(default=0, db_default=0)
    provider_id = models.CharField(max_length=64, blank=True, default="", db_default="")

    def __str__(self) -> str:
        return f"{self.request_id} at {self.occurred_at:%Y-%m-%d %H:%M:%S}"


class UsageRollup(models.Model):
    """Sums of the usage events of one (org, project, key, endpoint, model) in one UTC hour.

    What invoices, budgets and the console read. Only the drain writes it, in the same
    transaction as the raw events it counts; `updated_at` lets readers pick up late usage.
    """

    organization_id = models.CharField(max_length=64)
    project_id = models.CharField(max_length=64)
    api_key_id = models.CharField(max_length=64)
    endpoint_id = models.CharField(max_length=64)
    model_name = models.CharField(max_length=200)
    hour = models.DateTimeField()
    requests = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    # Milliseconds of model compute (the events' compute_ms): what tensor models bill. A
    # database default too: a drain of the previous release (rolling deploy) or a raw
    # insert that does not name the column still writes rows.
    compute_ms = models.BigIntegerField(default=0, db_default=0)
    # Of input_tokens, those the prefix cache served (billed at the cached input price when
    # the model has one). A database default for the same reason as compute_ms.
    cached_input_tokens = models.BigIntegerField(default=0, db_default=0)
    # Of each sum above, the part of batch lines (events of service class `batch`), billed
    # at the batch prices (the `batch_` units). Parts, not a dimension of the key: a drain
    # of the previous release still upserts on the same key, and every reader that sums
    # the totals keeps counting all usage. Database defaults for the same reason.
    batch_requests = models.BigIntegerField(default=0, db_default=0)
    batch_input_tokens = models.BigIntegerField(default=0, db_default=0)
    batch_output_tokens = models.BigIntegerField(default=0, db_default=0)
    batch_compute_ms = models.BigIntegerField(default=0, db_default=0)
    batch_cached_input_tokens = models.BigIntegerField(default=0, db_default=0)
    # The same parts for the priority and flex service tiers (billed at the online price
    # times the tier's multiplier, TierMultiplier).
    priority_requests = models.BigIntegerField(default=0, db_default=0)
    priority_input_tokens = models.BigIntegerField(default=0, db_default=0)
    priority_output_tokens = models.BigIntegerField(default=0, db_default=0)
    priority_compute_ms = models.BigIntegerField(default=0, db_default=0)
    priority_cached_input_tokens = models.BigIntegerField(default=0, db_default=0)
    flex_requests = models.BigIntegerField(default=0, db_default=0)
    flex_input_tokens = models.BigIntegerField(default=0, db_default=0)
    flex_output_tokens = models.BigIntegerField(default=0, db_default=0)
    flex_compute_ms = models.BigIntegerField(default=0, db_default=0)
    flex_cached_input_tokens = models.BigIntegerField(default=0, db_default=0)
    # And of provisioned throughput (within an organization's units: 0 per token, the
    # units are billed per unit-hour).
    provisioned_requests = models.BigIntegerField(default=0, db_default=0)
    provisioned_input_tokens = models.BigIntegerField(default=0, db_default=0)
    provisioned_output_tokens = models.BigIntegerField(default=0, db_default=0)
    provisioned_compute_ms = models.BigIntegerField(default=0, db_default=0)
    provisioned_cached_input_tokens = models.BigIntegerField(default=0, db_default=0)
    # Requests relayed to upstream providers: what the providers charge for them (cost of
    # goods, nanos of the currency), and how many of them had estimated counts.
    cost_nanos = models.BigIntegerField(default=0, db_default=0)
    estimated_requests = models.BigIntegerField(default=0, db_default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=[
                    "organization_id",
                    "project_id",
                    "api_key_id",
                    "endpoint_id",
                    "model_name",
                    "hour",
                ],
                name="uniq_usage_rollup",
            ),
        ]
        # No index on updated_at: the drain updates rows in place (HOT), and an index on a
        # column it changes would turn every update into a new entry in every index.
        indexes: ClassVar = [
            models.Index(fields=["organization_id", "hour"], name="usage_rollup_org_hour"),
        ]

    def __str__(self) -> str:
        return f"{self.organization_id} {self.model_name} {self.hour:%Y-%m-%d %H}h"


class SpendOutbox(models.Model):
    """Token increments of one committed drain batch, per organization, not yet in Redis.

    Written in the batch's transaction and deleted once applied, so the near-real-time
    spend in Redis is exactly-once too (billing/metering/outbox.py, `outbox_finish`).
    """

    # Names the batch in Redis: its applied-marker makes a replay after a crash a no-op.
    batch = models.UUIDField(unique=True)
    # {organization_id: [input_tokens, output_tokens, cached_input_tokens]}; rows of the
    # previous release have no third number (read as 0).
    deltas = models.JSONField()
    # The inserted request ids, kept only when on_counted hooks may need a replay.
    request_ids = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"spend batch {self.pk}"


# ========================================= end of metering ===============================


# =========================================================================================
# Stripe (billing/payments/: stripe_sync.py, webhooks.py): each organization's Stripe
# customer, the raw webhook events (stored before processing, processed once by id), and
# the failed payments that dunning counts. Optional: empty when Stripe is not configured.
# =========================================================================================


class StripeCustomer(models.Model):
    """The Stripe customer of an organization, and its dunning state."""

    organization = models.OneToOneField(
        Organization, primary_key=True, on_delete=models.PROTECT, related_name="stripe_customer"
    )
    stripe_customer_id = models.CharField(max_length=255, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # `created` of the latest invoice.paid event: failures before it no longer count.
    last_paid_at = models.DateTimeField(null=True, blank=True)
    # Set when dunning (not an operator) suspended the organization, so that only such a
    # suspension is lifted by a payment.
    suspended_for_nonpayment = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.organization_id} = {self.stripe_customer_id}"


class StripeEvent(models.Model):
    """A webhook event exactly as Stripe signed it; `processed_at` makes processing once-only."""

    id = models.CharField(primary_key=True, max_length=255)  # evt_...
    type = models.CharField(max_length=100)
    created = models.DateTimeField()  # when Stripe created the event (orders events)
    livemode = models.BooleanField(default=False)
    payload = models.JSONField()
    received_at = models.DateTimeField(default=timezone.now)
    processed_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)

    class Meta:
        indexes: ClassVar = [
            models.Index(fields=["type", "created"], name="stripe_event_type_created"),
            models.Index(
                fields=["received_at"],
                condition=Q(processed_at__isnull=True),
                name="stripe_event_unprocessed",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.id}"


def new_topup_id() -> str:
    return ids.new_id("topup_")


class TopUp(models.Model):
    """Prepaid credit bought through Stripe: a console top-up (a Checkout payment) or an
    auto-recharge (an off-session charge of the saved payment method).

    Credited once, by the webhook that confirms the payment, never by the customer's
    return from Stripe: `credit` is the ledger grant it made (one-to-one, so a second
    grant for the same top-up cannot exist) (billing/payments/topups.py).
    """

    class Source(models.TextChoices):
        CHECKOUT = "checkout"
        AUTO_RECHARGE = "auto_recharge"

    class Status(models.TextChoices):
        PENDING = "pending"  # asked of Stripe, not confirmed paid
        PAID = "paid"  # confirmed by a webhook; `credit` granted
        FAILED = "failed"  # declined or needing its holder (auto-recharge); never retried
        EXPIRED = "expired"  # the Checkout session expired unpaid

    id = models.CharField(primary_key=True, max_length=40, default=new_topup_id, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="topups")
    source = models.CharField(max_length=16, choices=Source.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    amount = models.DecimalField(max_digits=20, decimal_places=2)
    currency = models.CharField(max_length=3)
    stripe_checkout_session_id = models.CharField(
        max_length=255, null=True, blank=True, unique=True
    )
    stripe_payment_intent_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    receipt_url = models.CharField(max_length=500, blank=True)
    credit = models.OneToOneField(
        CreditLedgerEntry, null=True, blank=True, on_delete=models.PROTECT, related_name="topup"
    )
    # Auto-recharge: the organization's n-th threshold crossing this charge is for.
    crossing = models.PositiveIntegerField(null=True, blank=True)
    failure_code = models.CharField(max_length=100, blank=True)
    failure_message = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    paid_at = models.DateTimeField(null=True, blank=True)
    # Taken back after payment (billing/payments/topups.py, "reversals"): what Stripe
    # refunded of the charge, and its latest dispute's Stripe status ("" if none).
    refunded_amount = models.DecimalField(max_digits=20, decimal_places=2, default=0)
    dispute_status = models.CharField(max_length=32, blank=True)

    class Meta:
        constraints: ClassVar = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="topup_amount_positive"),
            models.CheckConstraint(
                condition=~Q(status="paid") | Q(credit__isnull=False, paid_at__isnull=False),
                name="topup_paid_is_credited",
            ),
            models.UniqueConstraint(
                fields=["organization", "crossing"],
                condition=Q(crossing__isnull=False),
                name="topup_one_per_crossing",
            ),
        ]
        indexes: ClassVar = [
            models.Index(fields=["organization", "created_at"], name="topup_org_created"),
        ]

    def __str__(self) -> str:
        return f"{self.source} top-up {self.amount} {self.currency} ({self.status})"


class TopUpReversal(models.Model):
    """Credit taken back from (or, for a dispute the platform won, given back to) a paid
    top-up, once per Stripe object: `stripe_object_id` is a refund's id (`re_...`), a
    dispute's id (`dp_...`, taken back), or `<dispute id>:won` (given back)."""

    class Kind(models.TextChoices):
        REFUND = "refund"
        DISPUTE = "dispute"
        DISPUTE_WON = "dispute_won"

    stripe_object_id = models.CharField(max_length=255, unique=True)
    topup = models.ForeignKey(TopUp, on_delete=models.PROTECT, related_name="reversals")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # Signed, as on the ledger: negative taken back, positive given back.
    amount = models.DecimalField(max_digits=20, decimal_places=2)
    entry = models.OneToOneField(
        CreditLedgerEntry, on_delete=models.PROTECT, related_name="topup_reversal"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints: ClassVar = [
            models.CheckConstraint(condition=~Q(amount=0), name="topup_reversal_nonzero"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount} of {self.topup_id} ({self.stripe_object_id})"


class AutoRecharge(models.Model):
    """An organization's auto-recharge: under `threshold`, charge `amount` to the saved
    payment method, once per crossing (`armed`), at most `daily_cap` a UTC day."""

    organization = models.OneToOneField(
        Organization, primary_key=True, on_delete=models.CASCADE, related_name="auto_recharge"
    )
    enabled = models.BooleanField(default=False)
    threshold = models.DecimalField(max_digits=20, decimal_places=2)
    amount = models.DecimalField(max_digits=20, decimal_places=2)
    daily_cap = models.DecimalField(max_digits=20, decimal_places=2)
    # Cleared when a crossing is charged, set again once the balance is back at or above
    # the threshold: one charge per crossing, whatever happens to the charge.
    armed = models.BooleanField(default=True)
    # Crossings charged so far; the next charge is for crossing + 1 (its idempotency key).
    crossings = models.PositiveIntegerField(default=0)
    updated_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints: ClassVar = [
            models.CheckConstraint(
                condition=Q(threshold__gte=0, amount__gt=0, daily_cap__gte=F("amount")),
                name="auto_recharge_amounts",
            ),
        ]

    def __str__(self) -> str:
        return f"auto-recharge of {self.organization_id}"


class StripePaymentFailure(models.Model):
    """One failed attempt to collect a Stripe invoice (an invoice.payment_failed event)."""

    event = models.OneToOneField(
        StripeEvent, primary_key=True, on_delete=models.CASCADE, related_name="+"
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="stripe_payment_failures"
    )
    stripe_invoice_id = models.CharField(max_length=255)
    failed_at = models.DateTimeField()  # the event's `created`

    class Meta:
        indexes: ClassVar = [
            models.Index(fields=["organization", "failed_at"], name="stripe_failure_org_time"),
        ]

    def __str__(self) -> str:
        return f"{self.organization_id} {self.stripe_invoice_id} at {self.failed_at}"


# ========================================= end of Stripe =================================


# =========================================================================================
# Back office (billing/credit_notes.py, billing/backoffice/): credit notes on issued
# invoices, and the permissions that the two staff roles are made of.
# =========================================================================================


def new_credit_note_id() -> str:
    return ids.new_id("cn_")


class CreditNote(models.Model):
    """Money given back on a finalized or paid invoice, with its own gap-free number.

    Its amount becomes a `credit_note` grant in the ledger, which the organization's next
    invoices consume (docs/backoffice.md, "Credit notes"). Never updated or deleted.
    """

    id = models.CharField(
        primary_key=True, max_length=40, default=new_credit_note_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="credit_notes"
    )
    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="credit_notes")
    number = models.CharField(max_length=32, unique=True)
    amount = models.DecimalField(max_digits=20, decimal_places=2)
    currency = models.CharField(max_length=3, default="USD")
    reason = models.CharField(max_length=500)
    ledger_entry = models.OneToOneField(
        CreditLedgerEntry, on_delete=models.PROTECT, related_name="credit_note"
    )
    # The back office's form token: the same submission twice issues one note.
    idempotency_key = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints: ClassVar = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="credit_note_positive"),
        ]
        indexes: ClassVar = [models.Index(fields=["organization", "created_at"])]

    def __str__(self) -> str:
        return f"{self.number} on {self.invoice_id}: {self.amount} {self.currency}"


class CreditNoteNumberSequence(models.Model):
    """The last credit-note number issued in a year; locked and bumped inside the issue."""

    year = models.PositiveIntegerField(primary_key=True)
    last_number = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.year}: {self.last_number}"


class BackOffice(models.Model):
    """Not a table: Django attaches permissions to a model, and these belong to no row.

    The staff roles (billing/staff_roles.py) are Groups of these plus view rights.
    """

    class Meta:
        managed = False
        default_permissions = ()
        permissions = (
            ("move_money", "Can move money: invoices, credit notes, credits, prices"),
            ("suspend_organization", "Can suspend and reactivate organizations"),
        )

    def __str__(self) -> str:
        return "back office permissions"


# ===================================== end of back office ================================
