"""ASGI entry point (uvicorn config.asgi:application), serving gateway, API and console."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from django.conf import settings
from django.core import signals
from django.core.asgi import get_asgi_application
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import set_script_prefix

from core.body_limit import BodyLimit, bounded_body, default_limit

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

django_application = get_asgi_application()

GATEWAY_PREFIXES = ("/v1/", "/v2/")

logger = logging.getLogger("mantle.gateway")

Send = Callable[[Mapping[str, Any]], Awaitable[None]]


class ClientStalled(RequestAborted):
    """A write to the client waited longer than MANTLE_SEND_TIMEOUT_S for it to take data."""


def transport_of(send: Send) -> asyncio.Transport | None:
    """The asyncio transport under an ASGI `send`, when the server exposes it.

    uvicorn's `send` is a method of its request cycle, which holds the transport; under
    another server there is none and the bounds below only stop the app's own writes.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    needed = ("abort", "get_write_buffer_size", "is_closing")
    return transport if all(hasattr(transport, name) for name in needed) else None


def drop_connection(send: Send) -> bool:
    """Aborts the connection under `send`; returns whether it could.

    `abort()`, not `close()`: a close waits to flush what is buffered, which a client that
    does not read never lets happen.
    """
    transport = transport_of(send)
    if transport is None:
        return False
    transport.abort()
    return True


_watchdogs: set[asyncio.Task[None]] = set()


def watch_unsent(send: Send, timeout: float, what: str) -> None:
    """Drops the connection if what is still buffered for it stops draining.

    A reply that fits in the connection's buffers completes at once from the app's side,
    and the server then holds it (and the connection) until the client reads: forever for
    a client that never does. Checked every `timeout` seconds; a check that finds the
    buffer no smaller than the last drops the connection.
    """
    transport = transport_of(send)
    if timeout <= 0 or transport is None or not transport.get_write_buffer_size():
        return
    task = asyncio.get_running_loop().create_task(drop_when_undrained(transport, timeout, what))
    _watchdogs.add(task)
    task.add_done_callback(_watchdogs.discard)


async def drop_when_undrained(transport: asyncio.Transport, timeout: float, what: str) -> None:
    last = transport.get_write_buffer_size()
    while True:
        await asyncio.sleep(timeout)
        size = transport.get_write_buffer_size()
        if not size:
            return  # drained, or closed
        if size >= last:
            transport.abort()
            logger.warning(
                "%s: the client took none of the last %d bytes for %g s; connection dropped",
                what,
                size,
                timeout,
            )
            return
        last = size


def bounded_send(send: Send, timeout: float) -> Send:
    """`send`, but a write the client leaves waiting for `timeout` seconds drops it.

    The server's `send` only waits when the connection's write buffer is full, that is
    when the client stopped taking data; a reader that makes progress is never cut.
    """
    if timeout <= 0:
        return send

    async def send_bounded(message: Mapping[str, Any]) -> None:
        try:
            async with asyncio.timeout(timeout):
                await send(message)
        except TimeoutError:
            dropped = drop_connection(send)
            await asyncio.sleep(0)  # lets the server see the connection lost
            raise ClientStalled(
                f"the client took no data for {timeout:g} s"
                + ("; connection dropped" if dropped else "")
            ) from None

    return send_bounded


class GatewayASGIHandler(ASGIHandler):
    """Django's handler for the /v1 and /v2 inference paths, without per-request threads.

    Django wraps every request in a ThreadSensitiveContext so that sync code of one
    request runs in one thread; the gateway's views are async and reach the database
    only through `sync_to_async(thread_sensitive=False)`, so that context only costs a
    fresh thread per request (profiled: two thread starts per request, a third of the
    gateway's CPU). The request signals' connection housekeeping is scoped to the
    console's handler for the same reason (see gateway.apps).
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"the gateway serves HTTP only, not {scope['type']}")
        await self.handle(scope, receive, send)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Django 5.2's ASGIHandler.handle, but closing the response inline.

        Django closes every response through `sync_to_async`, i.e. in one shared
        thread that must win the GIL back from the busy event loop (a 5 ms switch
        interval): measured, that capped the gateway near 200 requests/s whatever
        the concurrency. A gateway response holds no sync resources (a file's
        content holds a store handle, an upload its temporary file: both close quickly)
        and no request signal receiver is registered for this handler, so closing inline
        is safe.
        """
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        await signals.request_started.asend(sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            assert error_response is not None  # create_request returns one or the other
            body_file.close()
            await self.send_response(error_response, send)
            error_response.close()
            return

        timeout = settings.MANTLE_SEND_TIMEOUT_S
        bounded = bounded_send(send, timeout)

        def what(response: Any) -> str:
            client = scope.get("client") or ("?", 0)
            request_id = response.get("x-request-id", "?") if response is not None else "?"
            return f"{scope.get('method')} {scope.get('path')} from {client[0]} ({request_id})"

        async def process_request() -> Any:
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, bounded)
            except asyncio.CancelledError:
                pass  # a client that went away while the response was sent is no error
            except ClientStalled as exc:
                logger.warning("%s: %s", what(response), exc)
                # A stream's relay is closed now: the worker is told to stop and the
                # request is settled for what was generated.
                aclose_stream = getattr(response, "aclose_stream", None)
                if aclose_stream is not None:
                    await aclose_stream()
            else:
                watch_unsent(send, timeout, what(response))
            return response

        listener = asyncio.create_task(self.listen_for_disconnect(receive))
        worker = asyncio.create_task(process_request())
        await asyncio.wait((listener, worker), return_when=asyncio.FIRST_COMPLETED)
        for task in (listener, worker):
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass  # the client went away
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()  # lets the view (or SSE generator) see the cancellation
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            response = worker.result()
        except asyncio.CancelledError:
            await signals.request_finished.asend(sender=self.__class__)
        else:
            response.close()
        body_file.close()

    def create_request(self, scope: Mapping[str, Any], body_file: Any) -> tuple[Any, Any]:
        """Django's, but a body that came without Content-Length (chunked, or HTTP/2 frames)
        gets the length it had once read whole. Django's multipart parser reads nothing of a
        body whose Content-Length is missing, so a chunked upload (POST /v1/files) would
        look empty; the body limit has bounded it already."""
        request, error_response = super().create_request(scope, body_file)
        if request is not None and not request.META.get("CONTENT_LENGTH"):
            size = body_file.seek(0, io.SEEK_END)
            body_file.seek(0)
            if size:
                request.META["CONTENT_LENGTH"] = str(size)
        return request, error_response


gateway_application = GatewayASGIHandler()


async def route(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"].startswith(GATEWAY_PREFIXES):
        await gateway_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)


UPLOAD_PATH = re.compile(r"^/api/v1/organizations/(?P<organization_id>[^/]+)/compile-jobs/upload$")
FILES_PATH = "/v1/files"
CONSOLE_BATCH_FILE_PATH = re.compile(r"^/console/o/(?P<organization_id>[^/]+)/batches/upload/$")


async def upload_limit_for(scope: Mapping[str, Any]) -> BodyLimit:
    """An upload's own limit for a caller that may upload (a compile upload, a file of the
    Files API, a batch's input file in the console); anyone and anything else the default."""
    if scope.get("method") != "POST":
        return default_limit()
    # Imported here: the catalog's API, the gateway and the console need Django's apps
    # ready, which they are only once the ASGI application has been built.
    if scope.get("path") == FILES_PATH:
        from gateway.endpoints.files import upload_body_limit as file_body_limit

        return await file_body_limit(scope) or default_limit()
    console_upload = CONSOLE_BATCH_FILE_PATH.match(scope.get("path", ""))
    if console_upload is not None:
        from console.views.batches import upload_body_limit as console_body_limit

        limit = await console_body_limit(scope, console_upload["organization_id"])
        return limit or default_limit()
    match = UPLOAD_PATH.match(scope.get("path", ""))
    if match is None:
        return default_limit()
    from catalog.compile_api import upload_body_limit

    return await upload_body_limit(scope, match["organization_id"]) or default_limit()


# Bodies are bounded before either handler reads (and spools) them: core/body_limit.py.
application = bounded_body(route, upload_limit_for)


def _settle_the_heap() -> None:
    """Imports every view now (the URLconf is otherwise imported by the first request) and
    moves what the process holds after start-up out of the cyclic collector's sight.

    A gateway process holds about 220,000 objects once its apps are imported (Django,
    pydantic models, the billing, PDF and sign-in libraries); a full collection over them
    takes over 100 ms, and one came every few hundred requests, stalling every request in
    flight on the process's event loop. Frozen, they are never scanned again (they live as
    long as the process); what requests allocate is collected as before."""
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - the import is the point
    gc.collect()
    gc.freeze()


_settle_the_heap()
