"""The /v1 OpenAPI document, generated from gateway.protocol's types, at GET /v1/openapi.json.

Public (no key), like the OpenAI specification itself: it says nothing that the API's
replies do not. Built once per process and served from memory.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse
from pydantic import TypeAdapter

from gateway import protocol
from gateway.pipeline import require_method
from gateway.replies import gateway_view

REF_TEMPLATE = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    reply: Any  # a protocol type
    body: Any = None  # a protocol request model, for operations that take a body
    stream_chunk: Any = None  # the protocol type of each `data:` line when `stream` is true
    path_parameter: str | None = None


# What gateway/urls.py routes, endpoint by endpoint.
OPERATIONS = (
    Operation("get", "/v1/models", "The models the key may call", protocol.ModelList),
    Operation(
        "get",
        "/v1/models/{model_id}",
        "One model, by endpoint id or public name",
        protocol.Model,
        path_parameter="model_id",
    ),
    Operation(
        "post",
        "/v1/chat/completions",
        "A chat completion",
        protocol.ChatCompletion,
        body=protocol.ChatCompletionRequest,
        stream_chunk=protocol.ChatCompletionChunk,
    ),
    Operation(
        "post",
        "/v1/completions",
        "A text completion",
        protocol.Completion,
        body=protocol.CompletionRequest,
        stream_chunk=protocol.CompletionChunk,
    ),
    Operation(
        "post",
        "/v1/embeddings",
        "Embeddings of texts or token ids",
        protocol.EmbeddingList,
        body=protocol.EmbeddingRequest,
    ),
)


def _name(kind: Any) -> str:
    return str(kind.__name__)


def document() -> dict[str, Any]:
    """The document (OpenAPI 3.1: its schemas are JSON Schema 2020-12, as pydantic writes),
    built afresh: the view serves one copy, serialized once."""
    inputs: list[tuple[str, Any, TypeAdapter[Any]]] = [
        (_name(protocol.ErrorResponse), "serialization", TypeAdapter(protocol.ErrorResponse))
    ]
    for op in OPERATIONS:
        inputs.append((_name(op.reply), "serialization", TypeAdapter(op.reply)))
        if op.body is not None:
            inputs.append((_name(op.body), "validation", TypeAdapter(op.body)))
        if op.stream_chunk is not None:
            inputs.append((_name(op.stream_chunk), "serialization", TypeAdapter(op.stream_chunk)))
    refs, definitions = TypeAdapter.json_schemas(inputs, ref_template=REF_TEMPLATE)
    ref = {key: schema for (key, _), schema in refs.items()}
    error = _name(protocol.ErrorResponse)
    errors = {
        "default": {
            "description": "an OpenAI-shaped error",
            "content": {"application/json": {"schema": ref[error]}},
        }
    }
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        content: dict[str, Any] = {"application/json": {"schema": ref[_name(op.reply)]}}
        description = op.summary
        if op.stream_chunk is not None:
            chunk = _name(op.stream_chunk)
            content["text/event-stream"] = {"schema": _event(ref[chunk], ref[error])}
            description += (
                f" (with `stream`: an event stream of `data: <{chunk}>` lines, then "
                "`data: [DONE]`; an error after the start is one `data: <ErrorResponse>`)"
            )
        operation: dict[str, Any] = {
            "summary": op.summary,
            "responses": {"200": {"description": description, "content": content}, **errors},
            "security": [{"bearer": []}],
        }
        if op.path_parameter is not None:
            operation["parameters"] = [
                {
                    "name": op.path_parameter,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                }
            ]
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref[_name(op.body)]}},
            }
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Mantle /v1 (OpenAI-compatible)", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": definitions.get("$defs", {}),
        },
        "paths": paths,
    }


def _event(chunk: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event of a stream (JSON Schema's contentMediaType and contentSchema
    describe the JSON inside its `data`): a chunk, an error, or the final `[DONE]`."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [chunk, error]},
                    },
                    {"const": "[DONE]"},
                ]
            }
        },
    }


@functools.cache
def _document_json() -> bytes:
    return json.dumps(document()).encode()


@gateway_view
async def openapi_document(request: HttpRequest) -> HttpResponse:
    require_method(request, "GET")
    return HttpResponse(_document_json(), content_type="application/json")
