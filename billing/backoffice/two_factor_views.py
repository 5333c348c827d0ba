"""The back office's second step of signing in: enrol an authenticator, or enter a code.

These pages sit outside `admin_view` (whose gate is the very thing they open) and check
for themselves that the session belongs to active staff who signed in with a password.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import django_otp
import segno
from django import forms
from django.contrib import admin
from django.contrib.auth import logout
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import mark_safe
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST
from unfold.widgets import BASE_INPUT_CLASSES

from accounts import two_factor
from accounts.models import User
from accounts.principal import Principal

# The enrolment in progress: the unconfirmed device whose secret the page showed.
ENROLMENT_SESSION_KEY = "backoffice_two_factor_enrolment"


class CodeForm(forms.Form):
    code = forms.CharField(
        label="Code",
        max_length=32,
        strip=True,
        widget=forms.TextInput(
            attrs={
                "autocomplete": "one-time-code",
                "autofocus": "",
                "class": " ".join(BASE_INPUT_CLASSES),
                "spellcheck": "false",
            }
        ),
    )


def redirect_to_second_factor(request: HttpRequest, user: User) -> HttpResponseRedirect:
    """Where a staff member who passed the password goes next: enrol, or enter a code."""
    name = "verify" if two_factor.two_factor_enrolled(user) else "enrol"
    query = urlencode({"next": _next(request)})
    return HttpResponseRedirect(f"{reverse(f'admin:backoffice-two-factor-{name}')}?{query}")


@never_cache
def verify(request: HttpRequest) -> HttpResponseBase:
    user = _staff(request)
    if user is None:
        return redirect_to_login(request.get_full_path(), reverse("admin:login"))
    if two_factor.session_verified(request.user):
        return HttpResponseRedirect(_next(request))
    if not two_factor.two_factor_enrolled(user):
        return redirect_to_second_factor(request, user)
    form = CodeForm(request.POST if request.method == "POST" else None)
    status = 200
    if form.is_valid():
        result = two_factor.two_factor_verify(
            principal=_principal(request, user), user=user, code=form.cleaned_data["code"]
        )
        if result.device is not None:
            _session_verified(request, result.device)
            return HttpResponseRedirect(_next(request))
        if result.locked_until is not None:
            status = 429
            form.add_error(
                "code",
                f"Too many wrong codes: try again after {result.locked_until:%H:%M:%S} UTC.",
            )
        else:
            status = 400
            form.add_error("code", "That code is not valid (or was used already).")
    elif request.method == "POST":
        status = 400
    return _render(request, "backoffice/two_factor_verify.html", {"form": form}, status)


@never_cache
def enrol(request: HttpRequest) -> HttpResponseBase:
    user = _staff(request)
    if user is None:
        return redirect_to_login(request.get_full_path(), reverse("admin:login"))
    if two_factor.two_factor_enrolled(user):
        # Replacing an authenticator takes an operator's reset (docs/backoffice.md).
        return redirect_to_second_factor(request, user)
    if request.method != "POST":
        enrolment = two_factor.two_factor_enrol_begin(user=user)
        request.session[ENROLMENT_SESSION_KEY] = enrolment.device_id
        return _enrolment_page(request, enrolment, CodeForm(), 200)

    form = CodeForm(request.POST)
    device_id = str(request.session.get(ENROLMENT_SESSION_KEY, ""))
    pending = two_factor.two_factor_enrolment(user=user, device_id=device_id)
    if pending is None:  # the secret was replaced (another tab) or never shown
        return redirect_to_second_factor(request, user)
    if form.is_valid():
        confirmed = two_factor.two_factor_enrol_confirm(
            principal=_principal(request, user),
            user=user,
            device_id=device_id,
            code=form.cleaned_data["code"],
        )
        if confirmed is not None:
            device, codes = confirmed
            del request.session[ENROLMENT_SESSION_KEY]
            _session_verified(request, device)
            # Shown in this response only: never_cache keeps it out of every cache.
            context = {
                "codes": [two_factor.recovery_code_display(c) for c in codes],
                "continue_url": _next(request),
            }
            return _render(request, "backoffice/two_factor_recovery_codes.html", context, 200)
        form.add_error("code", "That code is not valid: check the time on your phone.")
    return _enrolment_page(request, pending, form, 400)


@require_POST
def cancel(request: HttpRequest) -> HttpResponse:
    """Sign out from the second step (the admin's own log-out page sits behind the gate)."""
    logout(request)
    return HttpResponseRedirect(reverse("admin:login"))


def _enrolment_page(
    request: HttpRequest, enrolment: two_factor.Enrolment, form: CodeForm, status: int
) -> HttpResponse:
    context = {
        "form": form,
        # segno writes the modules as SVG paths; the URI is not in the markup as text.
        "qr_svg": mark_safe(segno.make(enrolment.uri, error="m").svg_inline(scale=4)),  # noqa: S308
        "secret": " ".join(enrolment.secret[i : i + 4] for i in range(0, len(enrolment.secret), 4)),
        "uri": enrolment.uri,
    }
    return _render(request, "backoffice/two_factor_enrol.html", context, status)


def _render(
    request: HttpRequest, template: str, context: dict[str, Any], status: int
) -> TemplateResponse:
    full = {
        **admin.site.each_context(request),
        "title": "Two-factor authentication",
        "next": _next(request),
        **context,
    }
    return TemplateResponse(request, template, full, status=status)


def _staff(request: HttpRequest) -> User | None:
    user = request.user
    if isinstance(user, User) and user.is_active and user.is_staff:
        return user
    return None


def _principal(request: HttpRequest, user: User) -> Principal:
    return Principal(user=user, ip_address=request.META.get("REMOTE_ADDR"))


def _session_verified(request: HttpRequest, device: Any) -> None:
    # A new session key as the session gains the back office: a key fixed on the victim
    # before sign-in (or read while only the password step was done) is worthless after.
    request.session.cycle_key()
    django_otp.login(request, device)


def _next(request: HttpRequest) -> str:
    """The admin page asked for: only a path of this site under /admin/."""
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target.startswith("/admin/") and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return reverse("admin:index")
