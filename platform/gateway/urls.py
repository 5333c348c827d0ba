"""Routes of the /v1 OpenAI-compatible API."""

from __future__ import annotations

from django.urls import path, re_path

from gateway import views

urlpatterns = [
    path("models", views.list_models, name="v1-models"),
    # Any model id, newlines included (`<path:>` stops at one, and the reply would be HTML).
    re_path(r"^models/(?P<model_id>[\s\S]+)$", views.retrieve_model, name="v1-model"),
    path("chat/completions", views.chat_completions, name="v1-chat-completions"),
    path("completions", views.completions, name="v1-completions"),
    path("embeddings", views.embeddings, name="v1-embeddings"),
    # Last: whatever the others do not match (Django cannot reverse an inline `(?s)`).
    re_path(r"^[\s\S]*$", views.no_route, name="v1-no-route"),
]
