"""Back-office pages: customer, invoice, usage explorer, margin and their CSV, money actions
(thin views)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.db.models import Q
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    StreamingHttpResponse,
)
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from accounts import services as account_services
from accounts.models import Organization, User
from accounts.principal import Principal
from billing import pricing, provisioned
from billing import staff_roles as roles
from billing.backoffice import forms as bo_forms
from billing.backoffice import selectors
from billing.backoffice.services import (
    backoffice_invoice_finalize,
    backoffice_invoice_mark_paid,
    backoffice_invoice_void,
)
from billing.credit_notes import credit_note_issue, creditable_amount, credited_amount
from billing.credits import credit_grant as credits_grant
from billing.invoice_pdf import invoice_pdf_response
from billing.models import Invoice, PriceOverride, ProvisionedCommitment
from catalog.models import Endpoint, Model
from core.errors import DomainError
from core.redis import get_redis

logger = logging.getLogger(__name__)

FORM_TOKEN_TTL_S = 24 * 3600


# --- Helpers ---------------------------------------------------------------------------------


def _require(request: HttpRequest, *perms: str) -> None:
    """Staff (admin_view checked that) whose role carries every permission named."""
    user = request.user
    if not all(user.has_perm(p) for p in perms):
        raise PermissionDenied(f"your staff role does not allow this ({', '.join(perms)})")


def _principal(request: HttpRequest) -> Principal:
    user = request.user
    assert isinstance(user, User)
    return Principal(user=user, ip_address=request.META.get("REMOTE_ADDR"))


def _context(request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
    return {**admin.site.each_context(request), "title": title, **extra}


def _org_or_404(org_id: str) -> Organization:
    org = Organization.objects.filter(id=org_id).first()
    if org is None:
        raise Http404(f"organization {org_id!r} not found")
    return org


def _invoice_or_404(invoice_id: str) -> Invoice:
    invoice = Invoice.objects.select_related("organization").filter(id=invoice_id).first()
    if invoice is None:
        raise Http404(f"invoice {invoice_id!r} not found")
    return invoice


def _claim_token(token: str) -> bool:
    """True the first time a form token is submitted (a double submit acts once)."""
    return bool(
        get_redis().set(f"mantle:backoffice:form:{token}", "1", nx=True, ex=FORM_TOKEN_TTL_S)
    )


def _release_token(token: str) -> None:
    # The action was refused: the same form may be corrected and sent again.
    get_redis().delete(f"mantle:backoffice:form:{token}")


def _action(
    request: HttpRequest,
    *,
    form: bo_forms.ActionForm,
    title: str,
    back_url: str,
    perform: Callable[[Mapping[str, Any]], tuple[str, str]],
    context: Mapping[str, Any] | None = None,
) -> HttpResponse:
    """GET shows the form; POST validates it, acts once through a service, redirects.

    `perform` returns (message, url to go to). A DomainError from the service is shown on
    the form with its HTTP status (400 invalid, 403, 409 refused in this state); the
    services are atomic, so nothing was written.
    """
    status = 200
    if request.method == "POST":
        if form.is_valid():
            token = form.cleaned_data["form_token"]
            if not _claim_token(token):
                messages.info(request, "This form was already submitted; nothing was repeated.")
                return redirect(back_url)
            try:
                message, url = perform(form.cleaned_data)
            except DomainError as exc:
                _release_token(token)
                field = exc.param if exc.param in form.fields else None
                form.add_error(field, exc.message)
                status = exc.status
            else:
                messages.success(request, message)
                return redirect(url)
        else:
            status = 400
    return TemplateResponse(
        request,
        "backoffice/action.html",
        _context(request, title, form=form, back_url=back_url, **(context or {})),
        status=status,
    )


def _form_data(request: HttpRequest) -> Any:
    return request.POST if request.method == "POST" else None


# --- Customer --------------------------------------------------------------------------------


def customer(request: HttpRequest, org_id: str) -> HttpResponse:
    _require(request, "accounts.view_organization")
    org = _org_or_404(org_id)
    overview = selectors.customer_overview(org)
    user = request.user
    return TemplateResponse(
        request,
        "backoffice/customer.html",
        _context(
            request,
            f"{org.name}",
            subtitle=org.id,
            o=overview,
            can_move_money=user.has_perm(roles.MOVE_MONEY),
            can_suspend=user.has_perm(roles.SUSPEND),
            status_form=bo_forms.StatusForm(
                initial={"status": "active" if org.status == "suspended" else "suspended"}
            ),
        ),
    )


def customer_status(request: HttpRequest, org_id: str) -> HttpResponse:
    _require(request, roles.SUSPEND)
    org = _org_or_404(org_id)
    back = reverse("admin:backoffice-customer", args=[org.id])

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        account_services.organization_set_status(
            principal=_principal(request), org=org, status=data["status"], reason=data["reason"]
        )
        verb = "suspended: its API keys are refused" if org.status == "suspended" else "active"
        return f"{org.name} is now {verb}", back

    return _action(
        request,
        form=bo_forms.StatusForm(_form_data(request)),
        title=f"Suspend or reactivate {org.name}",
        back_url=back,
        perform=perform,
    )


def credit_grant(request: HttpRequest, org_id: str) -> HttpResponse:
    _require(request, roles.MOVE_MONEY)
    org = _org_or_404(org_id)
    back = reverse("admin:backoffice-customer", args=[org.id])

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        entry = credits_grant(
            principal=_principal(request),
            org=org,
            kind=data["kind"],
            amount=data["amount"],
            reason=data["reason"],
            expires_at=data["expires_at"],
            reference=data["reference"],
        )
        return f"{entry.amount} {entry.currency} of {entry.kind} credit granted", back

    return _action(
        request,
        form=bo_forms.CreditGrantForm(_form_data(request)),
        title=f"Grant credit to {org.name}",
        back_url=back,
        perform=perform,
    )


# --- Invoices --------------------------------------------------------------------------------

INVOICE_ACTIONS: dict[str, tuple[str, type[bo_forms.ActionForm]]] = {
    "finalize": ("Finalize", bo_forms.FinalizeForm),
    "mark-paid": ("Mark paid (bank transfer)", bo_forms.MarkPaidForm),
    "void": ("Void", bo_forms.VoidForm),
    "credit-note": ("Issue a credit note", bo_forms.CreditNoteForm),
}
# Which actions an invoice's state allows (the services refuse the others anyway).
ALLOWED: dict[str, tuple[str, ...]] = {
    Invoice.Status.DRAFT: ("finalize",),
    Invoice.Status.FINALIZED: ("mark-paid", "void", "credit-note"),
    Invoice.Status.PAID: ("credit-note",),
    Invoice.Status.VOID: (),
}


def invoice(request: HttpRequest, invoice_id: str) -> HttpResponse:
    _require(request, "billing.view_invoice")
    inv = _invoice_or_404(invoice_id)
    can = request.user.has_perm(roles.MOVE_MONEY)
    return TemplateResponse(
        request,
        "backoffice/invoice.html",
        _context(
            request,
            f"Invoice {inv.number or inv.id}",
            subtitle=f"{inv.organization.name}, {inv.period_start:%Y-%m}",
            inv=inv,
            lines=list(inv.lines.order_by("position")),
            tax_lines=list(inv.tax_lines.order_by("position")),
            held=list(
                inv.held_usage.select_related("invoice").order_by("model_name", "token_kind")
            ),
            notes=list(inv.credit_notes.order_by("created_at")),
            credited=credited_amount(inv),
            actions=[(a, INVOICE_ACTIONS[a][0]) for a in ALLOWED[inv.status]] if can else [],
        ),
    )


def invoice_pdf(request: HttpRequest, invoice_id: str) -> HttpResponse:
    """The invoice as the customer downloads it (staff who may view invoices)."""
    _require(request, "billing.view_invoice")
    return invoice_pdf_response(_invoice_or_404(invoice_id))


def invoice_action(request: HttpRequest, invoice_id: str, action: str) -> HttpResponse:
    _require(request, roles.MOVE_MONEY)
    if action not in INVOICE_ACTIONS:
        raise Http404(f"no invoice action {action!r}")
    inv = _invoice_or_404(invoice_id)
    label, form_class = INVOICE_ACTIONS[action]
    back = reverse("admin:backoffice-invoice", args=[inv.id])
    principal = _principal(request)

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        if action == "credit-note":
            note = credit_note_issue(
                principal=principal,
                invoice=inv,
                amount=data["amount"],
                reason=data["reason"],
                idempotency_key=data["form_token"],
            )
            return f"credit note {note.number} issued: {note.amount} {note.currency}", back
        if action == "finalize":
            outcome = backoffice_invoice_finalize(
                principal=principal, invoice=inv, reason=data["reason"]
            )
        elif action == "mark-paid":
            outcome = backoffice_invoice_mark_paid(
                principal=principal,
                invoice=inv,
                payment_reference=data["payment_reference"],
                reason=data["reason"],
            )
        else:
            outcome = backoffice_invoice_void(
                principal=principal, invoice=inv, reason=data["reason"]
            )
        return outcome.message, back

    extra: dict[str, Any] = {"inv": inv}
    if action == "credit-note":
        extra["hint"] = f"At most {creditable_amount(inv)} {inv.currency} can still be credited."
    return _action(
        request,
        form=form_class(_form_data(request)),
        title=f"{label}: invoice {inv.number or inv.id}",
        back_url=back,
        perform=perform,
        context=extra,
    )


# --- Prices ------------------------------------------------------------------------------------


def price_new(request: HttpRequest) -> HttpResponse:
    _require(request, roles.MOVE_MONEY)
    back = reverse("admin:billing_price_changelist")
    names = list(Model.objects.order_by("name").values_list("name", flat=True))

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        row = pricing.price_set(
            principal=_principal(request),
            model_name=data["model_name"],
            token_kind=data["token_kind"],
            unit_price=data["unit_price"],
            effective_from=data["effective_from"],
            reason=data["reason"],
        )
        return (
            f"{row.model_name} {row.token_kind}: {row.unit_price}/M from "
            f"{row.effective_from:%Y-%m-%d %H:%M} UTC",
            back + f"?model_name={row.model_name}",
        )

    return _action(
        request,
        form=bo_forms.PriceForm(_form_data(request), model_names=names),
        title="New list price",
        back_url=back,
        perform=perform,
        context={"hint": "A change never re-rates past hours, so finalized invoices never change."},
    )


def tier_multiplier_new(request: HttpRequest) -> HttpResponse:
    _require(request, roles.MOVE_MONEY)
    back = reverse("admin:billing_tiermultiplier_changelist")
    names = list(Model.objects.order_by("name").values_list("name", flat=True))

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        row = pricing.tier_multiplier_set(
            principal=_principal(request),
            service_tier=data["service_tier"],
            model_name=data["model_name"],
            multiplier=data["multiplier"],
            effective_from=data["effective_from"],
            reason=data["reason"],
        )
        return (
            f"{row.model_name or 'every model'} {row.service_tier}: x{row.multiplier} from "
            f"{row.effective_from:%Y-%m-%d %H:%M} UTC",
            back,
        )

    return _action(
        request,
        form=bo_forms.TierMultiplierForm(_form_data(request), model_names=names),
        title="New service tier multiplier",
        back_url=back,
        perform=perform,
        context={
            "hint": "Priority and flex usage is billed at the online price times this "
            "multiplier (a model's own row, else every model's, else priority 2, flex 0.5). "
            "A change never re-rates past hours."
        },
    )


def override_new(request: HttpRequest, org_id: str) -> HttpResponse:
    _require(request, roles.MOVE_MONEY)
    org = _org_or_404(org_id)
    back = reverse("admin:backoffice-customer", args=[org.id])

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        row = pricing.price_override_create(
            principal=_principal(request),
            org=org,
            kind=data["kind"],
            effective_from=data["effective_from"],
            effective_until=data["effective_until"],
            reason=data["reason"],
            model_name=data["model_name"],
            token_kind=data["token_kind"],
            unit_price=data["unit_price"] or None,
            discount_percent=data["discount_percent"] or None,
            threshold=data["threshold"] or None,
        )
        return f"{row.kind} override created for {org.name}", back

    return _action(
        request,
        form=bo_forms.OverrideForm(_form_data(request)),
        title=f"New contract terms for {org.name}",
        back_url=back,
        perform=perform,
    )


def override_end(request: HttpRequest, override_id: int) -> HttpResponse:
    _require(request, roles.MOVE_MONEY)
    row = PriceOverride.objects.select_related("organization").filter(id=override_id).first()
    if row is None:
        raise Http404(f"override {override_id} not found")
    back = reverse("admin:backoffice-customer", args=[row.organization_id])

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        pricing.price_override_end(
            principal=_principal(request), override=row, at=data["at"], reason=data["reason"]
        )
        return f"override ends at {data['at']:%Y-%m-%d %H:%M} UTC", back

    return _action(
        request,
        form=bo_forms.OverrideEndForm(_form_data(request)),
        title=f"End {row.kind} override of {row.organization.name}",
        back_url=back,
        perform=perform,
    )


# --- Provisioned throughput ---------------------------------------------------------------------


def commitment_new(request: HttpRequest, org_id: str) -> HttpResponse:
    _require(request, roles.MOVE_MONEY)
    org = _org_or_404(org_id)
    back = reverse("admin:backoffice-customer", args=[org.id])
    endpoints = [
        (e.id, f"{e.name} ({e.model_version.model.name}, pool {e.pool.name})")
        for e in Endpoint.objects.filter(Q(organization=org) | Q(organization__isnull=True))
        .select_related("model_version__model", "pool")
        .order_by("name")
    ]

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        row = provisioned.commitment_create(
            principal=_principal(request),
            org=org,
            endpoint_id=data["endpoint_id"],
            units=data["units"],
            unit_hour_price=data["unit_hour_price"],
            overflow=data["overflow"],
            tokens_per_minute_per_unit=data.get("tokens_per_minute_per_unit"),
            starts_at=data["starts_at"],
            ends_at=data.get("ends_at"),
            reason=data["reason"],
        )
        return f"{row.units} units of {row.endpoint_id} from {row.starts_at:%Y-%m-%d %H:%M}", back

    return _action(
        request,
        form=bo_forms.CommitmentForm(_form_data(request), endpoints=endpoints),
        title=f"Sell provisioned throughput to {org.name}",
        back_url=back,
        perform=perform,
        context={
            "hint": "Billed per unit-hour whether used or not. A unit is one request in "
            "flight reserved on the endpoint's pool, ahead of every pay-as-you-go tier."
        },
    )


def _commitment_or_404(commitment_id: int) -> ProvisionedCommitment:
    row = (
        ProvisionedCommitment.objects.select_related("organization")
        .filter(id=commitment_id)
        .first()
    )
    if row is None:
        raise Http404(f"commitment {commitment_id} not found")
    return row


def commitment_change(request: HttpRequest, commitment_id: int) -> HttpResponse:
    _require(request, roles.MOVE_MONEY)
    row = _commitment_or_404(commitment_id)
    back = reverse("admin:backoffice-customer", args=[row.organization_id])

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        new = provisioned.commitment_change(
            principal=_principal(request),
            commitment=row,
            at=data["at"],
            reason=data["reason"],
            units=data.get("units"),
            unit_hour_price=data.get("unit_hour_price") or None,
            overflow=data.get("overflow") or None,
        )
        return f"{new.units} units from {new.starts_at:%Y-%m-%d %H:%M} UTC", back

    return _action(
        request,
        form=bo_forms.CommitmentChangeForm(_form_data(request)),
        title=f"Change {row.units} units of {row.endpoint_id} ({row.organization.name})",
        back_url=back,
        perform=perform,
    )


def commitment_end(request: HttpRequest, commitment_id: int) -> HttpResponse:
    _require(request, roles.MOVE_MONEY)
    row = _commitment_or_404(commitment_id)
    back = reverse("admin:backoffice-customer", args=[row.organization_id])

    def perform(data: Mapping[str, Any]) -> tuple[str, str]:
        ended = provisioned.commitment_end(
            principal=_principal(request), commitment=row, at=data["at"], reason=data["reason"]
        )
        assert ended.ends_at is not None
        return f"the commitment ends at {ended.ends_at:%Y-%m-%d %H:%M} UTC", back

    return _action(
        request,
        form=bo_forms.OverrideEndForm(_form_data(request)),
        title=f"End {row.units} units of {row.endpoint_id} ({row.organization.name})",
        back_url=back,
        perform=perform,
    )


# --- Usage explorer ------------------------------------------------------------------------------


class UsageFilterForm(forms.Form):
    """Only for rendering the filter inputs; usage_filter_parse validates."""

    org = forms.CharField(required=False, label="Organization id")
    project = forms.CharField(required=False, label="Project id")
    key = forms.CharField(required=False, label="API key id")
    endpoint = forms.CharField(required=False, label="Endpoint id")
    model = forms.CharField(required=False, label="Model")
    start = forms.CharField(required=False, label="From (UTC)", widget=bo_forms.DateTimeInput())
    end = forms.CharField(required=False, label="Until (UTC)", widget=bo_forms.DateTimeInput())


def usage(request: HttpRequest) -> HttpResponse:
    _require(request, "billing.view_usagerollup")
    try:
        f: selectors.UsageFilter | None = selectors.usage_filter_parse(request.GET)
    except DomainError as exc:
        error: DomainError | None = exc
        f = None
    else:
        error = None
    shown = f.as_params() if f is not None else dict(request.GET.items())
    return TemplateResponse(
        request,
        "backoffice/usage.html",
        _context(
            request,
            "Usage explorer",
            filter_form=UsageFilterForm(initial=shown),
            filter=f,
            error=error,
            totals=selectors.usage_totals(f) if f is not None else None,
            recent=selectors.usage_recent(f) if f is not None else [],
            csv_query=urlencode(shown),
        ),
        status=400 if error else 200,
    )


def usage_csv(request: HttpRequest) -> HttpResponseBase:
    """The filtered rollups as CSV, streamed; under ASGI through an async iterator."""
    _require(request, "billing.view_usagerollup")
    try:
        f = selectors.usage_filter_parse(request.GET)
    except DomainError as exc:
        return HttpResponse(
            f"{exc.param}: {exc.message}\n", status=exc.status, content_type="text/plain"
        )
    content = (
        selectors.usage_csv_async(f) if isinstance(request, ASGIRequest) else selectors.usage_csv(f)
    )
    response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
    name = f"usage-{f.start:%Y%m%dT%H%M}-{f.end:%Y%m%dT%H%M}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


# --- Margin ------------------------------------------------------------------------------------


class MarginFilterForm(forms.Form):
    """Only for rendering the filter inputs; usage_filter_parse validates."""

    org = forms.CharField(required=False, label="Organization id")
    model = forms.CharField(required=False, label="Model")
    start = forms.CharField(required=False, label="From (UTC)", widget=bo_forms.DateTimeInput())
    end = forms.CharField(required=False, label="Until (UTC)", widget=bo_forms.DateTimeInput())


def _margin_filter(request: HttpRequest) -> selectors.UsageFilter:
    """The margin page's period (this month so far by default), organization and model."""
    return selectors.usage_filter_parse(
        {name: request.GET.get(name, "") for name in MarginFilterForm.base_fields}
    )


def margin(request: HttpRequest) -> HttpResponse:
    """Revenue, cost of goods and margin per model and per organization."""
    _require(request, roles.VIEW_REVENUE)
    try:
        f: selectors.UsageFilter | None = _margin_filter(request)
    except DomainError as exc:
        error: DomainError | None = exc
        f = None
    else:
        error = None
    shown = (
        f.as_params()
        if f is not None
        else {k: v for k, v in request.GET.items() if k in MarginFilterForm.base_fields}
    )
    return TemplateResponse(
        request,
        "backoffice/margin.html",
        _context(
            request,
            "Margin",
            filter_form=MarginFilterForm(initial=shown),
            filter=f,
            error=error,
            margin=selectors.margin(f) if f is not None else None,
            csv_query=urlencode(shown),
        ),
        status=400 if error else 200,
    )


def margin_csv(request: HttpRequest) -> HttpResponse:
    """The margin per (organization, model) as CSV: at most one row per pair, so whole."""
    _require(request, roles.VIEW_REVENUE)
    try:
        f = _margin_filter(request)
    except DomainError as exc:
        return HttpResponse(
            f"{exc.param}: {exc.message}\n", status=exc.status, content_type="text/plain"
        )
    response = HttpResponse(
        selectors.margin_csv(selectors.margin(f)), content_type="text/csv; charset=utf-8"
    )
    name = f"margin-{f.start:%Y%m%dT%H%M}-{f.end:%Y%m%dT%H%M}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


# --- Dashboard -----------------------------------------------------------------------------


def _money(value: Decimal) -> float:
    # Chart.js plots numbers; the cents shown are rounded for display only.
    return float(round(value, 2))


def dashboard_context(request: HttpRequest) -> dict[str, Any]:
    """Context for the admin index: the charts, for staff who may see usage."""
    if not request.user.has_perm("billing.view_usagerollup"):
        return {"dashboard": None}
    d = selectors.dashboard()
    charts = {
        "days": [p.day.isoformat() for p in d.days],
        # Input split into what the prefix cache served and the rest, so the bars still
        # stack up to every token.
        "input": [p.input_tokens - p.cached_input_tokens for p in d.days],
        "cached_input": [p.cached_input_tokens for p in d.days],
        "output": [p.output_tokens for p in d.days],
        "revenue": [_money(p.revenue) for p in d.days],
        "models": [m.model_name for m in d.models],
        "model_tokens": [m.input_tokens + m.output_tokens for m in d.models],
        "model_revenue": [_money(m.revenue) for m in d.models],
        "customers": [c.name for c in d.top_customers],
        "customer_revenue": [_money(c.revenue) for c in d.top_customers],
        "lag_times": [
            datetime.fromtimestamp(ts, tz=UTC).strftime("%H:%M") for ts, _ in d.drain_lag_history
        ],
        "lag_values": [lag for _, lag in d.drain_lag_history],
    }
    return {
        "dashboard": d,
        "charts": charts,
        "generated_at": timezone.now(),
        "total_revenue": sum((p.revenue for p in d.days), Decimal(0)),
        "total_tokens": sum(p.input_tokens + p.output_tokens for p in d.days),
    }
