"""Request id, metrics, security headers, and the console-only middleware the gateway skips."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync, iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpRequest, HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.csrf import CsrfViewMiddleware
from django.middleware.security import SecurityMiddleware
from django_otp.middleware import OTPMiddleware
from whitenoise.middleware import WhiteNoiseMiddleware

from core import metrics
from core.logs import request_id_var, request_started_var

GetResponse = Callable[[HttpRequest], Any]

GATEWAY_PREFIXES = ("/v1/", "/v2/")
# Probes and Prometheus reach a process by its address, not by the public host name: the
# kubelet sends `Host: <pod IP>:8000`, compose's healthcheck `127.0.0.1:8000`, both refused
# by ALLOWED_HOSTS (CommonMiddleware validates the host). These views need nothing of the
# console's middleware and build no URL from the host, so they bypass it like the gateway.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


class _DualMiddleware:
    """Base for middleware that is native in both sync and async stacks (no thread hops)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._acall(request)
        return self._call(request)

    def _call(self, request: HttpRequest) -> HttpResponseBase:
        raise NotImplementedError

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        raise NotImplementedError


class RequestIdMiddleware(_DualMiddleware):
    """Gives each request an id for logs and replies.

    On the console and the management API the client's `x-request-id` is kept when it
    is sane (a trace id that spans the caller's logs and ours). On the gateway the id
    is always our own: it is the idempotency key of the whole pipeline (task, response
    stream, usage event), so a client that reused an id would see its next request
    dropped as a duplicate and, worse, billed once for many.
    """

    def _begin(self, request: HttpRequest) -> None:
        given = request.headers.get("x-request-id", "")
        trusted = not request.path.startswith(GATEWAY_PREFIXES)
        rid = given if trusted and _CLIENT_REQUEST_ID.fullmatch(given) else new_request_id()
        request.request_id = rid  # type: ignore[attr-defined]
        request_id_var.set(rid)
        request_started_var.set(time.perf_counter())

    # The id is deliberately not reset when the response leaves this middleware:
    # Django logs 4xx/5xx responses after the middleware chain has returned, and
    # those lines must carry it too. Each ASGI request runs in its own context.
    def _call(self, request: HttpRequest) -> HttpResponseBase:
        self._begin(request)
        response: HttpResponseBase = self.get_response(request)
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined]
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        self._begin(request)
        response: HttpResponseBase = await self.get_response(request)
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined]
        return response


class MetricsMiddleware(_DualMiddleware):
    """Counts requests and their latency by route (the URL pattern, never the raw path)."""

    def _observe(self, request: HttpRequest, status: int, started: float) -> None:
        match = getattr(request, "resolver_match", None)
        route = match.route if match is not None and match.route else "unmatched"
        metrics.HTTP_REQUESTS.labels(request.method or "", route, str(status)).inc()
        metrics.HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)

    def _call(self, request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        response: HttpResponseBase = self.get_response(request)
        self._observe(request, response.status_code, started)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        response: HttpResponseBase = await self.get_response(request)
        self._observe(request, response.status_code, started)
        return response


class SecurityHeadersMiddleware(_DualMiddleware):
    """A content security policy for the console and admin, and Secure cookies over HTTPS.

    HSTS, nosniff, the referrer and opener policies come from Django's
    SecurityMiddleware and frame denial from XFrameOptionsMiddleware (both
    console-only). The /v1 and /v2 gateway gets one header, nosniff, set inline:
    its replies are JSON or event streams and must not be sniffed into HTML.
    Scripts on console pages need the per-request nonce (`request.csp_nonce`);
    the admin's policy is looser because its theme evaluates Alpine.js
    expressions (see docs/reliability.md, "Security").
    """

    def __init__(self, get_response: GetResponse) -> None:
        super().__init__(get_response)
        self.console_policy = str(settings.MANTLE_CSP)
        self.admin_policy = str(settings.MANTLE_CSP_ADMIN)

    def _before(self, request: HttpRequest) -> str | None:
        if request.path.startswith(GATEWAY_PREFIXES):
            return None
        nonce = secrets.token_urlsafe(16)
        request.csp_nonce = nonce  # type: ignore[attr-defined]
        return nonce

    def _after(self, request: HttpRequest, response: HttpResponseBase, nonce: str | None) -> None:
        response["X-Content-Type-Options"] = "nosniff"
        if nonce is None:
            return
        policy = self.admin_policy if request.path.startswith("/admin/") else self.console_policy
        if policy and "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = policy.replace("{nonce}", nonce)
        if request.is_secure():
            # Whatever the settings say, a cookie set over HTTPS never travels in clear.
            for morsel in response.cookies.values():
                morsel["secure"] = True

    def _call(self, request: HttpRequest) -> HttpResponseBase:
        nonce = self._before(request)
        response: HttpResponseBase = self.get_response(request)
        self._after(request, response, nonce)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        nonce = self._before(request)
        response: HttpResponseBase = await self.get_response(request)
        self._after(request, response, nonce)
        return response


def _bypassed(request: HttpRequest) -> bool:
    return request.path.startswith(GATEWAY_PREFIXES) or request.path in OPS_PATHS


def _console_only_hook(hook: Any, *, is_async: bool) -> Any:
    """`hook(request, ...)` for console paths only, in the chain's own mode (sync or async),
    so that Django adapts nothing and a gateway request never leaves the event loop."""
    if not is_async:

        def sync_hook(request: HttpRequest, *args: Any) -> Any:
            return None if _bypassed(request) else hook(request, *args)

        return sync_hook
    console = hook if iscoroutinefunction(hook) else sync_to_async(hook, thread_sensitive=True)

    async def async_hook(request: HttpRequest, *args: Any) -> Any:
        return None if _bypassed(request) else await console(request, *args)

    return async_hook


def for_console(middleware_class: type) -> type:
    """A subclass of a Django middleware that gateway and operations paths bypass entirely.

    A subclass (not a wrapper) so that Django's system checks still recognise it.
    """

    native_async = bool(getattr(middleware_class, "async_capable", False))

    class ConsoleOnly(middleware_class):
        # Async-capable even when the wrapped middleware is not (WhiteNoise): one
        # sync-only middleware makes Django adapt the whole chain, and without a
        # per-request ThreadSensitiveContext (GatewayASGIHandler) every gateway
        # request then runs in one shared thread, one request at a time.
        sync_capable = True
        async_capable = True

        def __init__(self, get_response: Any) -> None:
            self._bypass = get_response
            self._console: Any = None
            if not native_async and iscoroutinefunction(get_response):
                super().__init__(async_to_sync(get_response))
                self._console = sync_to_async(super().__call__, thread_sensitive=True)
                markcoroutinefunction(self)
            else:
                super().__init__(get_response)
            if hasattr(middleware_class, "process_view"):
                # Django calls view hooks itself, outside __call__, for every request: a
                # sync one (CSRF's) it adapts with a hop to the one shared sync thread.
                # This one answers gateway and operations paths on the event loop and
                # only makes the hop for the console.
                self.process_view = _console_only_hook(
                    super().process_view, is_async=iscoroutinefunction(get_response)
                )

        def __call__(self, request: HttpRequest) -> Any:
            if _bypassed(request):
                # In an async stack this returns the coroutine, which Django awaits.
                return self._bypass(request)
            if self._console is not None:
                return self._console(request)
            return super().__call__(request)

    ConsoleOnly.__name__ = ConsoleOnly.__qualname__ = f"ConsoleOnly{middleware_class.__name__}"
    return ConsoleOnly


ConsoleSecurityMiddleware = for_console(SecurityMiddleware)
ConsoleWhiteNoiseMiddleware = for_console(WhiteNoiseMiddleware)
ConsoleSessionMiddleware = for_console(SessionMiddleware)
ConsoleCommonMiddleware = for_console(CommonMiddleware)
ConsoleCsrfViewMiddleware = for_console(CsrfViewMiddleware)
ConsoleAuthenticationMiddleware = for_console(AuthenticationMiddleware)
# `request.user.is_verified()`: whether this session passed the back office's second factor
# (django-otp). Lazy: a session that never did costs no query.
ConsoleOTPMiddleware = for_console(OTPMiddleware)
ConsoleMessageMiddleware = for_console(MessageMiddleware)
ConsoleXFrameOptionsMiddleware = for_console(XFrameOptionsMiddleware)
