"""Organizations (switcher, creation), the quick start, the team and projects."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from accounts import selectors, services
from accounts.permissions import Perm, Role
from catalog.models import Model
from console import selectors as console_selectors
from console.access import (
    SESSION_ORG,
    OrgContext,
    console_principal,
    is_htmx,
    org_page,
    page,
    render_error,
    signed_in,
)
from console.forms import InviteForm, OrganizationForm, ProjectForm, RoleForm, add_domain_error
from core.errors import DomainError


def _org_url(name: str, org_id: str, **kwargs: str) -> str:
    return reverse(name, kwargs={"org_id": org_id, **kwargs})


@signed_in
def home(request: HttpRequest) -> HttpResponse:
    """The last organization used in this session, else the first; none: create one."""
    principal = console_principal(request)
    orgs = list(selectors.organizations_for(principal))
    if not orgs:
        return redirect("console-org-new")
    remembered = request.session.get(SESSION_ORG)
    chosen = next((o for o in orgs if o.id == remembered), orgs[0])
    return HttpResponseRedirect(_org_url("console-quickstart", chosen.id))


@signed_in
def switch(request: HttpRequest) -> HttpResponse:
    """The organization switcher's target (a plain GET form, so it works without JS)."""
    org_id = request.GET.get("org", "")
    principal = console_principal(request)
    if selectors.role_in(principal, org_id) is None:
        raise Http404("organization not found")
    # Stay on the same kind of page in the other organization when there is one.
    section = request.GET.get("section", "quickstart")
    names = {
        "quickstart",
        "team",
        "projects",
        "keys",
        "models",
        "endpoints",
        "playground",
        "usage",
        "batches",
        "billing",
        "audit",
    }
    return HttpResponseRedirect(
        _org_url(f"console-{section if section in names else 'quickstart'}", org_id)
    )


@signed_in
def organization_new(request: HttpRequest) -> HttpResponse:
    principal = console_principal(request)
    form = OrganizationForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                org = services.organization_create(
                    principal=principal,
                    name=form.cleaned_data["name"],
                    owner=request.user,  # type: ignore[arg-type]
                )
            except DomainError as exc:
                add_domain_error(form, exc)
                status = exc.status
            else:
                messages.success(request, f"Organization {org.name} created.")
                return HttpResponseRedirect(_org_url("console-quickstart", org.id))
        else:
            status = 400
    orgs = list(selectors.organizations_for(principal))
    return render(
        request,
        "console/org/new.html",
        {"form": form, "organizations": orgs},
        status=status,
    )


@org_page(Perm.ORG_VIEW)
def quickstart(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    chat = (
        Model.objects.filter(organization__isnull=True, kind=Model.Kind.CHAT)
        .order_by("name")
        .first()
    )
    keys = (
        list(selectors.api_keys(ctx.org).filter(revoked_at__isnull=True)[:5])
        if ctx.can(Perm.KEYS_VIEW)
        else []
    )
    base_url = f"{request.scheme}://{request.get_host()}/v1"
    return page(
        request,
        ctx,
        "console/org/quickstart.html",
        {
            "base_url": base_url,
            "chat_model": chat.name if chat else "smollm2-135m-instruct",
            "keys": keys,
            "requests_last_hour": console_selectors.requests_last_hour(ctx.org),
        },
    )


# --- Team ------------------------------------------------------------------------------


@org_page(Perm.MEMBERS_VIEW)
def team(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    form = InviteForm(request.POST or None)
    status = 200
    if request.method == "POST":
        ctx.require(Perm.MEMBERS_INVITE)
        if form.is_valid():
            try:
                invitation = services.member_invite(
                    principal=ctx.principal,
                    org=ctx.org,
                    email=form.cleaned_data["email"],
                    role=Role(form.cleaned_data["role"]),
                )
            except DomainError as exc:
                add_domain_error(form, exc)
                status = exc.status
            else:
                messages.success(
                    request,
                    f"{invitation.email} was invited as {invitation.role}; they join once "
                    "they accept the link in the email sent to them.",
                )
                return HttpResponseRedirect(_org_url("console-team", ctx.org.id))
        else:
            status = 400
    return page(
        request,
        ctx,
        "console/org/team.html",
        {
            "members": list(selectors.memberships(ctx.org)),
            "invitations": (
                list(selectors.invitations_open(ctx.org)) if ctx.can(Perm.MEMBERS_INVITE) else []
            ),
            "form": form,
            "roles": [r.value for r in Role],
            "me": request.user,
            "is_owner": ctx.role == Role.OWNER,
        },
        status=status,
    )


@require_POST
@org_page(Perm.ORG_UPDATE)
def organization_mfa(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """An owner turns "require MFA for owners and admins" on or off (audited)."""
    required = request.POST.get("mfa_required") == "on"
    try:
        services.organization_mfa_set(principal=ctx.principal, org=ctx.org, required=required)
    except DomainError as exc:
        return render_error(request, ctx, exc)
    messages.success(
        request,
        "Owners and admins now need an authenticator to reach this organization."
        if required
        else "Owners and admins no longer need an authenticator here.",
    )
    return HttpResponseRedirect(_org_url("console-team", ctx.org.id))


@require_POST
@org_page(Perm.MEMBERS_INVITE)
def invitation_action(
    request: HttpRequest, ctx: OrgContext, invitation_id: str, action: str
) -> HttpResponse:
    """Resend (a new link, the old one stops working) or revoke a pending invitation."""
    invitation = selectors.invitation_get(ctx.org, invitation_id)
    if action not in ("resend", "revoke"):
        raise Http404("no such action")
    try:
        if action == "resend":
            services.invitation_resend(principal=ctx.principal, invitation=invitation)
            messages.success(request, f"A new invitation link was sent to {invitation.email}.")
        else:
            services.invitation_revoke(principal=ctx.principal, invitation=invitation)
            messages.success(request, f"The invitation of {invitation.email} was revoked.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return HttpResponseRedirect(_org_url("console-team", ctx.org.id))


@require_POST
@org_page(Perm.MEMBERS_CHANGE_ROLE)
def member_role(request: HttpRequest, ctx: OrgContext, membership_id: str) -> HttpResponse:
    membership = selectors.membership_get(ctx.org, membership_id)
    form = RoleForm(request.POST)
    error = None
    status = 200
    if not form.is_valid():
        error, status = "choose one of the roles", 400
    else:
        try:
            services.member_change_role(
                principal=ctx.principal, membership=membership, role=Role(form.cleaned_data["role"])
            )
        except DomainError as exc:
            error, status = exc.message, exc.status
            membership.refresh_from_db()
    if is_htmx(request):
        return page(
            request,
            ctx,
            "console/org/_member_row.html",
            {"m": membership, "roles": [r.value for r in Role], "error": error, "me": request.user},
            status=status,
        )
    if error:
        messages.error(request, error)
    else:
        messages.success(request, f"{membership.user.email} is now {membership.role}.")
    return HttpResponseRedirect(_org_url("console-team", ctx.org.id))


@org_page(Perm.MEMBERS_REMOVE)
def member_remove(request: HttpRequest, ctx: OrgContext, membership_id: str) -> HttpResponse:
    """GET: the confirmation page (without JS); POST: removes."""
    membership = selectors.membership_get(ctx.org, membership_id)
    if request.method != "POST":
        return page(request, ctx, "console/org/member_remove.html", {"m": membership})
    email = membership.user.email
    try:
        services.member_remove(principal=ctx.principal, membership=membership)
    except DomainError as exc:
        if is_htmx(request):
            return page(
                request,
                ctx,
                "console/org/_member_row.html",
                {"m": membership, "roles": [r.value for r in Role], "error": exc.message},
                status=exc.status,
            )
        messages.error(request, exc.message)
        return HttpResponseRedirect(_org_url("console-team", ctx.org.id))
    if is_htmx(request):
        return HttpResponse("")  # the row disappears
    messages.success(request, f"{email} was removed from {ctx.org.name}.")
    return HttpResponseRedirect(_org_url("console-team", ctx.org.id))


# --- Projects ------------------------------------------------------------------------------


@org_page(Perm.PROJECTS_VIEW)
def projects(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    form = ProjectForm(request.POST or None)
    status = 200
    if request.method == "POST":
        ctx.require(Perm.PROJECTS_MANAGE)
        if form.is_valid():
            try:
                project = services.project_create(
                    principal=ctx.principal, org=ctx.org, name=form.cleaned_data["name"]
                )
            except DomainError as exc:
                add_domain_error(form, exc)
                status = exc.status
            else:
                messages.success(request, f"Project {project.name} created.")
                return HttpResponseRedirect(_org_url("console-projects", ctx.org.id))
        else:
            status = 400
    counts = console_selectors.key_counts(ctx.org)
    rows = [(p, counts.get(p.id, 0)) for p in selectors.projects(ctx.org)]
    return page(
        request, ctx, "console/org/projects.html", {"rows": rows, "form": form}, status=status
    )


@require_POST
@org_page(Perm.PROJECTS_MANAGE)
def project_rename(request: HttpRequest, ctx: OrgContext, project_id: str) -> HttpResponse:
    project = selectors.project_get(ctx.org, project_id)
    form = ProjectForm(request.POST)
    if not form.is_valid():
        messages.error(request, "a project needs a name")
    else:
        try:
            services.project_update(
                principal=ctx.principal, project=project, name=form.cleaned_data["name"]
            )
        except DomainError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Project renamed to {project.name}.")
    return HttpResponseRedirect(_org_url("console-projects", ctx.org.id))
