"""Domain errors that services raise; the API layers map them to HTTP in one place each."""

from __future__ import annotations


class DomainError(Exception):
    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidInput(DomainError):
    status = 400
    code = "invalid_request"


class NotFound(DomainError):
    status = 404
    code = "not_found"


class PermissionDenied(DomainError):
    status = 403
    code = "permission_denied"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class TooManyFailedKeys(DomainError):
    """An address sent too many incorrect API keys: refused until its window ends."""

    status = 429
    code = "too_many_failed_authentications"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            "Too many requests with incorrect API keys came from your address; its requests "
            f"are refused for the next {retry_after_s} seconds."
        )
        self.retry_after_s = retry_after_s
