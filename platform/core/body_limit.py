"""Request bodies are bounded while they stream in, before anything authenticates them.

Django's ASGI handler reads a whole body into a spooled temporary file (on disk past
FILE_UPLOAD_MAX_MEMORY_SIZE) before any view, authentication included, runs. This wrapper
sits in front of it and of the gateway's handler: a declared Content-Length over the
limit is answered 413 without reading a byte, and a chunked body (Transfer-Encoding,
whatever Content-Length says) is counted as it arrives and answered 413 the moment it
passes the limit; the bytes past it are never handed on, and the connection is closed
(`connection: close`), so the server reads no more of it either. A request without a
body, or with a Content-Length within the limit, passes through untouched. The limit is
MANTLE_MAX_BODY_BYTES for every path, except an upload whose credentials check out before
its body is read (the wiring's `limit_for`, see `config.asgi.upload_limit_for`: a compile
upload, POST /v1/files, a batch's input file uploaded in the console): only then is it the
upload's own limit.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Django's handlers type their scope as a dict, uvicorn hands any mapping: taken as it is.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
# The limit a request may send, given its scope: awaited before any of its body is read.
LimitFor = Callable[[Scope], Awaitable["BodyLimit"]]

# Where a request without Content-Length or Transfer-Encoding has no body (RFC 9112, 6.3).
HTTP_1 = ("1.0", "1.1")


class BodyLimit:
    """How many bytes a request may send, and what to tell it past that."""

    __slots__ = ("allowed", "reason")

    def __init__(self, allowed: int, reason: str = "MANTLE_MAX_BODY_BYTES") -> None:
        self.allowed = allowed
        self.reason = reason


def default_limit() -> BodyLimit:
    return BodyLimit(int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE))


def too_large_body(limit: BodyLimit) -> bytes:
    """OpenAI's error shape, which both the gateway and the management API speak."""
    message = f"The request body is larger than the {limit.allowed} bytes allowed ({limit.reason})."
    error = {
        "message": message,
        "type": "invalid_request_error",
        "param": None,
        "code": "payload_too_large",
    }
    return json.dumps({"error": error}).encode()


async def refuse(send: Send, limit: BodyLimit) -> None:
    body = too_large_body(limit)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The server stops reading and closes once this is sent, instead of
                # taking in (and throwing away) the rest of a body that may never end.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def framing(headers: Any) -> tuple[int | None, bool]:
    """The declared Content-Length (None: none, or malformed, which the server refuses
    before the app runs) and whether the body comes with Transfer-Encoding. Under
    Transfer-Encoding a Content-Length tells nothing (RFC 9112, 6.1: h11 reads the chunks
    whatever it says, httptools refuses the pair), so such a body is counted."""
    length: int | None = None
    chunked = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            chunked = True
        elif lowered == b"content-length" and length is None and value.isdigit():
            length = int(value)
    return length, chunked


def bounded_body(app: ASGIApp, limit_for: LimitFor) -> ASGIApp:
    """`app`, with every HTTP request body bounded by `limit_for` as it streams in."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        length, chunked = framing(scope.get("headers") or ())
        # HTTP/2 and 3 frame a body apart from its headers: it may come with neither.
        streamed = chunked or (length is None and scope.get("http_version") not in HTTP_1)
        if not streamed and (length is None or length <= settings.DATA_UPLOAD_MAX_MEMORY_SIZE):
            # The common case, passed on untouched: no body at all (RFC 9112, 6.3), or
            # exactly `length` bytes within the default (the server delivers no more).
            await app(scope, receive, send)
            return
        # Only a body the default may not cover is worth a look at its credentials (a
        # Redis or database read); `limit_for` tells the upload paths by their path alone.
        limit = await limit_for(scope)
        if streamed:
            await app(scope, *counted(receive, send, limit))
        elif length is not None and length > limit.allowed:
            await refuse(send, limit)
        else:
            await app(scope, receive, send)

    return guarded


def counted(receive: Receive, send: Send, limit: BodyLimit) -> tuple[Receive, Send]:
    """`receive` that answers 413 once the body passes the limit, and tells the app that
    the client went away (so Django's body reader stops and the app sends nothing)."""
    state = {"received": 0, "refused": False, "started": False}
    gone: Message = {"type": "http.disconnect"}

    async def receive_counted() -> Message:
        if state["refused"]:
            return dict(gone)
        message = await receive()
        if message["type"] != "http.request":
            return message
        state["received"] += len(message.get("body", b""))
        if state["received"] <= limit.allowed:
            return message
        state["refused"] = True
        if not state["started"]:
            await refuse(send, limit)
        return dict(gone)

    async def send_guarded(message: Message) -> None:
        if state["refused"]:
            return  # the 413 is the whole reply
        if message["type"] == "http.response.start":
            state["started"] = True
        await send(message)

    return receive_counted, send_guarded
