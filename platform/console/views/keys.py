"""API keys: list (prefix, last used, creator), create (the secret shown once), revoke."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse

from accounts import selectors, services
from accounts.permissions import Perm, key_scopes_allowed
from console.access import OrgContext, is_htmx, org_page, page
from console.forms import ApiKeyForm, add_domain_error
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
    return page(
        request,
        ctx,
        "console/keys/list.html",
        {"keys": list(selectors.api_keys(ctx.org).select_related("project")), "form": form},
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
        return page(request, ctx, "console/keys/_row.html", {"key": key})
    messages.success(request, f"Key {key.name} ({key.prefix}…) is revoked.")
    return HttpResponseRedirect(_list_url(ctx))
