"""Sign up, log in (throttled), log out and password reset."""

from __future__ import annotations

import logging

from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse, reverse_lazy

from accounts.auth import client_ip
from config.errors import DomainError
from console import services
from console.forms import (
    ConsolePasswordResetForm,
    SignupForm,
    ThrottledLoginForm,
    add_domain_error,
)

logger = logging.getLogger(__name__)


class LoginView(auth_views.LoginView):
    template_name = "console/auth/login.html"
    authentication_form = ThrottledLoginForm
    redirect_authenticated_user = True

    def form_invalid(self, form: ThrottledLoginForm) -> HttpResponse:  # type: ignore[override]
        response = super().form_invalid(form)
        # A refused log-in is not a success: 429 when throttled, 400 otherwise, so that
        # scripts (and tests) can tell without reading the page.
        response.status_code = 429 if form.throttled else 400
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


class PasswordResetCompleteView(auth_views.PasswordResetCompleteView):
    template_name = "console/auth/password_reset_complete.html"


def signup(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect("console-home")
    form = SignupForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            data = form.cleaned_data
            try:
                done = services.user_signup(
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
                login(request, done.user, backend="django.contrib.auth.backends.ModelBackend")
                return HttpResponseRedirect(
                    reverse("console-quickstart", kwargs={"org_id": done.organization.id})
                )
        else:
            status = 400
    return render(request, "console/auth/signup.html", {"form": form}, status=status)
