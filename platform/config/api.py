"""The management API root: one router per app, and domain errors mapped to HTTP here."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from accounts.api import router as accounts_router
from accounts.auth import management_auth
from billing.api import router as billing_router
from catalog.api import router as catalog_router
from catalog.compile_api import router as compile_router
from core.errors import DomainError, TooManyFailedKeys

logger = logging.getLogger(__name__)

api = NinjaAPI(
    title="Mantle management API",
    version="1",
    description=(
        "Organizations, members, projects, API keys, models and endpoints. "
        "Authenticate with the console session or `Authorization: Bearer sk-...` "
        "of an admin-scoped API key. Model inference is the OpenAI-compatible API at /v1."
    ),
    auth=management_auth,
    urls_namespace="api",
)
api.add_router("", accounts_router)
api.add_router("", billing_router)
api.add_router("", catalog_router)
api.add_router("", compile_router)


def error_body(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The same error shape as the /v1 gateway (OpenAI's), for one client-side handler."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _field(loc: Iterable[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "payload", "query", "path", "form")]
    return ".".join(parts) or None


def describe_validation(errors: Iterable[Mapping[str, Any]]) -> tuple[str, str | None]:
    messages = []
    first_param: str | None = None
    for err in errors:
        field = _field(err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        first_param = first_param or field
        messages.append(f"{field}: {msg}" if field else msg)
    return "; ".join(messages) or "invalid request", first_param


@api.exception_handler(ValidationError)
def _validation(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    message, param = describe_validation(exc.errors)
    return api.create_response(
        request,
        error_body(message, type_="invalid_request_error", param=param, code="invalid_request"),
        status=400,
    )


@api.exception_handler(DomainError)
def _domain(request: HttpRequest, exc: DomainError) -> HttpResponse:
    type_ = "invalid_request_error" if exc.status < 500 else "server_error"
    response = api.create_response(
        request,
        error_body(exc.message, type_=type_, param=exc.param, code=exc.code),
        status=exc.status,
    )
    if isinstance(exc, TooManyFailedKeys):
        response["retry-after"] = str(exc.retry_after_s)
    return response


@api.exception_handler(AuthenticationError)
def _unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return api.create_response(
        request,
        error_body(
            "authentication required: sign in, or send an admin-scoped API key as "
            "'Authorization: Bearer sk-...'",
            type_="authentication_error",
            code="unauthenticated",
        ),
        status=401,
    )


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return api.create_response(
        request,
        error_body(str(exc), type_="invalid_request_error", code="invalid_request"),
        status=exc.status_code,
    )


@api.exception_handler(RequestDataTooBig)
def _too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return api.create_response(
        request,
        error_body(
            "request body too large", type_="invalid_request_error", code="payload_too_large"
        ),
        status=413,
    )
