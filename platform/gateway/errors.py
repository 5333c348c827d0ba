"""OpenAI-shaped errors of the /v1 API."""

from __future__ import annotations

import json
from collections.abc import Mapping

from django.http import HttpResponse

from core import metrics
from gateway.protocol import ErrorResponse


class OpenAIError(Exception):
    """An error reply exactly as OpenAI shapes it: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> ErrorResponse:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> HttpResponse:
        metrics.GATEWAY_REJECTIONS.labels(self.code or self.type).inc()
        response = HttpResponse(
            json.dumps(self.body()), status=self.status, content_type="application/json"
        )
        for name, value in self.headers.items():
            response[name] = value
        return response


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unauthorized(message: str, code: str = "invalid_api_key") -> OpenAIError:
    return OpenAIError(401, message, type_="invalid_request_error", code=code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def model_not_priced(model: str) -> OpenAIError:
    """Nothing prices the model for this organization: it is served to no one (never free
    by accident). An operator prices it (docs/billing.md, "Unpriced models")."""
    return OpenAIError(
        403,
        f"The model `{model}` has no price yet, so it cannot be served. Ask the platform "
        "operator to price it.",
        type_="invalid_request_error",
        param="model",
        code="model_not_priced",
    )


def no_capacity(pool: str) -> OpenAIError:
    return OpenAIError(
        503,
        f"No worker of pool `{pool}` is serving right now; the request was not queued. "
        "Retry later.",
        type_="server_error",
        code="no_available_worker",
        headers={"retry-after": "5"},
    )


def dependency_unavailable(name: str, what: str) -> OpenAIError:
    """A 503 naming the dependency that is down, the same name `/readyz` reports."""
    return OpenAIError(
        503,
        f"The platform's {what} ({name}) is unreachable, so the request was not run. "
        "Retry shortly.",
        type_="server_error",
        code=f"{name}_unavailable",
        headers={"retry-after": "2"},
    )


def broker_unavailable() -> OpenAIError:
    return OpenAIError(
        503,
        "The request could not be queued (broker unreachable); retry later.",
        type_="server_error",
        code="broker_unavailable",
        headers={"retry-after": "2"},
    )


def too_many_failed_keys(retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        429,
        "Too many requests with incorrect API keys came from your address; its requests are "
        f"refused for the next {retry_after_s} seconds.",
        type_="invalid_request_error",
        code="too_many_failed_authentications",
        headers={"retry-after": str(retry_after_s)},
    )


def internal_error(request_id: str) -> OpenAIError:
    return OpenAIError(
        500,
        "The server had an error while processing your request. Sorry about that! "
        f"Retry, or contact support with the request id {request_id}.",
        type_="server_error",
        code="internal_error",
    )
