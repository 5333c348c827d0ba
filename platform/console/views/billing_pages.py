"""Billing: balance and month spend, budgets and alerts, invoices, payment methods, credits."""

from __future__ import annotations

import logging

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from accounts import selectors as account_selectors
from accounts.permissions import Perm
from billing import budgets as billing_budgets
from billing import selectors as billing_selectors
from billing import tax as billing_tax
from billing.credits import credit_entries, grants_with_remainder
from billing.invoice_pdf import (
    InvoicePdfThrottled,
    invoice_pdf_budget_take,
    invoice_pdf_response,
)
from billing.payments import stripe_sync
from billing.periods import month_start
from console.access import OrgContext, org_page, page, render_error
from console.forms import BillingDetailsForm, BudgetForm, add_domain_error
from core.errors import DomainError

logger = logging.getLogger(__name__)


def _billing_url(ctx: OrgContext) -> str:
    return reverse("console-billing", kwargs={"org_id": ctx.org.id})


def _budget_rows(ctx: OrgContext) -> list[dict[str, object]]:
    month = month_start(timezone.now())
    names = dict(account_selectors.projects(ctx.org).values_list("id", "name"))
    rows = []
    for b in billing_budgets.budgets(ctx.org).select_related("organization"):
        spend = billing_budgets.budget_spend(b, month)
        rows.append(
            {
                "budget": b,
                "scope": names.get(b.project_id, b.project_id) if b.project_id else "Organization",
                "spend": spend,
                "percent": int(spend * 100 / b.monthly_amount) if b.monthly_amount else 0,
            }
        )
    return rows


def _payment_methods(ctx: OrgContext) -> tuple[bool, list[object], str | None]:
    """(Stripe configured, saved methods, an error to show) for the billing page."""
    if stripe_sync.stripe_backend() is None:
        return False, [], None
    try:
        return True, list(stripe_sync.stripe_payment_methods(org=ctx.org)), None
    except DomainError as exc:
        logger.warning("payment methods of %s unavailable: %s", ctx.org.id, exc.message)
        return True, [], exc.message


@org_page(Perm.BILLING_VIEW)
def billing(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    return _billing_page(request, ctx)


def _billing_page(
    request: HttpRequest, ctx: OrgContext, form: BudgetForm | None = None
) -> HttpResponse:
    projects = list(account_selectors.projects(ctx.org))
    stripe_on, methods, stripe_error = _payment_methods(ctx)
    return page(
        request,
        ctx,
        "console/billing/page.html",
        {
            "balance": billing_selectors.balance_summary(ctx.org),
            "budget_rows": _budget_rows(ctx),
            "alerts": list(billing_budgets.budget_alerts(ctx.org, limit=20)),
            "invoices": list(billing_selectors.invoices(ctx.org)[:24]),
            "billing_details": billing_tax.billing_details_get(ctx.org),
            "grants": grants_with_remainder(ctx.org)[::-1],
            "ledger": list(credit_entries(ctx.org)[:50]),
            "form": form or BudgetForm(projects=projects),
            "stripe_on": stripe_on,
            "payment_methods": methods,
            "stripe_error": stripe_error,
        },
        status=400 if form is not None and form.errors else 200,
    )


@require_POST
@org_page(Perm.BILLING_MANAGE)
def budget_save(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """Sets the budget of one scope (the organization or a project), keeping the others."""
    projects = list(account_selectors.projects(ctx.org))
    form = BudgetForm(request.POST, projects=projects)
    if form.is_valid():
        data = form.cleaned_data
        project_id = data["project"] or None
        specs = [
            billing_budgets.BudgetSpec(
                project_id=b.project_id,
                monthly_amount=b.monthly_amount,
                alert_thresholds=list(b.alert_thresholds),
                hard_limit=b.hard_limit,
            )
            for b in billing_budgets.budgets(ctx.org)
            if b.project_id != project_id
        ]
        specs.append(
            billing_budgets.BudgetSpec(
                project_id=project_id,
                monthly_amount=data["monthly_amount"],
                alert_thresholds=data["alert_thresholds"],
                hard_limit=data["hard_limit"],
            )
        )
        try:
            billing_budgets.budgets_set(principal=ctx.principal, org=ctx.org, specs=specs)
        except DomainError as exc:
            # The service names budgets.<i>.<field>; the form has the same field names.
            add_domain_error(form, _own_field(exc))
        else:
            messages.success(request, "Budget saved.")
            return HttpResponseRedirect(_billing_url(ctx))
    return _billing_page(request, ctx, form)


def _own_field(exc: DomainError) -> DomainError:
    if exc.param and exc.param.startswith("budgets."):
        field = exc.param.split(".")[-1]
        exc.param = {"project_id": "project"}.get(field, field)
    return exc


@require_POST
@org_page(Perm.BILLING_MANAGE)
def budget_delete(request: HttpRequest, ctx: OrgContext, budget_id: str) -> HttpResponse:
    current = list(billing_budgets.budgets(ctx.org))
    if not any(str(b.id) == budget_id for b in current):
        raise Http404(f"budget {budget_id!r} not found")
    specs = [
        billing_budgets.BudgetSpec(
            project_id=b.project_id,
            monthly_amount=b.monthly_amount,
            alert_thresholds=list(b.alert_thresholds),
            hard_limit=b.hard_limit,
        )
        for b in current
        if str(b.id) != budget_id
    ]
    billing_budgets.budgets_set(principal=ctx.principal, org=ctx.org, specs=specs)
    messages.success(request, "Budget removed.")
    return HttpResponseRedirect(_billing_url(ctx))


@org_page(Perm.BILLING_VIEW)
def invoice(request: HttpRequest, ctx: OrgContext, invoice_id: str) -> HttpResponse:
    inv = billing_selectors.invoice_get(ctx.org, invoice_id)
    return page(
        request, ctx, "console/billing/invoice.html", {"inv": inv, "lines": list(inv.lines.all())}
    )


@org_page(Perm.BILLING_VIEW)
def invoice_print(request: HttpRequest, ctx: OrgContext, invoice_id: str) -> HttpResponse:
    inv = billing_selectors.invoice_get(ctx.org, invoice_id)
    return page(
        request,
        ctx,
        "console/billing/invoice_print.html",
        {"inv": inv, "lines": list(inv.lines.all())},
    )


@org_page(Perm.BILLING_VIEW)
def invoice_pdf(request: HttpRequest, ctx: OrgContext, invoice_id: str) -> HttpResponse:
    """The invoice as a PDF attachment (a draft with a DRAFT watermark)."""
    inv = billing_selectors.invoice_get(ctx.org, invoice_id)
    try:
        invoice_pdf_budget_take(ctx.org.id)
    except InvoicePdfThrottled as exc:
        return render_error(request, ctx, exc)
    return invoice_pdf_response(inv)


@org_page(Perm.BILLING_VIEW)
def billing_details(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """Whom invoices are made out to: shown to billing viewers, changed by billing managers
    (POST); the service checks every field and audits the change."""
    current = billing_tax.billing_details_get(ctx.org)
    if request.method == "POST":
        ctx.require(Perm.BILLING_MANAGE)
        form = BillingDetailsForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            try:
                billing_tax.billing_details_set(
                    principal=ctx.principal,
                    org=ctx.org,
                    legal_name=data["legal_name"],
                    address=data["address"],
                    country=data["country"],
                    tax_id=data["tax_id"],
                )
            except DomainError as exc:
                add_domain_error(form, exc)
            else:
                messages.success(request, "Billing details saved.")
                return HttpResponseRedirect(
                    reverse("console-billing-details", kwargs={"org_id": ctx.org.id})
                )
    else:
        initial = (
            {
                "legal_name": current.legal_name,
                "address": current.address,
                "country": current.country,
                "tax_id": current.tax_id,
            }
            if current is not None
            else {"legal_name": ctx.org.name}
        )
        form = BillingDetailsForm(initial=initial)
    return page(
        request,
        ctx,
        "console/billing/details.html",
        {"form": form, "details": current},
        status=400 if form.errors else 200,
    )


@require_POST
@org_page(Perm.BILLING_MANAGE)
def payment_method_add(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """Sends the customer to Stripe's hosted page to save a card or bank account."""
    back = request.build_absolute_uri(_billing_url(ctx))
    try:
        session = stripe_sync.stripe_checkout_setup(
            org=ctx.org, success_url=f"{back}?payment_method=saved", cancel_url=back
        )
    except DomainError as exc:
        messages.error(request, f"Stripe could not start the payment set-up: {exc.message}")
        return HttpResponseRedirect(_billing_url(ctx))
    return HttpResponseRedirect(session.url, status=303)
