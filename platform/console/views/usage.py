"""Usage: tokens and cost per day, model, key or project over a range; charts, table, CSV."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from accounts import selectors
from accounts.permissions import Perm
from billing.provisioned import utilization
from console import selectors as console_selectors
from console.access import OrgContext, is_htmx, org_page, page
from console.forms import UsageForm
from core.errors import InvalidInput


def _report(ctx: OrgContext, form: UsageForm) -> console_selectors.UsageReport:
    if not form.is_valid():
        field, errors = next(iter(form.errors.items()))
        raise InvalidInput(f"{field}: {' '.join(str(e) for e in errors)}", param=field)
    data = form.cleaned_data
    start, end = console_selectors.usage_range(data["start"], data["end"])
    project_id = data["project"] or None
    if project_id:
        selectors.project_get(ctx.org, project_id)  # another organization's: 404
    return console_selectors.usage_report(
        ctx.org,
        start=start,
        end=end,
        dimension=data["group"] or "day",
        project_id=project_id,
    )


@org_page(Perm.USAGE_VIEW)
def usage(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    form = UsageForm(request.GET, projects=selectors.projects(ctx.org))
    template = "console/usage/_report.html" if is_htmx(request) else "console/usage/page.html"
    try:
        report = _report(ctx, form)
    except InvalidInput as exc:
        return page(request, ctx, template, {"form": form, "error": exc.message}, status=400)
    # The date inputs show the range the report covers, also when it was the default.
    shown = request.GET.copy()
    shown["start"], shown["end"] = report.start.isoformat(), report.end.isoformat()
    form = UsageForm(shown, projects=selectors.projects(ctx.org))
    query = shown.urlencode()
    return page(
        request,
        ctx,
        template,
        {
            "form": form,
            "report": report,
            "chart": report.chart_data(),
            "query": query,
            # Provisioned throughput in effect: its units' use now and lately.
            "provisioned": utilization(ctx.org),
        },
    )


@org_page(Perm.USAGE_VIEW)
def usage_csv(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    form = UsageForm(request.GET, projects=selectors.projects(ctx.org))
    try:
        report = _report(ctx, form)
    except InvalidInput as exc:
        return HttpResponse(exc.message, status=400, content_type="text/plain")
    response = HttpResponse(console_selectors.usage_csv(report), content_type="text/csv")
    name = f"usage-{ctx.org.id}-{report.start}-{report.end}-by-{report.dimension}.csv"
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
