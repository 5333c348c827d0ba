"""ASGI entry point (uvicorn config.asgi:application), serving gateway, API and console."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from django.core import signals
from django.core.asgi import get_asgi_application
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import set_script_prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

django_application = get_asgi_application()

GATEWAY_PREFIXES = ("/v1/", "/v2/")


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
        the concurrency. A gateway response holds no sync resources and no request
        signal receiver is registered for this handler, so closing inline is safe.
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

        async def process_request() -> Any:
            response = await self.run_get_response(request)
            # A client that went away while the response was sent is no error.
            with contextlib.suppress(asyncio.CancelledError):
                await self.send_response(response, send)
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


gateway_application = GatewayASGIHandler()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"].startswith(GATEWAY_PREFIXES):
        await gateway_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)
