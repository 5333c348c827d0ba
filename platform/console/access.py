"""Who may see which console page: the signed-in user's role in the organization of the URL."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.urls import reverse

from accounts import selectors, two_factor
from accounts.auth import client_ip
from accounts.models import Organization, User
from accounts.permissions import Perm, Role, role_allows
from accounts.principal import Principal
from core.errors import DomainError, NotFound, PermissionDenied

SESSION_ORG = "console_org"


@dataclass(frozen=True)
class OrgContext:
    """The organization a page is about, and what the signed-in user may do in it."""

    org: Organization
    role: Role
    principal: Principal
    organizations: list[Organization]

    def can(self, perm: Perm) -> bool:
        return role_allows(self.role, perm)

    @property
    def perms(self) -> dict[str, bool]:
        """For templates: `{% if can.keys_create %}`."""
        return {p.value.replace(".", "_"): role_allows(self.role, p) for p in Perm}

    def require(self, perm: Perm) -> None:
        if not self.can(perm):
            raise PermissionDenied(f"the {self.role} role may not do {perm}")


def console_principal(request: HttpRequest) -> Principal:
    user: User = request.user  # type: ignore[assignment]
    return Principal(user=user, ip_address=client_ip(request))


def second_factor_gate(request: HttpRequest) -> HttpResponseRedirect | None:
    """Where a signed-in session must go before any console page: a person with an
    authenticator whose session gave no code (signed in through a form that asks only for
    the password, e.g. the back office's first step) is asked for one. None: go on."""
    user: User = request.user  # type: ignore[assignment]
    if two_factor.session_verified(user) or not selectors.mfa_enrolled(user):
        return None
    query = urlencode({"next": request.get_full_path()})
    return HttpResponseRedirect(f"{reverse('console-login-verify')}?{query}")


def signed_in(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """login_required, and the second factor where the person has one."""

    @login_required
    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return second_factor_gate(request) or view(request, *args, **kwargs)

    return wrapper


def enrolment_redirect(request: HttpRequest, message: str) -> HttpResponseRedirect:
    messages.warning(request, message)
    query = urlencode({"next": request.get_full_path()})
    return HttpResponseRedirect(f"{reverse('console-mfa-enrol')}?{query}")


def is_htmx(request: HttpRequest) -> bool:
    return request.headers.get("HX-Request") == "true"


# A page, or a download streamed from a store (HttpResponseBase covers both).
OrgView = Callable[..., HttpResponseBase]


def org_page(perm: Perm) -> Callable[[OrgView], Callable[..., HttpResponseBase]]:
    """Loads the organization of the URL for a member holding `perm`.

    Someone outside the organization gets 404 (its existence is not confirmed); a
    member whose role lacks `perm` gets a 403 page that says which permission.
    """

    def decorate(view: OrgView) -> Callable[..., HttpResponseBase]:
        @signed_in
        @functools.wraps(view)
        def wrapper(request: HttpRequest, org_id: str, **kwargs: Any) -> HttpResponseBase:
            principal = console_principal(request)
            try:
                org = selectors.organization_for(principal, org_id, Perm.ORG_VIEW)
            except NotFound as exc:
                raise Http404(exc.message) from exc
            except selectors.MfaRequired as exc:
                # An owner or admin whom the organization requires to have an
                # authenticator: nothing of it until they enrol one.
                return enrolment_redirect(request, exc.message)
            role = selectors.role_in(principal, org.id)
            assert role is not None  # organization_for found the membership
            ctx = OrgContext(
                org=org,
                role=role,
                principal=principal,
                organizations=list(selectors.organizations_for(principal)),
            )
            request.session[SESSION_ORG] = org.id
            try:
                ctx.require(perm)
                return view(request, ctx, **kwargs)
            except PermissionDenied as exc:
                return render_error(request, ctx, exc)
            except NotFound as exc:
                raise Http404(exc.message) from exc

        return wrapper

    return decorate


def page(
    request: HttpRequest,
    ctx: OrgContext,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status: int = 200,
) -> HttpResponse:
    return render(
        request,
        template,
        {"ctx": ctx, "org": ctx.org, "can": ctx.perms, **(context or {})},
        status=status,
    )


def render_error(request: HttpRequest, ctx: OrgContext, exc: DomainError) -> HttpResponse:
    template = "console/partials/error.html" if is_htmx(request) else "console/error.html"
    return page(request, ctx, template, {"error": exc}, status=exc.status)
