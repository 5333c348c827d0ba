"""Single sign-on: the log-in page's SSO step, the identity provider's callback, and the
organization's settings page (docs/console.md, "Single sign-on")."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.crypto import constant_time_compare
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from accounts import oidc, sso, throttle
from accounts.auth import client_ip
from accounts.models import SsoConnection
from accounts.permissions import Perm, Role
from console.access import SESSION_ORG, OrgContext, org_page, page
from console.forms import (
    LoginForm,
    SsoConnectionForm,
    SsoDomainForm,
    SsoStartForm,
    add_domain_error,
)
from console.views.auth import first_factor_passed, safe_next
from core import secretbox
from core.errors import DomainError

logger = logging.getLogger(__name__)

# The sign-in in progress in this browser: what the callback must find again. Popped by the
# callback whatever happens next, so a state is good for one callback only.
SSO_SESSION_KEY = "console_sso"
SSO_TTL_S = 600
MAX_CODE_CHARS = 4096


def callback_url(request: HttpRequest) -> str:
    """The redirect URI to register with the identity provider."""
    return request.build_absolute_uri(reverse("console-sso-callback"))


@require_POST
def sso_start(request: HttpRequest) -> HttpResponse:
    """The work email chooses the connection (an enabled one with the email's domain
    verified); the browser goes on to its provider (the page's refresh, or its link) with a
    new state, nonce and PKCE."""
    form = SsoStartForm(request.POST)
    next_url = safe_next(request)
    connection = None
    status = 400
    if form.is_valid():
        email = form.cleaned_data["email"]
        connection = sso.connection_for_email(email)
        if connection is None:
            form.add_error(
                "email",
                "No organization signs in this address's domain with single sign-on: log in "
                "with your password.",
            )
        else:
            # Failed callbacks count like failed passwords (each one cost requests to the
            # organization's provider): past the log-in limits, no new sign-in starts.
            try:
                throttle.login_throttle_check(email=email, address=client_ip(request))
            except throttle.LoginThrottled as exc:
                form.add_error("email", exc.message)
                connection, status = None, exc.status
    if connection is None:
        return render(
            request,
            "console/auth/login.html",
            {"form": LoginForm(request), "sso_form": form, "next": next_url},
            status=status,
        )
    started = oidc.authorization_request(
        sso.provider_of(connection),
        client_id=connection.client_id,
        redirect_uri=callback_url(request),
        login_hint=form.cleaned_data["email"],
    )
    request.session[SSO_SESSION_KEY] = {
        "connection": connection.pk,
        "issuer": connection.issuer,
        "state": started.state,
        "nonce": started.nonce,
        "verifier": started.code_verifier,
        "email": form.cleaned_data["email"],
        "next": next_url if next_url != reverse("console-home") else "",
        "at": int(time.time()),
    }
    # A page that moves on by itself, not a 302: the log-in page's CSP has `form-action
    # 'self'`, and browsers apply it to the redirects that follow a form's submission, so
    # a 302 to the provider's origin would be blocked. A refresh is a navigation.
    response = render(request, "console/auth/sso_redirect.html", {"url": started.url})
    response["Cache-Control"] = "no-store"
    return response


def _refused(request: HttpRequest, message: str, status: int) -> HttpResponse:
    return render(request, "console/auth/sso_error.html", {"message": message}, status=status)


@never_cache
def sso_callback(request: HttpRequest) -> HttpResponse:
    """Where the provider sends the browser back: the state of this browser's sign-in
    (single use), the code exchanged, the ID token verified, then the person signed in."""
    pending: Any = request.session.pop(SSO_SESSION_KEY, None)
    if not isinstance(pending, dict):
        return _refused(
            request,
            "No single sign-on is in progress in this browser (or its answer was used "
            "already): start again from the log-in page.",
            400,
        )
    if time.time() - int(pending.get("at", 0)) > SSO_TTL_S:
        return _refused(request, "The sign-in took too long: start again.", 400)
    if not constant_time_compare(request.GET.get("state", ""), str(pending.get("state", ""))):
        return _refused(
            request,
            "The identity provider's answer does not belong to this sign-in (state does not "
            "match): start again.",
            400,
        )
    if request.GET.get("error"):
        error = "".join(c for c in request.GET["error"][:80] if c.isprintable())
        detail = "".join(
            c for c in request.GET.get("error_description", "")[:200] if c.isprintable()
        )
        return _refused(
            request,
            f"The identity provider refused the sign-in: {error}"
            + (f" ({detail})" if detail else ""),
            403,
        )
    code = request.GET.get("code", "")
    if not code or len(code) > MAX_CODE_CHARS:
        return _refused(request, "The identity provider's answer has no valid code.", 400)
    connection = SsoConnection.objects.filter(pk=str(pending.get("connection", ""))).first()
    if connection is None or not connection.enabled or connection.issuer != pending.get("issuer"):
        return _refused(request, "Single sign-on was turned off or changed: start again.", 400)
    try:
        claims = asyncio.run(
            oidc.complete(
                sso.provider_of(connection),
                client_id=connection.client_id,
                client_secret=secretbox.unseal(connection.client_secret_sealed),
                code=code,
                redirect_uri=callback_url(request),
                code_verifier=str(pending.get("verifier", "")),
                nonce=str(pending.get("nonce", "")),
            )
        )
        signed = sso.sso_sign_in(
            connection_id=connection.pk,
            issuer=connection.issuer,
            claims=claims,
            ip_address=client_ip(request),
        )
    except DomainError as exc:
        logger.warning("sso sign-in refused for %s: %s", connection.organization_id, exc.message)
        throttle.login_failure_record(
            email=str(pending.get("email", "")), address=client_ip(request)
        )
        return _refused(request, f"Single sign-on failed: {exc.message}", exc.status)
    request.session[SESSION_ORG] = signed.organization.id
    next_url = str(pending.get("next") or "") or reverse(
        "console-quickstart", kwargs={"org_id": signed.organization.id}
    )
    if signed.joined:
        messages.success(
            request,
            f"You joined {signed.organization.name} as {connection.default_role} through "
            "single sign-on.",
        )
    return first_factor_passed(request, signed.user, next_url)


# --- the organization's settings ------------------------------------------------------------


def _settings_url(ctx: OrgContext) -> str:
    return reverse("console-sso", kwargs={"org_id": ctx.org.id})


def _settings_page(
    request: HttpRequest,
    ctx: OrgContext,
    *,
    form: SsoConnectionForm | None = None,
    domain_form: SsoDomainForm | None = None,
    status: int = 200,
) -> HttpResponse:
    connection = sso.connection_of(ctx.org)
    if form is None:
        initial: dict[str, Any] = {"default_role": Role.VIEWER, "jit_enabled": True}
        if connection is not None:
            initial = {
                "issuer": connection.issuer,
                "client_id": connection.client_id,
                "default_role": connection.default_role,
                "jit_enabled": connection.jit_enabled,
                "enabled": connection.enabled,
                "sso_required": connection.sso_required,
            }
        form = SsoConnectionForm(initial=initial)
    domains = sso.domains_of(connection) if connection is not None else []
    response = page(
        request,
        ctx,
        "console/org/sso.html",
        {
            "connection": connection,
            "has_secret": connection is not None and bool(connection.client_secret_sealed),
            "form": form,
            "domain_form": domain_form or SsoDomainForm(),
            "domains": [
                {
                    "domain": d,
                    "txt_name": sso.txt_record_name(d),
                    "txt_value": sso.txt_record_value(d),
                }
                for d in domains
            ],
            "callback_url": callback_url(request),
        },
        status=status,
    )
    response["Cache-Control"] = "no-store"
    return response


@org_page(Perm.ORG_UPDATE)
def sso_settings(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """GET: the connection (never its secret), its domains and the redirect URI; POST:
    saves the connection after reading the issuer's discovery document."""
    if request.method != "POST":
        return _settings_page(request, ctx)
    form = SsoConnectionForm(request.POST)
    if not form.is_valid():
        return _settings_page(request, ctx, form=form, status=400)
    data = form.cleaned_data
    try:
        sso.sso_connection_save(
            principal=ctx.principal,
            org=ctx.org,
            issuer=data["issuer"],
            client_id=data["client_id"],
            client_secret=data["client_secret"],
            default_role=data["default_role"],
            jit_enabled=data["jit_enabled"],
            enabled=data["enabled"],
            sso_required=data["sso_required"],
        )
    except DomainError as exc:
        add_domain_error(form, exc)
        return _settings_page(request, ctx, form=form, status=exc.status)
    messages.success(request, "Single sign-on saved: the issuer's discovery document was read.")
    return HttpResponseRedirect(_settings_url(ctx))


@require_POST
@org_page(Perm.ORG_UPDATE)
def sso_domain_add(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    form = SsoDomainForm(request.POST)
    if not form.is_valid():
        return _settings_page(request, ctx, domain_form=form, status=400)
    try:
        added = sso.sso_domain_add(
            principal=ctx.principal, org=ctx.org, domain=form.cleaned_data["domain"]
        )
    except DomainError as exc:
        add_domain_error(form, exc)
        return _settings_page(request, ctx, domain_form=form, status=exc.status)
    messages.success(
        request,
        f"{added.domain} added: publish its TXT record, then press “Check DNS” (or ask "
        "support to verify it).",
    )
    return HttpResponseRedirect(_settings_url(ctx))


@require_POST
@org_page(Perm.ORG_UPDATE)
def sso_domain_action(
    request: HttpRequest, ctx: OrgContext, domain_id: str, action: str
) -> HttpResponse:
    connection = sso.connection_of(ctx.org)
    if connection is None or action not in ("verify", "remove"):
        raise Http404("no such domain")
    domain = sso.domain_get(connection, domain_id)  # another organization's: 404
    try:
        if action == "remove":
            sso.sso_domain_remove(principal=ctx.principal, domain=domain)
            messages.success(request, f"{domain.domain} removed.")
        else:
            sso.sso_domain_check_dns(principal=ctx.principal, domain=domain)
            messages.success(request, f"{domain.domain} is verified.")
    except DomainError as exc:
        messages.error(request, f"{domain.domain}: {exc.message}")
        return _settings_page(request, ctx, status=exc.status)
    return HttpResponseRedirect(_settings_url(ctx))
