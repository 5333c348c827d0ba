"""The /v1 OpenAPI document, generated from gateway.protocol's types, at GET /v1/openapi.json.

Public (no key), like the OpenAI specification itself: it says nothing that the API's
replies do not. Built once per process and served from memory.
"""

from __future__ import annotations

import functools
import json
import typing
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse
from pydantic import TypeAdapter

from gateway import protocol, protocol_responses
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
    # Typed events instead (`event: <type>` and `data: <event>`, the Responses API's stream).
    stream_events: tuple[Any, ...] = ()
    path_parameter: str | None = None
    query_parameters: tuple[dict[str, Any], ...] = ()
    body_media_type: str = "application/json"
    # The reply is the bytes themselves (`reply` is then None).
    binary_reply: bool = False


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
    Operation(
        "post",
        "/v1/responses",
        "A response (the Responses API), stored unless `store` is false",
        protocol_responses.Response,
        body=protocol_responses.ResponseCreateRequest,
        stream_events=typing.get_args(protocol_responses.StreamEvent),
    ),
    Operation(
        "get",
        "/v1/responses/{response_id}",
        "A stored response",
        protocol_responses.Response,
        path_parameter="response_id",
    ),
    Operation(
        "delete",
        "/v1/responses/{response_id}",
        "Deletes a stored response",
        protocol_responses.ResponseDeleted,
        path_parameter="response_id",
    ),
    Operation(
        "get",
        "/v1/responses/{response_id}/input_items",
        "The input items of a stored response (a previous response's included)",
        protocol_responses.ResponseItemList,
        path_parameter="response_id",
        query_parameters=(
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": protocol_responses.LIST_MAX_LIMIT,
                    "default": protocol_responses.LIST_DEFAULT_LIMIT,
                },
            },
            {
                "name": "order",
                "in": "query",
                "required": False,
                "schema": {"enum": ["asc", "desc"], "default": "desc"},
            },
            {
                "name": "after",
                "in": "query",
                "required": False,
                "description": "an item id: the page starts after it",
                "schema": {"type": "string"},
            },
        ),
    ),
    Operation(
        "post",
        "/v1/files",
        "Uploads a file (purpose `batch` or `user_data`)",
        protocol.FileObject,
        body=protocol.FileCreateRequest,
        body_media_type="multipart/form-data",
    ),
    Operation(
        "get",
        "/v1/files",
        "The organization's files, newest first unless `order` is `asc`",
        protocol.FileList,
        query_parameters=(
            {
                "name": "purpose",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "maxLength": 64},
            },
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": protocol.FILE_LIST_MAX_LIMIT,
                    "default": protocol.FILE_LIST_MAX_LIMIT,
                },
            },
            {
                "name": "order",
                "in": "query",
                "required": False,
                "schema": {"enum": ["asc", "desc"], "default": "desc"},
            },
            {
                "name": "after",
                "in": "query",
                "required": False,
                "description": "a file id: the page starts after it",
                "schema": {"type": "string"},
            },
        ),
    ),
    Operation(
        "get", "/v1/files/{file_id}", "A file", protocol.FileObject, path_parameter="file_id"
    ),
    Operation(
        "delete",
        "/v1/files/{file_id}",
        "Deletes a file",
        protocol.FileDeleted,
        path_parameter="file_id",
    ),
    Operation(
        "get",
        "/v1/files/{file_id}/content",
        "A file's bytes",
        None,
        path_parameter="file_id",
        binary_reply=True,
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
        if op.reply is not None:
            inputs.append((_name(op.reply), "serialization", TypeAdapter(op.reply)))
        if op.body is not None:
            inputs.append((_name(op.body), "validation", TypeAdapter(op.body)))
        if op.stream_chunk is not None:
            inputs.append((_name(op.stream_chunk), "serialization", TypeAdapter(op.stream_chunk)))
        for event in op.stream_events:
            inputs.append((_name(event), "serialization", TypeAdapter(event)))
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
        content: dict[str, Any] = (
            {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
            if op.binary_reply
            else {"application/json": {"schema": ref[_name(op.reply)]}}
        )
        description = op.summary
        if op.stream_chunk is not None:
            chunk = _name(op.stream_chunk)
            content["text/event-stream"] = {"schema": _event(ref[chunk], ref[error])}
            description += (
                f" (with `stream`: an event stream of `data: <{chunk}>` lines, then "
                "`data: [DONE]`; an error after the start is one `data: <ErrorResponse>`)"
            )
        if op.stream_events:
            content["text/event-stream"] = {
                "schema": _typed_event([ref[_name(e)] for e in op.stream_events], op.stream_events)
            }
            description += (
                " (with `stream`: typed server-sent events, `event: <type>` and "
                "`data: <the event>`; an error after the start is an `error` event, then "
                "`response.failed`)"
            )
        operation: dict[str, Any] = {
            "summary": op.summary,
            "responses": {"200": {"description": description, "content": content}, **errors},
            "security": [{"bearer": []}],
        }
        parameters: list[dict[str, Any]] = []
        if op.path_parameter is not None:
            parameters.append(
                {
                    "name": op.path_parameter,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1},
                }
            )
        parameters += op.query_parameters
        if parameters:
            operation["parameters"] = parameters
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {op.body_media_type: {"schema": ref[_name(op.body)]}},
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


def _typed_event(events: list[dict[str, Any]], kinds: tuple[Any, ...]) -> dict[str, Any]:
    """One typed server-sent event: its `event` names the type, its `data` is the event as
    JSON (the same `type` inside)."""
    names = [typing.get_args(typing.get_type_hints(kind)["type"])[0] for kind in kinds]
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"enum": names},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": events},
            },
        },
    }


@functools.cache
def _document_json() -> bytes:
    return json.dumps(document()).encode()


@gateway_view
async def openapi_document(request: HttpRequest) -> HttpResponse:
    require_method(request, "GET")
    return HttpResponse(_document_json(), content_type="application/json")
