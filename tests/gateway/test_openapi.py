"""The /v1 OpenAPI document: generated from the protocol types, served without a key, and
describing every route with its body, its reply and OpenAI's error."""

from __future__ import annotations

from typing import Any

import schemathesis
from django.test import Client

from gateway import protocol
from gateway.openapi import document

OPERATIONS: dict[str, str | None] = {
    "GET /v1/models": "ModelList",
    "GET /v1/models/{model_id}": "Model",
    "POST /v1/chat/completions": "ChatCompletion",
    "POST /v1/completions": "Completion",
    "POST /v1/embeddings": "EmbeddingList",
    "POST /v1/responses": "Response",
    "GET /v1/responses/{response_id}": "Response",
    "DELETE /v1/responses/{response_id}": "ResponseDeleted",
    "GET /v1/responses/{response_id}/input_items": "ResponseItemList",
    "POST /v1/files": "FileObject",
    "GET /v1/files": "FileList",
    "GET /v1/files/{file_id}": "FileObject",
    "DELETE /v1/files/{file_id}": "FileDeleted",
    "GET /v1/files/{file_id}/content": None,  # the bytes: application/octet-stream
}
# The Responses API streams typed events (no [DONE]): tests/gateway/test_responses_openapi.py.
TYPED_STREAMS = {"POST /v1/responses"}
STREAMS = {
    "POST /v1/chat/completions": "ChatCompletionChunk",
    "POST /v1/completions": "CompletionChunk",
}
BODIES = {
    "POST /v1/chat/completions": "ChatCompletionRequest",
    "POST /v1/completions": "CompletionRequest",
    "POST /v1/embeddings": "EmbeddingRequest",
    "POST /v1/responses": "ResponseCreateRequest",
    "POST /v1/files": "FileCreateRequest",
}
MULTIPART = {"POST /v1/files"}


def test_served_without_a_key_as_built() -> None:
    response = Client().get("/v1/openapi.json")
    assert response.status_code == 200
    assert response["content-type"] == "application/json"
    assert response.json() == document()
    assert Client().get("/v1/openapi.json").content == response.content


def test_other_methods_are_openai_shaped_405s() -> None:
    response = Client().post("/v1/openapi.json")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def test_every_route_with_its_body_reply_and_errors() -> None:
    doc = document()
    operations = {
        f"{method.upper()} {path}": operation
        for path, item in doc["paths"].items()
        for method, operation in item.items()
    }
    assert set(operations) == set(OPERATIONS)
    for label, operation in operations.items():
        ok = operation["responses"]["200"]["content"]
        reply = OPERATIONS[label]
        if reply is None:
            assert ok == {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        else:
            assert ok["application/json"]["schema"] == ref(reply)
        error = operation["responses"]["default"]["content"]["application/json"]["schema"]
        assert error == ref("ErrorResponse")
        assert operation["security"] == [{"bearer": []}]
        if label in BODIES:
            body = operation["requestBody"]
            assert body["required"] is True
            media = "multipart/form-data" if label in MULTIPART else "application/json"
            assert body["content"] == {media: {"schema": ref(BODIES[label])}}
        else:
            assert "requestBody" not in operation
        if label in TYPED_STREAMS:
            assert "text/event-stream" in ok
            continue
        chunk = STREAMS.get(label)
        assert ("text/event-stream" in ok) is (chunk is not None)
        if chunk is not None:
            # Each event's data: a chunk or an error as JSON, or the final [DONE].
            data = ok["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
            assert data[0]["contentMediaType"] == "application/json"
            assert data[0]["contentSchema"] == {"anyOf": [ref(chunk), ref("ErrorResponse")]}
            assert data[1] == {"const": "[DONE]"}
    loaded = schemathesis.openapi.from_dict(doc)
    assert {r.ok().label for r in loaded.get_all_operations()} == set(OPERATIONS)


def test_request_schemas_are_the_validations_own() -> None:
    schemas: dict[str, Any] = document()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False
    assert chat["required"] == ["model", "messages"]
    assert chat["properties"]["temperature"]["anyOf"][0] == {
        "type": "number",
        "minimum": 0,
        "maximum": 2,
    }
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == [
        "system",
        "developer",
        "user",
        "assistant",
        "tool",
    ]
    assert schemas["EmbeddingRequest"]["properties"]["encoding_format"]["enum"] == [
        "float",
        "base64",
    ]


def test_reply_schemas_are_closed_and_in_wire_order() -> None:
    schemas: dict[str, Any] = document()["components"]["schemas"]
    for name in ("ChatCompletion", "ChatCompletionChunk", "Completion", "EmbeddingList"):
        assert schemas[name]["additionalProperties"] is False
    assert list(schemas["ChatCompletion"]["properties"]) == list(
        protocol.ChatCompletion.__annotations__
    )
    assert list(schemas["ChatCompletion"]["properties"]) == [
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
        "service_tier",
    ]
    assert schemas["ErrorObject"]["required"] == ["message", "type", "param", "code"]
    # The usage chunk of a completion stream has no system_fingerprint; every chat chunk has.
    assert "system_fingerprint" not in schemas["CompletionChunk"]["required"]
    assert "system_fingerprint" in schemas["ChatCompletionChunk"]["required"]


def test_the_documents_bounds_are_the_limits_the_gateway_enforces() -> None:
    """The fuzz tests draw from the served document, which is generated from the code under
    test: pin the bounds here, so a validation that loosens by accident cannot loosen the
    fuzzing with it unnoticed."""
    schemas: dict[str, Any] = document()["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest"):
        props = schemas[name]["properties"]
        assert props["model"] == {
            "maxLength": 256,
            "minLength": 1,
            "title": "Model",
            "type": "string",
        }
        assert props["user"]["anyOf"][0] == {"maxLength": 256, "type": "string"}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        assert props["max_tokens"]["anyOf"][0] == {"minimum": 1, "type": "integer"}
        assert props["top_p"]["anyOf"][0] == {"exclusiveMinimum": 0, "maximum": 1, "type": "number"}
        assert props["n"]["anyOf"][0] == {"maximum": 8, "minimum": 1, "type": "integer"}
        for penalty in ("frequency_penalty", "presence_penalty"):
            assert props[penalty]["anyOf"][0] == {"maximum": 2, "minimum": -2, "type": "number"}
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["top_logprobs"]["anyOf"][0] == {"maximum": 20, "minimum": 0, "type": "integer"}
    legacy = schemas["CompletionRequest"]["properties"]
    assert legacy["logprobs"]["anyOf"][0] == {"maximum": 5, "minimum": 0, "type": "integer"}
    assert chat["max_completion_tokens"]["anyOf"][0] == {"minimum": 1, "type": "integer"}
