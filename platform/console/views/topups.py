"""Billing → Top up: buy prepaid credit through Stripe Checkout, the top-up history with
receipts, and the auto-recharge settings. Credit is granted by Stripe's webhook, never by
the customer's return here (docs/billing.md, "Top-ups and auto-recharge")."""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from accounts.permissions import Perm
from billing import selectors as billing_selectors
from billing.alerts.balance import spendable_balance
from billing.models import TopUp
from billing.payments import auto_recharge, topups
from billing.payments.stripe_sync import stripe_backend
from console.access import OrgContext, org_page, page
from console.forms import AutoRechargeForm, TopUpForm, add_domain_error
from core.errors import DomainError

logger = logging.getLogger(__name__)


def _topup_url(ctx: OrgContext) -> str:
    return reverse("console-topup", kwargs={"org_id": ctx.org.id})


@org_page(Perm.BILLING_VIEW)
def topup_page(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    returned = None
    session_id = request.GET.get("checkout", "")[:255]
    if session_id:
        # Back from Stripe's page: say so, but credit nothing (the webhook does).
        returned = TopUp.objects.filter(
            organization=ctx.org, stripe_checkout_session_id=session_id
        ).first()
    return _page(request, ctx, returned=returned)


def _page(
    request: HttpRequest,
    ctx: OrgContext,
    *,
    form: TopUpForm | None = None,
    auto_form: AutoRechargeForm | None = None,
    returned: TopUp | None = None,
) -> HttpResponse:
    current = auto_recharge.auto_recharge_of(ctx.org)
    if auto_form is None:
        initial = (
            {
                "enabled": current.enabled,
                "threshold": current.threshold,
                "amount": current.amount,
                "daily_cap": current.daily_cap,
            }
            if current is not None
            else {}
        )
        auto_form = AutoRechargeForm(initial=initial, prefix="auto")
    low, high = topups.topup_bounds()
    invalid = (form is not None and form.errors) or auto_form.errors
    return page(
        request,
        ctx,
        "console/billing/topup.html",
        {
            "balance": billing_selectors.balance_summary(ctx.org),
            "spendable": spendable_balance(ctx.org),
            "currency": settings.MANTLE_BILLING_CURRENCY,
            "stripe_on": stripe_backend() is not None,
            "form": form or TopUpForm(),
            "auto_form": auto_form,
            "auto": current,
            "topups": list(topups.topups(ctx.org)),
            "returned": returned,
            "low": low,
            "high": high,
        },
        status=400 if invalid else 200,
    )


@require_POST
@org_page(Perm.BILLING_MANAGE)
def topup_start(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """Creates the top-up and its Checkout session, and sends the browser to Stripe."""
    form = TopUpForm(request.POST)
    if not form.is_valid():
        return _page(request, ctx, form=form)
    back = request.build_absolute_uri(_topup_url(ctx))
    try:
        _, url = topups.topup_checkout_start(
            principal=ctx.principal,
            org=ctx.org,
            amount=form.cleaned_data["amount"],
            # Stripe fills in {CHECKOUT_SESSION_ID} when it sends the customer back.
            success_url=f"{back}?checkout={{CHECKOUT_SESSION_ID}}",
            cancel_url=back,
        )
    except DomainError as exc:
        add_domain_error(form, exc)
        return _page(request, ctx, form=form)
    return HttpResponseRedirect(url, status=303)


@require_POST
@org_page(Perm.BILLING_MANAGE)
def auto_recharge_save(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    form = AutoRechargeForm(request.POST, prefix="auto")
    if form.is_valid():
        data = form.cleaned_data
        try:
            auto_recharge.auto_recharge_set(
                principal=ctx.principal,
                org=ctx.org,
                spec=auto_recharge.AutoRechargeSpec(
                    enabled=data["enabled"],
                    threshold=data["threshold"],
                    amount=data["amount"],
                    daily_cap=data["daily_cap"],
                ),
            )
        except DomainError as exc:
            add_domain_error(form, exc)
        else:
            messages.success(request, "Auto-recharge saved.")
            return HttpResponseRedirect(_topup_url(ctx))
    return _page(request, ctx, auto_form=form)
