"""The playground: chat with any endpoint, tokens streamed from the real /v1 gateway."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_POST

from accounts import selectors
from accounts.permissions import Perm
from catalog.models import Model
from console import selectors as console_selectors
from console import services
from console.access import OrgContext, org_page, page


@org_page(Perm.ENDPOINTS_VIEW)
def playground(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    rows = [
        r
        for r in console_selectors.endpoint_rows(ctx.org, kinds=(Model.Kind.CHAT,))
        if r.endpoint.status == r.endpoint.Status.ACTIVE
    ]
    wanted = request.GET.get("endpoint", "")
    selected = next((r for r in rows if r.endpoint.id == wanted), rows[0] if rows else None)
    projects = list(selectors.projects(ctx.org))
    return page(
        request,
        ctx,
        "console/playground/page.html",
        {
            "rows": rows,
            "selected": selected,
            "projects": projects,
            "base_url": f"{request.scheme}://{request.get_host()}/v1",
        },
    )


@require_POST
@org_page(Perm.KEYS_CREATE)
def playground_key(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """The browser's short-lived inference key (POST with the CSRF token; never cached)."""
    project_id = request.POST.get("project", "")
    project = (
        selectors.project_get(ctx.org, project_id)
        if project_id
        else selectors.projects(ctx.org).get(is_default=True)
    )
    key = services.playground_key(
        principal=ctx.principal, org=ctx.org, project=project, session=request.session
    )
    response = JsonResponse(
        {
            "key_id": key.key_id,
            "secret": key.secret,
            "project_id": key.project_id,
            "expires_at": key.expires_at.isoformat(),
        }
    )
    response["Cache-Control"] = "no-store"
    return response
