"""Alerts: billing contacts, webhook endpoints (the secret shown once), enable/disable,
delete, a test send, and each endpoint's delivery log (docs/console.md, "Webhooks")."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from accounts.permissions import Perm
from billing.alerts import webhooks
from billing.alerts.events import SUBSCRIBABLE
from billing.models import WebhookEndpoint
from console.access import OrgContext, org_page, page
from console.forms import AlertSettingsForm, WebhookEndpointForm, add_domain_error
from core.errors import DomainError


def _list_url(ctx: OrgContext) -> str:
    return reverse("console-webhooks", kwargs={"org_id": ctx.org.id})


def _list_page(
    request: HttpRequest,
    ctx: OrgContext,
    *,
    form: WebhookEndpointForm | None = None,
    settings_form: AlertSettingsForm | None = None,
    status: int = 200,
) -> HttpResponse:
    current = webhooks.alert_settings(ctx.org)
    return page(
        request,
        ctx,
        "console/billing/webhooks.html",
        {
            "endpoints": list(webhooks.endpoints_of(ctx.org)),
            "form": form or WebhookEndpointForm(kinds=SUBSCRIBABLE),
            "settings_form": settings_form
            or AlertSettingsForm(
                initial={
                    "billing_emails": ", ".join(current.billing_emails),
                    "low_balance_amount": current.low_balance_amount,
                }
            ),
        },
        status=status,
    )


@org_page(Perm.ALERTS_MANAGE)
def webhook_list(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """GET: contacts, endpoints and the add form; POST: adds one, showing its secret once."""
    if request.method != "POST":
        return _list_page(request, ctx)
    form = WebhookEndpointForm(request.POST, kinds=SUBSCRIBABLE)
    if form.is_valid():
        try:
            created = webhooks.endpoint_create(
                principal=ctx.principal,
                org=ctx.org,
                url=form.cleaned_data["url"],
                event_types=form.cleaned_data["event_types"],
                description=form.cleaned_data["description"],
            )
        except DomainError as exc:
            add_domain_error(form, exc)
            return _list_page(request, ctx, form=form, status=exc.status)
        # In the POST's own response only: once left, the secret exists only with the customer.
        response = page(
            request,
            ctx,
            "console/billing/webhook_created.html",
            {"endpoint": created.endpoint, "secret": created.secret},
            status=201,
        )
        response["Cache-Control"] = "no-store"
        return response
    return _list_page(request, ctx, form=form, status=400)


@require_POST
@org_page(Perm.ALERTS_MANAGE)
def alert_settings_save(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    form = AlertSettingsForm(request.POST)
    if form.is_valid():
        try:
            webhooks.alert_settings_set(
                principal=ctx.principal,
                org=ctx.org,
                billing_emails=form.cleaned_data["billing_emails"].split(","),
                low_balance_amount=form.cleaned_data["low_balance_amount"],
            )
        except DomainError as exc:
            add_domain_error(form, exc)
            return _list_page(request, ctx, settings_form=form, status=exc.status)
        messages.success(request, "Alert contacts saved.")
        return HttpResponseRedirect(_list_url(ctx))
    return _list_page(request, ctx, settings_form=form, status=400)


def _detail_page(
    request: HttpRequest, ctx: OrgContext, endpoint: WebhookEndpoint, *, status: int = 200
) -> HttpResponse:
    deliveries = webhooks.deliveries_page(endpoint, request.GET.get("page") or 1)
    return page(
        request,
        ctx,
        "console/billing/webhook_detail.html",
        {"endpoint": endpoint, "deliveries": deliveries},
        status=status,
    )


@org_page(Perm.ALERTS_MANAGE)
def webhook_detail(request: HttpRequest, ctx: OrgContext, endpoint_id: str) -> HttpResponse:
    return _detail_page(request, ctx, webhooks.endpoint_get(ctx.org, endpoint_id))


@require_POST
@org_page(Perm.ALERTS_MANAGE)
def webhook_toggle(request: HttpRequest, ctx: OrgContext, endpoint_id: str) -> HttpResponse:
    endpoint = webhooks.endpoint_get(ctx.org, endpoint_id)
    webhooks.endpoint_set_enabled(
        principal=ctx.principal, endpoint=endpoint, enabled=not endpoint.enabled
    )
    messages.success(request, f"Endpoint {'enabled' if endpoint.enabled else 'disabled'}.")
    return HttpResponseRedirect(_list_url(ctx))


@require_POST
@org_page(Perm.ALERTS_MANAGE)
def webhook_delete(request: HttpRequest, ctx: OrgContext, endpoint_id: str) -> HttpResponse:
    endpoint = webhooks.endpoint_get(ctx.org, endpoint_id)
    webhooks.endpoint_delete(principal=ctx.principal, endpoint=endpoint)
    messages.success(request, "Endpoint deleted.")
    return HttpResponseRedirect(_list_url(ctx))


@require_POST
@org_page(Perm.ALERTS_MANAGE)
def webhook_test(request: HttpRequest, ctx: OrgContext, endpoint_id: str) -> HttpResponse:
    endpoint = webhooks.endpoint_get(ctx.org, endpoint_id)
    try:
        event = webhooks.endpoint_test_send(principal=ctx.principal, endpoint=endpoint)
    except DomainError as exc:
        # The delivery log again, with the refusal and its status (429 past the budget).
        messages.error(request, exc.message)
        return _detail_page(request, ctx, endpoint, status=exc.status)
    messages.success(request, f"Test event {event.id} queued; its delivery appears below.")
    return HttpResponseRedirect(
        reverse("console-webhook", kwargs={"org_id": ctx.org.id, "endpoint_id": endpoint.id})
    )
