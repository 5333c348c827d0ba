"""Log filters: the request id on every line, and secrets never written."""

from __future__ import annotations

import contextvars
import logging
import re

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# When the request reached this process (time.perf_counter()), for latencies measured from
# its arrival (the gateway's time to first token); 0.0 outside a request.
request_started_var: contextvars.ContextVar[float] = contextvars.ContextVar(
    "request_started", default=0.0
)

# API key secrets (sk-...), bearer tokens and Stripe keys, wherever they appear.
_SECRET_RE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]+"
    r"|((?:sk|rk|whsec)_(?:live|test)_)[A-Za-z0-9]+"
    r"|(Bearer\s+)[^\s'\"]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    return _SECRET_RE.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[REDACTED]", text)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


_MARKERS = ("sk-", "sk_", "rk_", "whsec_", "Bearer", "bearer")


def _may_hold_secret(record: logging.LogRecord) -> bool:
    text = str(record.msg)
    if record.args:
        text += repr(record.args)
    return any(marker in text for marker in _MARKERS)


def install_redacting_record_factory() -> None:
    """Stamp the request id and redact at record creation, so every handler sees both."""
    base = logging.getLogRecordFactory()
    if getattr(base, "mantle_redacting", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = base(*args, **kwargs)
        record.request_id = request_id_var.get()
        if _may_hold_secret(record):
            record.msg = redact(record.getMessage())
            record.args = None
        return record

    factory.mantle_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class RedactSecretsFilter(logging.Filter):
    """Rewrites the final message so no secret reaches a log sink."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True
