"""ASGI entry point (uvicorn config.asgi:application), serving gateway, API and console."""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIHandler

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


gateway_application = GatewayASGIHandler()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"].startswith(GATEWAY_PREFIXES):
        await gateway_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)
