"""Back-office lists of billing rows. Read-only: money moves only through the services.

Generic add/change/delete forms would bypass validation, locking and the audit log, so
they are off for every billing model; the actions live on the back office's own pages
(billing/backoffice/views.py), behind the staff roles' permissions.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from unfold.admin import ModelAdmin

from billing import staff_roles as roles
from billing.models import (
    AutoRecharge,
    BillingAccount,
    BillingDetails,
    Budget,
    BudgetAlert,
    CreditLedgerEntry,
    CreditNote,
    Invoice,
    Price,
    PriceOverride,
    StripeCustomer,
    StripeEvent,
    TaxRate,
    TierMultiplier,
    TopUp,
    TopUpReversal,
    UsageRollup,
)


class ReadOnlyAdmin(ModelAdmin):
    """Lists and details for staff who may view; nobody edits through generic forms."""

    list_per_page = 50
    show_full_result_count = False  # no COUNT(*) over big tables on every page

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def customer_link(org_id: str, label: str | None = None) -> str:
    url = reverse("admin:backoffice-customer", args=[org_id])
    return format_html('<a href="{}">{}</a>', url, label or org_id)


@admin.register(Invoice)
class InvoiceAdmin(ReadOnlyAdmin):
    list_display = (
        "invoice_link",
        "customer",
        "period",
        "status",
        "subtotal",
        "credits_applied",
        "total",
        "finalized_at",
        "paid_at",
    )
    list_filter = ("status", "period_start", "currency")
    search_fields = ("id", "number", "organization__id", "organization__name", "payment_reference")
    list_select_related = ("organization",)
    ordering = ("-period_start", "-finalized_at")
    date_hierarchy = "period_start"

    @admin.display(description="invoice", ordering="number")
    def invoice_link(self, obj: Invoice) -> str:
        url = reverse("admin:backoffice-invoice", args=[obj.id])
        return format_html('<a href="{}">{}</a>', url, obj.number or f"draft {obj.id}")

    @admin.display(description="customer", ordering="organization__name")
    def customer(self, obj: Invoice) -> str:
        return customer_link(obj.organization_id, obj.organization.name)

    @admin.display(description="month", ordering="period_start")
    def period(self, obj: Invoice) -> str:
        return f"{obj.period_start:%Y-%m}"

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # The invoice page has the lines, the credit notes and the actions.
        return HttpResponseRedirect(reverse("admin:backoffice-invoice", args=[object_id]))


@admin.register(CreditNote)
class CreditNoteAdmin(ReadOnlyAdmin):
    list_display = (
        "number",
        "customer",
        "invoice",
        "amount",
        "currency",
        "reason",
        "created_by",
        "created_at",
    )
    search_fields = ("number", "organization__id", "organization__name", "invoice__number")
    list_select_related = ("organization", "invoice", "created_by")
    ordering = ("-created_at",)

    @admin.display(description="customer")
    def customer(self, obj: CreditNote) -> str:
        return customer_link(obj.organization_id, obj.organization.name)


@admin.register(CreditLedgerEntry)
class CreditLedgerEntryAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "customer",
        "kind",
        "amount",
        "currency",
        "grant",
        "expires_at",
        "reference",
        "reason",
        "created_by",
    )
    list_filter = ("kind", "currency")
    search_fields = ("organization__id", "organization__name", "reference", "reason")
    list_select_related = ("organization", "created_by")
    ordering = ("-created_at", "-id")

    @admin.display(description="customer")
    def customer(self, obj: CreditLedgerEntry) -> str:
        return customer_link(obj.organization_id, obj.organization.name)


@admin.register(Price)
class PriceAdmin(ReadOnlyAdmin):
    """The price book's whole history: rows are never changed, a change is a new row."""

    list_display = (
        "model_name",
        "token_kind",
        "unit_price",
        "currency",
        "effective_from",
        "in_effect",
        "reason",
        "created_by",
    )
    list_filter = ("model_name", "token_kind", "currency")
    search_fields = ("model_name",)
    ordering = ("model_name", "token_kind", "-effective_from")
    list_select_related = ("created_by",)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(roles.MOVE_MONEY)

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # price_set validates (whole future hours only) and audits; the generic form would not.
        # Only staff who may set prices are sent there; the rest are refused here.
        if not self.has_add_permission(request):
            raise PermissionDenied
        return HttpResponseRedirect(reverse("admin:backoffice-price-new"))

    @admin.display(description="state")
    def in_effect(self, obj: Price) -> str:
        now = timezone.now()
        if obj.effective_from > now:
            return "scheduled"
        newer = Price.objects.filter(
            model_name=obj.model_name,
            token_kind=obj.token_kind,
            currency=obj.currency,
            effective_from__gt=obj.effective_from,
            effective_from__lte=now,
        ).exists()
        return "superseded" if newer else "in effect"


@admin.register(TierMultiplier)
class TierMultiplierAdmin(ReadOnlyAdmin):
    """The service tiers' price multipliers, history kept: a change is a new row."""

    list_display = (
        "service_tier",
        "model_label",
        "multiplier",
        "effective_from",
        "reason",
        "created_by",
    )
    list_filter = ("service_tier", "model_name")
    ordering = ("service_tier", "model_name", "-effective_from")
    list_select_related = ("created_by",)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(roles.MOVE_MONEY)

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # tier_multiplier_set validates and audits; the generic form would not.
        if not self.has_add_permission(request):
            raise PermissionDenied
        return HttpResponseRedirect(reverse("admin:backoffice-tier-multiplier-new"))

    @admin.display(description="model")
    def model_label(self, obj: TierMultiplier) -> str:
        return obj.model_name or "every model without its own"


@admin.register(PriceOverride)
class PriceOverrideAdmin(ReadOnlyAdmin):
    list_display = (
        "customer",
        "kind",
        "model_name",
        "token_kind",
        "unit_price",
        "discount_percent",
        "threshold",
        "effective_from",
        "effective_until",
        "reason",
    )
    list_filter = ("kind",)
    search_fields = ("organization__id", "organization__name", "model_name")
    list_select_related = ("organization",)
    ordering = ("-effective_from",)

    @admin.display(description="customer")
    def customer(self, obj: PriceOverride) -> str:
        return customer_link(obj.organization_id, obj.organization.name)


@admin.register(BillingAccount)
class BillingAccountAdmin(ReadOnlyAdmin):
    list_display = ("organization", "mode", "updated_at")
    list_filter = ("mode",)
    search_fields = ("organization__id", "organization__name")


@admin.register(Budget)
class BudgetAdmin(ReadOnlyAdmin):
    list_display = ("organization", "project", "monthly_amount", "alert_thresholds", "hard_limit")
    list_filter = ("hard_limit",)
    search_fields = ("organization__id", "organization__name")
    list_select_related = ("organization", "project")


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "organization",
        "project",
        "month",
        "threshold",
        "spend",
        "budget_amount",
    )
    search_fields = ("organization__id", "organization__name")
    list_select_related = ("organization", "project")
    ordering = ("-created_at",)


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    list_display = (
        "hour",
        "organization_id",
        "project_id",
        "api_key_id",
        "endpoint_id",
        "model_name",
        "requests",
        "input_tokens",
        "cached_input_tokens",
        "output_tokens",
        "batch_input_tokens",
        "batch_output_tokens",
    )
    search_fields = ("organization_id",)
    ordering = ("-hour",)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # The explorer filters by every dimension, totals and exports; this list could not.
        return HttpResponseRedirect(reverse("admin:backoffice-usage"))


@admin.register(StripeCustomer)
class StripeCustomerAdmin(ReadOnlyAdmin):
    list_display = (
        "organization",
        "stripe_customer_id",
        "last_paid_at",
        "suspended_for_nonpayment",
    )
    search_fields = ("organization__id", "organization__name", "stripe_customer_id")


@admin.register(StripeEvent)
class StripeEventAdmin(ReadOnlyAdmin):
    list_display = ("id", "type", "created", "received_at", "processed_at", "attempts")
    list_filter = ("type",)
    search_fields = ("id",)
    ordering = ("-received_at",)
    exclude = ("payload",)


@admin.register(TaxRate)
class TaxRateAdmin(ReadOnlyAdmin):
    """Every tax rate version (rows are never changed; `manage.py billing tax-rate-set`
    adds one, validated and audited)."""

    list_display = ("country", "label", "rate", "reverse_charge", "effective_from", "reason")
    list_filter = ("country", "reverse_charge")
    ordering = ("country", "-effective_from")


@admin.register(BillingDetails)
class BillingDetailsAdmin(ReadOnlyAdmin):
    """Whom each organization's invoices are made out to (set in the console)."""

    list_display = ("organization", "legal_name", "country", "tax_id", "updated_at")
    list_filter = ("country",)
    search_fields = ("organization__id", "organization__name", "legal_name", "tax_id")


@admin.register(TopUp)
class TopUpAdmin(ReadOnlyAdmin):
    """Prepaid credit bought through Stripe (console top-ups and auto-recharges); credited
    only by the webhook (docs/billing.md, "Top-ups and auto-recharge")."""

    list_display = (
        "id",
        "organization",
        "source",
        "amount",
        "currency",
        "status",
        "failure_code",
        "refunded_amount",
        "dispute_status",
        "created_at",
        "paid_at",
    )
    list_filter = ("source", "status")
    search_fields = (
        "id",
        "organization__id",
        "organization__name",
        "stripe_checkout_session_id",
        "stripe_payment_intent_id",
    )
    ordering = ("-created_at",)


@admin.register(TopUpReversal)
class TopUpReversalAdmin(ReadOnlyAdmin):
    """Credit taken back from a paid top-up (a refund, a dispute) or given back (a dispute
    won), once per Stripe object (docs/billing.md, "Refunds and disputes")."""

    list_display = ("stripe_object_id", "topup", "kind", "amount", "entry", "created_at")
    list_filter = ("kind",)
    search_fields = ("stripe_object_id", "topup__id", "topup__organization__id")
    ordering = ("-created_at",)


@admin.register(AutoRecharge)
class AutoRechargeAdmin(ReadOnlyAdmin):
    """Each organization's auto-recharge settings (set in the console)."""

    list_display = (
        "organization",
        "enabled",
        "threshold",
        "amount",
        "daily_cap",
        "armed",
        "crossings",
        "updated_at",
    )
    list_filter = ("enabled", "armed")
    search_fields = ("organization__id", "organization__name")
