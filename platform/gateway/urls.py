"""Routes of the /v1 OpenAI-compatible API."""

from __future__ import annotations

from django.urls import path

from gateway import views

urlpatterns = [
    path("models", views.list_models, name="v1-models"),
    path("models/<path:model_id>", views.retrieve_model, name="v1-model"),
    path("chat/completions", views.chat_completions, name="v1-chat-completions"),
    path("completions", views.completions, name="v1-completions"),
    path("embeddings", views.embeddings, name="v1-embeddings"),
]
