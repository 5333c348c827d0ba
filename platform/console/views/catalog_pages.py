"""The model catalog, endpoints (create, limits, pause, delete) and compile jobs."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from accounts.permissions import Perm
from catalog import compile as catalog_compile
from catalog import selectors as catalog_selectors
from catalog import services as catalog_services
from catalog.models import Endpoint
from console import selectors as console_selectors
from console.access import OrgContext, is_htmx, org_page, page
from console.forms import EndpointForm, EndpointLimitsForm, add_domain_error
from core.errors import DomainError


def _endpoints_url(ctx: OrgContext) -> str:
    return reverse("console-endpoints", kwargs={"org_id": ctx.org.id})


def _endpoint_url(ctx: OrgContext, endpoint_id: str) -> str:
    return reverse("console-endpoint", kwargs={"org_id": ctx.org.id, "endpoint_id": endpoint_id})


@org_page(Perm.ENDPOINTS_VIEW)
def models(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    return page(
        request,
        ctx,
        "console/catalog/models.html",
        {"entries": console_selectors.model_catalog(ctx.org)},
    )


def _endpoint_form(ctx: OrgContext, data: Any = None) -> EndpointForm:
    return EndpointForm(
        data,
        versions=console_selectors.servable_versions(ctx.org),
        pools=[p.name for p in catalog_selectors.pools_for(ctx.org)],
    )


@org_page(Perm.ENDPOINTS_VIEW)
def endpoints(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """GET: the organization's and the public endpoints, compile jobs; POST: creates one."""
    form = _endpoint_form(ctx, request.POST or None)
    status = 200
    if request.method == "POST":
        ctx.require(Perm.ENDPOINTS_MANAGE)
        if form.is_valid():
            data = form.cleaned_data
            try:
                endpoint = catalog_services.endpoint_create(
                    principal=ctx.principal,
                    org=ctx.org,
                    name=data["name"],
                    model_version_id=data["model_version"],
                    pool=data["pool"],
                    rpm_limit=data["rpm_limit"],
                    tpm_limit=data["tpm_limit"],
                )
            except DomainError as exc:
                if exc.status == 404:
                    raise
                add_domain_error(form, exc)
                status = exc.status
            else:
                messages.success(request, f"Endpoint {endpoint.name} ({endpoint.id}) created.")
                return HttpResponseRedirect(_endpoint_url(ctx, endpoint.id))
        else:
            status = 400
    rows = console_selectors.endpoint_rows(ctx.org)
    return page(
        request,
        ctx,
        "console/catalog/endpoints.html",
        {
            "own": [r for r in rows if not r.public],
            "public": [r for r in rows if r.public],
            "form": form,
            "jobs": list(catalog_compile.compile_jobs_for(ctx.org)[:20]),
        },
        status=status,
    )


@org_page(Perm.ENDPOINTS_VIEW)
def endpoint_detail(request: HttpRequest, ctx: OrgContext, endpoint_id: str) -> HttpResponse:
    endpoint = console_selectors.endpoint_visible_get(ctx.org, endpoint_id)
    if endpoint is None:
        raise Http404(f"endpoint {endpoint_id!r} not found")
    row = next(r for r in console_selectors.endpoint_rows(ctx.org) if r.endpoint.id == endpoint.id)
    own = endpoint.organization_id == ctx.org.id
    return page(
        request,
        ctx,
        "console/catalog/endpoint.html",
        {
            "row": row,
            "e": endpoint,
            "own": own,
            "revisions": list(catalog_selectors.endpoint_revisions(endpoint)[:20]) if own else [],
            "limits_form": EndpointLimitsForm(
                initial={"rpm_limit": endpoint.rpm_limit, "tpm_limit": endpoint.tpm_limit}
            ),
            "base_url": f"{request.scheme}://{request.get_host()}/v1",
        },
    )


def _own_endpoint(ctx: OrgContext, endpoint_id: str) -> Endpoint:
    # The catalog's lookup: another organization's (or a public) endpoint is NotFound.
    return catalog_selectors.endpoint_get(ctx.org, endpoint_id)


@require_POST
@org_page(Perm.ENDPOINTS_MANAGE)
def endpoint_status(request: HttpRequest, ctx: OrgContext, endpoint_id: str) -> HttpResponse:
    endpoint = _own_endpoint(ctx, endpoint_id)
    try:
        endpoint = catalog_services.endpoint_set_status(
            principal=ctx.principal, endpoint=endpoint, status=request.POST.get("status", "")
        )
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Endpoint {endpoint.name} is {endpoint.status}.")
    return HttpResponseRedirect(_endpoint_url(ctx, endpoint.id))


@require_POST
@org_page(Perm.ENDPOINTS_MANAGE)
def endpoint_limits(request: HttpRequest, ctx: OrgContext, endpoint_id: str) -> HttpResponse:
    endpoint = _own_endpoint(ctx, endpoint_id)
    form = EndpointLimitsForm(request.POST)
    if not form.is_valid():
        field, errors = next(iter(form.errors.items()))
        messages.error(request, f"{form.fields[field].label}: {' '.join(str(e) for e in errors)}")
    else:
        catalog_services.endpoint_update(
            principal=ctx.principal,
            endpoint=endpoint,
            rpm_limit=form.cleaned_data["rpm_limit"],
            tpm_limit=form.cleaned_data["tpm_limit"],
        )
        messages.success(request, "Limits saved; every gateway applies them at once.")
    return HttpResponseRedirect(_endpoint_url(ctx, endpoint.id))


@org_page(Perm.ENDPOINTS_MANAGE)
def endpoint_delete(request: HttpRequest, ctx: OrgContext, endpoint_id: str) -> HttpResponse:
    """GET: the confirmation page; POST: deletes."""
    endpoint = _own_endpoint(ctx, endpoint_id)
    if request.method != "POST":
        return page(request, ctx, "console/catalog/endpoint_delete.html", {"e": endpoint})
    name = endpoint.name
    catalog_services.endpoint_delete(principal=ctx.principal, endpoint=endpoint)
    messages.success(request, f"Endpoint {name} deleted.")
    return HttpResponseRedirect(_endpoints_url(ctx))


@org_page(Perm.ENDPOINTS_VIEW)
def compile_job(request: HttpRequest, ctx: OrgContext, job_id: str) -> HttpResponse:
    job = catalog_compile.compile_job_get(ctx.org, job_id)
    template = (
        "console/catalog/_compile_job.html" if is_htmx(request) else "console/catalog/job.html"
    )
    return page(request, ctx, template, {"job": job})
