"""Sign up (confirmed by email), log in (throttled), log out, password reset, invitations."""

from __future__ import annotations

import logging
from typing import Any

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse, reverse_lazy
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache
from django.views.decorators.debug import sensitive_post_parameters

from accounts import services as account_services
from accounts.auth import client_ip
from accounts.backends import present_login_refusal
from accounts.models import Membership, User
from console import services
from console.forms import (
    AccountForm,
    ConsolePasswordResetForm,
    LoginForm,
    SignupForm,
    add_domain_error,
)
from core.errors import DomainError, NotFound

BACKEND = "accounts.backends.ThrottledModelBackend"

logger = logging.getLogger(__name__)


@method_decorator(present_login_refusal, name="dispatch")
class LoginView(auth_views.LoginView):
    template_name = "console/auth/login.html"
    authentication_form = LoginForm
    redirect_authenticated_user = True

    def form_invalid(self, form: LoginForm) -> HttpResponse:  # type: ignore[override]
        response = super().form_invalid(form)
        # A refused log-in is not a success: 400 here, 429 when throttled (set by
        # present_login_refusal), so that scripts (and tests) can tell without reading.
        response.status_code = 400
        return response


class LogoutView(auth_views.LogoutView):
    pass


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
