"""Routes of the /v1 OpenAI-compatible API: one module per endpoint family."""

from __future__ import annotations

from django.urls import path, re_path

from gateway.endpoints import batches, chat, completions, embeddings, files, models, responses
from gateway.openapi import openapi_document
from gateway.replies import no_route

urlpatterns = [
    path("openapi.json", openapi_document, name="v1-openapi"),
    path("models", models.list_models, name="v1-models"),
    # Any model id, newlines included (`<path:>` stops at one, and the reply would be HTML).
    re_path(r"^models/(?P<model_id>[\s\S]+)$", models.retrieve_model, name="v1-model"),
    path("chat/completions", chat.chat_completions, name="v1-chat-completions"),
    path("completions", completions.completions, name="v1-completions"),
    path("embeddings", embeddings.embeddings, name="v1-embeddings"),
    path("responses", responses.responses, name="v1-responses"),
    re_path(
        r"^responses/(?P<response_id>[^/]+)/input_items$",
        responses.input_items,
        name="v1-response-input-items",
    ),
    re_path(r"^responses/(?P<response_id>[^/]+)$", responses.response, name="v1-response"),
    path("files", files.files_root, name="v1-files"),
    re_path(r"^files/(?P<file_id>[^/]+)/content$", files.file_content, name="v1-file-content"),
    re_path(r"^files/(?P<file_id>[^/]+)$", files.file_detail, name="v1-file"),
    path("batches", batches.batches, name="v1-batches"),
    re_path(r"^batches/(?P<batch_id>[^/]+)/cancel$", batches.cancel, name="v1-batch-cancel"),
    re_path(r"^batches/(?P<batch_id>[^/]+)$", batches.batch, name="v1-batch"),
    # Last: whatever the others do not match (Django cannot reverse an inline `(?s)`).
    re_path(r"^[\s\S]*$", no_route, name="v1-no-route"),
]
