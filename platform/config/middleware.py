"""Request id, metrics, and the console-only middleware that the /v1 gateway skips."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpRequest, HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.csrf import CsrfViewMiddleware
from django.middleware.security import SecurityMiddleware
from whitenoise.middleware import WhiteNoiseMiddleware

from config import metrics
from config.logs import request_id_var

GetResponse = Callable[[HttpRequest], Any]

GATEWAY_PREFIXES = ("/v1/", "/v2/")
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
    """Gives each request an id (the client's `x-request-id` when sane), for logs and replies."""

    def _begin(self, request: HttpRequest) -> None:
        given = request.headers.get("x-request-id", "")
        rid = given if _CLIENT_REQUEST_ID.fullmatch(given) else new_request_id()
        request.request_id = rid  # type: ignore[attr-defined]
        request_id_var.set(rid)

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


def for_console(middleware_class: type) -> type:
    """A subclass of a Django middleware that gateway paths bypass entirely.

    A subclass (not a wrapper) so that Django's system checks still recognise it.
    """

    class ConsoleOnly(middleware_class):
        def __call__(self, request: HttpRequest) -> Any:
            if request.path.startswith(GATEWAY_PREFIXES):
                # In an async stack this returns the coroutine, which Django awaits.
                return self.get_response(request)
            return super().__call__(request)

    ConsoleOnly.__name__ = ConsoleOnly.__qualname__ = f"ConsoleOnly{middleware_class.__name__}"
    return ConsoleOnly


ConsoleSecurityMiddleware = for_console(SecurityMiddleware)
ConsoleWhiteNoiseMiddleware = for_console(WhiteNoiseMiddleware)
ConsoleSessionMiddleware = for_console(SessionMiddleware)
ConsoleCommonMiddleware = for_console(CommonMiddleware)
ConsoleCsrfViewMiddleware = for_console(CsrfViewMiddleware)
ConsoleAuthenticationMiddleware = for_console(AuthenticationMiddleware)
ConsoleMessageMiddleware = for_console(MessageMiddleware)
ConsoleXFrameOptionsMiddleware = for_console(XFrameOptionsMiddleware)
