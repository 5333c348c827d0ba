"""Gateway: the /v1 OpenAI-compatible API (auth, limits, admission, dispatch, SSE)."""

from __future__ import annotations

from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Django closes stale DB connections (and resets query logs) on every
        # request's start and end, through sync receivers that cost a thread hop
        # each under ASGI. Only the console/API handler's requests use the
        # thread-bound connections those receivers look after; the gateway's
        # database reads run in a pooled executor with health-checked connections.
        from django.core import signals
        from django.core.handlers.asgi import ASGIHandler
        from django.db import close_old_connections, reset_queries

        for signal, receivers in (
            (signals.request_started, (reset_queries, close_old_connections)),
            (signals.request_finished, (close_old_connections,)),
        ):
            for receiver in receivers:
                signal.disconnect(receiver)
                signal.connect(receiver, sender=ASGIHandler)
