"""The organization's audit log: the API's filters and cursor paging, and its CSV."""

from __future__ import annotations

from urllib.parse import urlencode

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import reverse

from accounts import audit_log
from accounts.permissions import Perm
from console.access import OrgContext, org_page, page, render_error
from console.forms import AuditFilterForm, add_domain_error
from core.errors import InvalidInput

PAGE_SIZE = 50


def _params(request: HttpRequest) -> dict[str, str]:
    return {name: request.GET.get(name, "") for name in request.GET}


@org_page(Perm.AUDIT_VIEW)
def audit(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    form = AuditFilterForm(request.GET or None)
    params = {**_params(request), "limit": str(PAGE_SIZE)}
    try:
        query = audit_log.parse_query(params)
    except InvalidInput as exc:
        if form.is_bound:
            form.is_valid()
            add_domain_error(form, exc)
        return page(
            request,
            ctx,
            "console/org/audit.html",
            {"form": form, "entries": None},
            status=exc.status,
        )
    result = audit_log.audit_page(ctx.org, query)
    filters = query.params()
    base = reverse("console-audit", kwargs={"org_id": ctx.org.id})
    next_url = (
        f"{base}?{urlencode({**filters, 'cursor': result.next_cursor})}"
        if result.next_cursor
        else None
    )
    csv_url = reverse("console-audit-csv", kwargs={"org_id": ctx.org.id})
    return page(
        request,
        ctx,
        "console/org/audit.html",
        {
            "form": form,
            "entries": result.entries,
            "next_url": next_url,
            "first_url": f"{base}?{urlencode(filters)}" if query.after else None,
            "csv_url": f"{csv_url}?{urlencode(filters)}" if filters else csv_url,
        },
    )


@org_page(Perm.AUDIT_VIEW)
def audit_csv(request: HttpRequest, ctx: OrgContext) -> HttpResponse | StreamingHttpResponse:
    params = {k: v for k, v in _params(request).items() if k not in {"cursor", "limit"}}
    try:
        query = audit_log.parse_query(params)
    except InvalidInput as exc:
        return render_error(request, ctx, exc)
    return audit_log.audit_csv_response(ctx.org, query)
