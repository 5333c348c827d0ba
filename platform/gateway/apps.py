"""Gateway: the /v1 OpenAI-compatible API (auth, limits, admission, dispatch, SSE)."""

from __future__ import annotations

from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"
