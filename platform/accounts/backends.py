"""The password check behind every log-in form (console and back office), throttled.

Throttling lives in the authentication backend rather than in a form, so that every form
that calls `authenticate()` (the console's, the admin's, a second-factor form built on
either) is throttled by the same policy without knowing about it. A form cannot tell a
refusal from a wrong password through `authenticate()`, so the refusal is left on the
request and `present_login_refusal` (a decorator on the log-in views) shows its message
with status 429.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied
from django.http import HttpRequest, HttpResponseBase

from accounts import throttle
from accounts.auth import client_ip
from accounts.models import User

REFUSAL_ATTR = "mantle_login_refusal"


class ThrottledModelBackend(ModelBackend):
    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> User | None:
        if username is None:
            username = kwargs.get(User.USERNAME_FIELD)
        if not username or password is None:
            return None
        # Emails are stored lower-cased; the counters use the same form.
        email = username.strip().lower()
        address = client_ip(request) if request is not None else None
        try:
            throttle.login_throttle_check(email=email, address=address)
        except throttle.LoginThrottled as exc:
            if request is not None:
                setattr(request, REFUSAL_ATTR, exc)
            # PermissionDenied makes authenticate() stop at once (no other backend, no
            # password hashing) and report a failed log-in.
            raise PermissionDenied(exc.message) from exc
        user = super().authenticate(request, username=email, password=password, **kwargs)
        if user is None:
            throttle.login_failure_record(email=email, address=address)
        else:
            throttle.login_success_reset(email=email, address=address)
        return user


def login_refusal(request: HttpRequest) -> throttle.LoginThrottled | None:
    refusal: throttle.LoginThrottled | None = getattr(request, REFUSAL_ATTR, None)
    return refusal


View = Callable[..., HttpResponseBase]


def present_login_refusal(view: View) -> View:
    """Wraps a log-in view: a throttled attempt gets 429 and the throttle's message in
    place of the form's "wrong password" (the form is whatever the view renders)."""

    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        response = view(request, *args, **kwargs)
        refusal = login_refusal(request)
        if refusal is None:
            return response
        context = getattr(response, "context_data", None) or {}
        form = context.get("form")
        if form is not None and hasattr(form, "error_class"):
            form.errors[NON_FIELD_ERRORS] = form.error_class([refusal.message])
        response.status_code = 429
        return response

    return wrapper
