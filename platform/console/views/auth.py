"""Sign up (confirmed by email), log in (throttled), log out, password reset, invitations."""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlencode

import django_otp
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse, reverse_lazy
from django.utils import timezone
from django.utils.crypto import constant_time_compare
from django.utils.decorators import method_decorator
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters

from accounts import selectors, sso, throttle, two_factor
from accounts import services as account_services
from accounts.auth import client_ip
from accounts.backends import present_login_refusal
from accounts.models import Membership, User
from accounts.principal import Principal
from console import services
from console.access import enrolment_redirect
from console.forms import (
    AccountForm,
    CodeForm,
    ConsolePasswordResetForm,
    LoginForm,
    SignupForm,
    SsoStartForm,
    add_domain_error,
)
from core.errors import DomainError, NotFound

BACKEND = "accounts.backends.ThrottledModelBackend"

logger = logging.getLogger(__name__)

# The password step passed, the code not yet given: whom the second step is for. The
# session is not signed in meanwhile (no `login()`), so nothing of the console or the
# management API is reachable with it.
SECOND_STEP_SESSION_KEY = "console_second_step"
SECOND_STEP_TTL_S = 300


@method_decorator(present_login_refusal, name="dispatch")
class LoginView(auth_views.LoginView):
    template_name = "console/auth/login.html"
    authentication_form = LoginForm
    redirect_authenticated_user = True

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.setdefault("sso_form", SsoStartForm())
        return context

    def form_valid(self, form: LoginForm) -> HttpResponse:  # type: ignore[override]
        user: User = form.get_user()
        refusal = sso.password_sign_in_refusal(user)
        if refusal is not None:
            # The password was right, but the organization wants its identity provider
            # to be the one that decides (docs/console.md, "Single sign-on").
            form.add_error(None, refusal)
            response = super().form_invalid(form)
            response.status_code = 403
            return response
        if selectors.mfa_enrolled(user):
            # A new session key: one fixed on the browser before sign-in is worth nothing.
            self.request.session.cycle_key()
            self.request.session[SECOND_STEP_SESSION_KEY] = {
                "user": user.pk,
                "hash": user.get_session_auth_hash(),
                "backend": getattr(user, "backend", BACKEND),
                "at": int(time.time()),
            }
            query = urlencode({"next": self.get_success_url()})
            return HttpResponseRedirect(f"{reverse('console-login-verify')}?{query}")
        response = super().form_valid(form)
        requiring = list(selectors.mfa_organizations_requiring(user))
        if requiring:
            names = ", ".join(o.name for o in requiring)
            return enrolment_redirect(
                self.request,
                f"{names} require{'s' if len(requiring) == 1 else ''} multi-factor "
                "authentication for owners and admins: enrol an authenticator to continue.",
            )
        return response

    def form_invalid(self, form: LoginForm) -> HttpResponse:  # type: ignore[override]
        email = str(form.data.get("username", ""))[:254]
        connection = sso.connection_for_email(email) if "@" in email else None
        if connection is not None:
            # An address whose organization signs it in with single sign-on: point there,
            # with the SSO form filled in (docs/console.md, "Single sign-on").
            form.add_error(
                None,
                f"{connection.organization.name} signs in {sso.email_domain(email)} addresses "
                "with single sign-on: use “Sign in with SSO” below.",
            )
            response = self.render_to_response(
                self.get_context_data(form=form, sso_form=SsoStartForm(initial={"email": email}))
            )
        else:
            response = super().form_invalid(form)
        # A refused log-in is not a success: 400 here, 429 when throttled (set by
        # present_login_refusal), so that scripts (and tests) can tell without reading.
        response.status_code = 400
        return response


def first_factor_passed(request: HttpRequest, user: User, next_url: str) -> HttpResponse:
    """After a first factor other than the password form (single sign-on): the second
    step for a person with an authenticator, else signed in; enrolment first where an
    organization of theirs requires MFA of their role."""
    if selectors.mfa_enrolled(user):
        request.session.cycle_key()
        request.session[SECOND_STEP_SESSION_KEY] = {
            "user": user.pk,
            "hash": user.get_session_auth_hash(),
            "backend": BACKEND,
            "at": int(time.time()),
        }
        query = urlencode({"next": next_url})
        return HttpResponseRedirect(f"{reverse('console-login-verify')}?{query}")
    login(request, user, backend=BACKEND)
    requiring = list(selectors.mfa_organizations_requiring(user))
    if requiring:
        names = ", ".join(o.name for o in requiring)
        messages.warning(
            request,
            f"{names} require{'s' if len(requiring) == 1 else ''} multi-factor "
            "authentication for owners and admins: enrol an authenticator to continue.",
        )
        query = urlencode({"next": next_url})
        return HttpResponseRedirect(f"{reverse('console-mfa-enrol')}?{query}")
    return HttpResponseRedirect(next_url)


class LogoutView(auth_views.LogoutView):
    pass


def safe_next(request: HttpRequest) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return reverse("console-home")


def _second_step_user(request: HttpRequest) -> tuple[User | None, dict[str, Any] | None]:
    """Whom the code is for: the person whose password was just accepted (pending), or a
    signed-in person with an authenticator whose session gave no code yet."""
    signed_in: Any = request.user
    if signed_in.is_authenticated:
        return (signed_in if selectors.mfa_enrolled(signed_in) else None), None
    pending = request.session.get(SECOND_STEP_SESSION_KEY)
    if not isinstance(pending, dict) or time.time() - int(pending.get("at", 0)) > SECOND_STEP_TTL_S:
        return None, None
    user = User.objects.filter(pk=int(pending.get("user") or 0), is_active=True).first()
    # The password changed since the first step: that step no longer counts.
    if user is None or not constant_time_compare(
        user.get_session_auth_hash(), str(pending.get("hash", ""))
    ):
        return None, None
    return user, pending


@never_cache
@sensitive_post_parameters("code")
def login_verify(request: HttpRequest) -> HttpResponse:
    """The second step of signing in: a code of the authenticator, or a recovery code.

    Throttled like the password (per email and network address, and per address, in the
    same window: `accounts/throttle.py`) and by django-otp's per-device backoff."""
    next_url = safe_next(request)
    user, pending = _second_step_user(request)
    if user is None:
        if request.user.is_authenticated:
            return HttpResponseRedirect(next_url)
        request.session.pop(SECOND_STEP_SESSION_KEY, None)
        return HttpResponseRedirect(f"{reverse('console-login')}?{urlencode({'next': next_url})}")
    if pending is None and two_factor.session_verified(request.user):
        return HttpResponseRedirect(next_url)
    form = CodeForm(request.POST if request.method == "POST" else None)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            address = client_ip(request)
            try:
                throttle.second_factor_throttle_check(email=user.email, address=address)
            except throttle.LoginThrottled as exc:
                form.add_error("code", exc.message)
                status = 429
            else:
                result = two_factor.two_factor_verify(
                    principal=Principal(user=user, ip_address=address),
                    user=user,
                    code=form.cleaned_data["code"],
                    console=True,
                )
                if result.device is not None:
                    throttle.second_factor_success_reset(email=user.email, address=address)
                    if pending is not None:
                        request.session.pop(SECOND_STEP_SESSION_KEY, None)
                        login(request, user, backend=str(pending.get("backend") or BACKEND))
                    else:
                        request.session.cycle_key()
                    django_otp.login(request, result.device)
                    return HttpResponseRedirect(next_url)
                throttle.second_factor_failure_record(email=user.email, address=address)
                if result.locked_until is not None:
                    status = 429
                    form.add_error(
                        "code",
                        "Too many wrong codes: try again after "
                        f"{result.locked_until:%H:%M:%S} UTC.",
                    )
                else:
                    form.add_error("code", "That code is not valid (or was used already).")
    return render(
        request,
        "console/auth/login_verify.html",
        {"form": form, "next": next_url, "email": user.email},
        status=status,
    )


class PasswordResetView(auth_views.PasswordResetView):
    template_name = "console/auth/password_reset.html"
    form_class = ConsolePasswordResetForm
    email_template_name = "console/email/password_reset.txt"
    subject_template_name = "console/email/password_reset_subject.txt"
    success_url = reverse_lazy("console-password-reset-done")


class PasswordResetDoneView(auth_views.PasswordResetDoneView):
    template_name = "console/auth/password_reset_done.html"


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    template_name = "console/auth/password_reset_confirm.html"
    success_url = reverse_lazy("console-password-reset-complete")

    def form_valid(self, form: Any) -> HttpResponse:
        # The reset link was read in the account's mailbox: that confirms the address.
        user: User = form.user
        if user.email_verified_at is None:
            user.email_verified_at = timezone.now()
            user.save(update_fields=["email_verified_at"])
        return super().form_valid(form)


class PasswordResetCompleteView(auth_views.PasswordResetCompleteView):
    template_name = "console/auth/password_reset_complete.html"


@sensitive_post_parameters("password", "password_again")
def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("console-home")
    form = SignupForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            data = form.cleaned_data
            try:
                services.user_signup(
                    email=data["email"],
                    password=data["password"],
                    full_name=data["full_name"],
                    organization_name=data["organization_name"],
                    ip_address=client_ip(request),
                )
            except DomainError as exc:
                add_domain_error(form, exc)
                status = exc.status
            else:
                # The same page for a new and a registered address: the email differs.
                return HttpResponseRedirect(reverse("console-signup-sent"))
        else:
            status = 400
    return render(request, "console/auth/signup.html", {"form": form}, status=status)


def signup_sent(request: HttpRequest) -> HttpResponse:
    return render(request, "console/auth/signup_sent.html")


@never_cache
def signup_verify(request: HttpRequest, token: str) -> HttpResponse:
    """GET shows a button, POST creates the account: a mail scanner that fetches every
    link must not be the one that uses it up."""
    if request.method != "POST":
        return render(request, "console/auth/signup_verify.html", {"token": token})
    try:
        done = services.signup_verify(token=token, ip_address=client_ip(request))
    except DomainError as exc:
        return render(request, "console/auth/link_error.html", {"error": exc}, status=exc.status)
    login(request, done.user, backend=BACKEND)
    messages.success(request, "Your email address is confirmed and your account is ready.")
    return HttpResponseRedirect(
        reverse("console-quickstart", kwargs={"org_id": done.organization.id})
    )


@never_cache
@sensitive_post_parameters("password", "password_again")
def invitation(request: HttpRequest, token: str) -> HttpResponse:
    """The link of an invitation email: join with the signed-in account whose confirmed
    email is the invited one, or create that account (the link confirms the address)."""
    try:
        invited = account_services.invitation_by_token(token)
    except NotFound as exc:
        return render(request, "console/auth/link_error.html", {"error": exc}, status=404)
    user: Any = request.user
    signed_in: User | None = user if user.is_authenticated else None
    login_url = f"{reverse('console-login')}?next={request.path}"
    has_account = signed_in is not None or User.objects.filter(email=invited.email).exists()
    form = None if has_account else AccountForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if signed_in is None and form is None:
            return HttpResponseRedirect(login_url)  # the account exists: log in first
        if form is not None and not form.is_valid():
            status = 400
        else:
            try:
                membership = _accept(request, token, signed_in, form)
            except DomainError as exc:
                if form is not None and exc.param in form.fields:
                    add_domain_error(form, exc)
                else:
                    messages.error(request, exc.message)
                status = exc.status
            else:
                org = membership.organization
                messages.success(request, f"You joined {org.name} as {membership.role}.")
                return HttpResponseRedirect(
                    reverse("console-quickstart", kwargs={"org_id": org.id})
                )
    return render(
        request,
        "console/auth/invitation.html",
        {
            "invitation": invited,
            "signed_in": signed_in,
            "form": form,
            "login_url": login_url,
            "wrong_account": signed_in is not None and signed_in.email != invited.email,
        },
        status=status,
    )


def _accept(
    request: HttpRequest, token: str, signed_in: User | None, form: AccountForm | None
) -> Membership:
    if signed_in is not None:
        return account_services.invitation_accept(
            token=token, user=signed_in, ip_address=client_ip(request)
        )
    assert form is not None
    membership = account_services.invitation_accept_new_account(
        token=token,
        password=form.cleaned_data["password"],
        full_name=form.cleaned_data["full_name"],
        ip_address=client_ip(request),
    )
    login(request, membership.user, backend=BACKEND)
    return membership
