"""A person's own account page: their authenticator (TOTP) and recovery codes.

Enrolment shows a QR code (segno, inline SVG) and the secret for typing by hand, and the
authenticator counts only once its first code confirms it; the 10 recovery codes are
shown in that response only. Regenerating the codes and removing the authenticator each
ask for a current code. The services are `accounts/two_factor.py`, shared with the back
office (one authenticator per person).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import django_otp
import segno
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import mark_safe
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_POST

from accounts import selectors, two_factor
from accounts.models import User
from console.access import console_principal, signed_in
from console.forms import CodeForm, add_domain_error
from core.errors import DomainError

# The enrolment in progress: the unconfirmed device whose secret the page showed.
ENROLMENT_SESSION_KEY = "console_mfa_enrolment"


def _user(request: HttpRequest) -> User:
    user: User = request.user  # type: ignore[assignment]
    return user


def _next(request: HttpRequest) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target.startswith("/console/") and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return reverse("console-account")


def _account_page(
    request: HttpRequest,
    *,
    regenerate: CodeForm | None = None,
    remove: CodeForm | None = None,
    status: int = 200,
) -> HttpResponse:
    user = _user(request)
    enrolled = two_factor.two_factor_enrolled(user)
    return render(
        request,
        "console/account/page.html",
        {
            "enrolled": enrolled,
            "codes_left": two_factor.recovery_codes_left(user) if enrolled else 0,
            "requiring": list(selectors.mfa_organizations_requiring(user)),
            "regenerate_form": regenerate or CodeForm(auto_id="regenerate_%s"),
            "remove_form": remove or CodeForm(auto_id="remove_%s"),
        },
        status=status,
    )


@never_cache
@signed_in
def account(request: HttpRequest) -> HttpResponse:
    return _account_page(request)


@never_cache
@login_required
@sensitive_post_parameters("code")
def mfa_enrol(request: HttpRequest) -> HttpResponse:
    """GET: a new secret (each visit: a secret is shown once). POST: its first code."""
    user = _user(request)
    if two_factor.two_factor_enrolled(user):
        return HttpResponseRedirect(reverse("console-account"))
    if request.method != "POST":
        enrolment = two_factor.two_factor_enrol_begin(user=user)
        request.session[ENROLMENT_SESSION_KEY] = enrolment.device_id
        return _enrolment_page(request, enrolment, CodeForm(), 200)
    form = CodeForm(request.POST)
    device_id = str(request.session.get(ENROLMENT_SESSION_KEY, ""))
    pending = two_factor.two_factor_enrolment(user=user, device_id=device_id)
    if pending is None:  # replaced in another tab, or never shown: start again
        messages.warning(request, "That enrolment was replaced: scan this new code.")
        query = urlencode({"next": _next(request)})
        return HttpResponseRedirect(f"{reverse('console-mfa-enrol')}?{query}")
    if form.is_valid():
        confirmed = two_factor.two_factor_enrol_confirm(
            principal=console_principal(request),
            user=user,
            device_id=device_id,
            code=form.cleaned_data["code"],
            console=True,
        )
        if confirmed is not None:
            device, codes = confirmed
            del request.session[ENROLMENT_SESSION_KEY]
            # The session proved the authenticator: it counts as verified, with a new key.
            request.session.cycle_key()
            django_otp.login(request, device)
            return _codes_page(request, codes, _next(request))
        form.add_error("code", "That code is not valid: check the time on your phone.")
    return _enrolment_page(request, pending, form, 400)


@require_POST
@never_cache
@signed_in
@sensitive_post_parameters("code")
def recovery_codes(request: HttpRequest) -> HttpResponse:
    """New recovery codes for a current code; the old ones stop working."""
    form = CodeForm(request.POST, auto_id="regenerate_%s")
    if not form.is_valid():
        return _account_page(request, regenerate=form, status=400)
    try:
        codes = two_factor.recovery_codes_regenerate(
            principal=console_principal(request),
            user=_user(request),
            code=form.cleaned_data["code"],
        )
    except DomainError as exc:
        add_domain_error(form, exc)
        return _account_page(request, regenerate=form, status=exc.status)
    return _codes_page(request, codes, reverse("console-account"))


@require_POST
@signed_in
@sensitive_post_parameters("code")
def mfa_remove(request: HttpRequest) -> HttpResponse:
    form = CodeForm(request.POST, auto_id="remove_%s")
    if not form.is_valid():
        return _account_page(request, remove=form, status=400)
    try:
        two_factor.two_factor_remove(
            principal=console_principal(request),
            user=_user(request),
            code=form.cleaned_data["code"],
        )
    except DomainError as exc:
        add_domain_error(form, exc)
        return _account_page(request, remove=form, status=exc.status)
    messages.success(request, "Your authenticator and recovery codes were removed.")
    return HttpResponseRedirect(reverse("console-account"))


def _codes_page(request: HttpRequest, codes: list[str], continue_url: str) -> HttpResponse:
    # In this response only (never_cache on the views: Cache-Control no-store).
    context: dict[str, Any] = {
        "codes": [two_factor.recovery_code_display(c) for c in codes],
        "continue_url": continue_url,
    }
    return render(request, "console/account/recovery_codes.html", context)


def _enrolment_page(
    request: HttpRequest, enrolment: two_factor.Enrolment, form: CodeForm, status: int
) -> HttpResponse:
    context = {
        "form": form,
        # segno writes the modules as SVG paths; the URI is not in the markup as text.
        "qr_svg": mark_safe(segno.make(enrolment.uri, error="m").svg_inline(scale=4)),  # noqa: S308
        "secret": " ".join(enrolment.secret[i : i + 4] for i in range(0, len(enrolment.secret), 4)),
        "next": _next(request),
    }
    return render(request, "console/account/enrol.html", context, status=status)
