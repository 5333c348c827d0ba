"""Routes of the /v1 OpenAI-compatible API."""

from __future__ import annotations

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
