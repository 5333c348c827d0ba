"""API keys: list (prefix, last used, creator, this month's spend against the key's budget),
create (the secret shown once), revoke, and each key's controls (budget, allowed models)."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse

from accounts import selectors, services
from accounts.permissions import Perm, key_scopes_allowed
from billing import key_budgets
from console.access import OrgContext, is_htmx, org_page, page
from console.forms import ApiKeyForm, KeyControlsForm, add_domain_error
from core.errors import DomainError


def _list_url(ctx: OrgContext) -> str:
    return reverse("console-keys", kwargs={"org_id": ctx.org.id})


@org_page(Perm.KEYS_VIEW)
def keys(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """GET: the list and the creation form; POST: creates, and shows the secret once."""
    projects = list(selectors.projects(ctx.org))
    form = ApiKeyForm(request.POST or None, projects=projects, scopes=key_scopes_allowed(ctx.role))
    status = 200
    if request.method == "POST":
        ctx.require(Perm.KEYS_CREATE)
        if form.is_valid():
            try:
                expires_at = form.expires_at()
                project = selectors.project_get(ctx.org, form.cleaned_data["project"])
                key, secret = services.api_key_create(
                    principal=ctx.principal,
                    project=project,
                    name=form.cleaned_data["name"],
                    scopes=form.cleaned_data["scopes"],
                    expires_at=expires_at,
                    rpm_limit=form.cleaned_data["rpm_limit"],
                    tpm_limit=form.cleaned_data["tpm_limit"],
                )
            except forms.ValidationError as exc:
                form.add_error("expires_on", exc)
                status = 400
            except DomainError as exc:
                add_domain_error(form, exc)
                status = exc.status
            else:
                # Rendered in the POST's own response, never behind a GET-able URL: once
                # this page is left, the secret exists nowhere but with the customer.
                response = page(
                    request,
                    ctx,
                    "console/keys/created.html",
                    {"key": key, "secret": secret, "project": project},
                    status=201,
                )
                response["Cache-Control"] = "no-store"
                return response
        else:
            status = 400
    listed = list(selectors.api_keys(ctx.org).select_related("project"))
    spend = key_budgets.key_month_spend(ctx.org, [k.id for k in listed])
    for key in listed:
        key.month_spend = spend[key.id]  # type: ignore[attr-defined]
    return page(
        request,
        ctx,
        "console/keys/list.html",
        {"keys": listed, "form": form, "currency": settings.MANTLE_BILLING_CURRENCY},
        status=status,
    )


@org_page(Perm.KEYS_VIEW)
def key_controls(request: HttpRequest, ctx: OrgContext, key_id: str) -> HttpResponse:
    """GET: the key's budget, mode and allowed models, with this month's spend; POST sets
    them (keys.create; a budget or mode changed needs billing.manage too)."""
    key = selectors.api_key_get(ctx.org, key_id)
    initial = {
        "monthly_budget": key.monthly_budget,
        "budget_mode": key.budget_mode,
        "allowed_models": "\n".join(key.allowed_models or ()),
    }
    form = KeyControlsForm(request.POST or None, initial=initial)
    status = 200
    if request.method == "POST":
        ctx.require(Perm.KEYS_CREATE)
        if form.is_valid():
            budget = form.cleaned_data["monthly_budget"]
            mode = form.cleaned_data["budget_mode"]
            if budget != key.monthly_budget or (
                key.monthly_budget is not None and mode != key.budget_mode
            ):
                ctx.require(Perm.BILLING_MANAGE)
            try:
                key_budgets.key_controls_set(
                    principal=ctx.principal,
                    key=key,
                    monthly_budget=budget,
                    budget_mode=mode,
                    allowed_models=form.models(),
                )
            except DomainError as exc:
                add_domain_error(form, exc)
                status = exc.status
            else:
                messages.success(request, f"Controls of {key.name} ({key.prefix}…) saved.")
                return HttpResponseRedirect(_list_url(ctx))
        else:
            status = 400
    spend = key_budgets.key_month_spend(ctx.org, [key.id])[key.id]
    return page(
        request,
        ctx,
        "console/keys/controls.html",
        {
            "key": key,
            "form": form,
            "month_spend": spend,
            "currency": settings.MANTLE_BILLING_CURRENCY,
        },
        status=status,
    )


@org_page(Perm.KEYS_REVOKE)
def key_revoke(request: HttpRequest, ctx: OrgContext, key_id: str) -> HttpResponse:
    """GET: the confirmation page (without JS); POST: revokes at once."""
    key = selectors.api_key_get(ctx.org, key_id)
    if request.method != "POST":
        return page(request, ctx, "console/keys/revoke.html", {"key": key})
    key = services.api_key_revoke(principal=ctx.principal, key=key)
    if is_htmx(request):
        return page(
            request,
            ctx,
            "console/keys/_row.html",
            {"key": key, "currency": settings.MANTLE_BILLING_CURRENCY},
        )
    messages.success(request, f"Key {key.name} ({key.prefix}…) is revoked.")
    return HttpResponseRedirect(_list_url(ctx))
