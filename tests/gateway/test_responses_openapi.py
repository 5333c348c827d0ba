"""The Responses API in the /v1 OpenAPI document: its four operations, the typed event
stream, the bounds the gateway enforces, and closed replies in wire order."""

from __future__ import annotations

from typing import Any

import schemathesis

from gateway import protocol_responses
from gateway.openapi import document

OPERATIONS = {
    ("/v1/responses", "post"): "Response",
    ("/v1/responses/{response_id}", "get"): "Response",
    ("/v1/responses/{response_id}", "delete"): "ResponseDeleted",
    ("/v1/responses/{response_id}/input_items", "get"): "ResponseItemList",
}
EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "response.completed",
    "response.incomplete",
    "error",
    "response.failed",
]


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def test_the_operations_with_their_replies_bodies_and_parameters() -> None:
    paths = document()["paths"]
    for (path, method), reply in OPERATIONS.items():
        operation = paths[path][method]
        ok = operation["responses"]["200"]["content"]
        assert ok["application/json"]["schema"] == ref(reply)
        error = operation["responses"]["default"]["content"]["application/json"]["schema"]
        assert error == ref("ErrorResponse")
        assert operation["security"] == [{"bearer": []}]
        assert ("requestBody" in operation) is (method == "post")
        assert ("text/event-stream" in ok) is (method == "post")
    create = paths["/v1/responses"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body == ref("ResponseCreateRequest")
    listing = paths["/v1/responses/{response_id}/input_items"]["get"]
    assert [(p["name"], p["in"]) for p in listing["parameters"]] == [
        ("response_id", "path"),
        ("limit", "query"),
        ("order", "query"),
        ("after", "query"),
    ]
    assert listing["parameters"][1]["schema"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "default": 20,
    }
    loaded = schemathesis.openapi.from_dict(document())
    labels = {r.ok().label for r in loaded.get_all_operations()}
    assert {f"{m.upper()} {p}" for p, m in OPERATIONS} <= labels


def test_the_stream_is_typed_events_in_wire_order() -> None:
    create = document()["paths"]["/v1/responses"]["post"]
    schema = create["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert schema["required"] == ["event", "data"]
    assert schema["properties"]["event"] == {"enum": EVENTS}
    data = schema["properties"]["data"]
    assert data["contentMediaType"] == "application/json"
    names = [e.__name__ for e in protocol_responses.StreamEvent.__args__]
    assert data["contentSchema"] == {"anyOf": [ref(n) for n in names]}
    schemas: dict[str, Any] = document()["components"]["schemas"]
    for name in names:
        assert schemas[name]["additionalProperties"] is False
        assert list(schemas[name]["properties"])[:2] == ["type", "sequence_number"]


def test_request_bounds_are_the_limits_the_gateway_enforces() -> None:
    schemas: dict[str, Any] = document()["components"]["schemas"]
    request = schemas["ResponseCreateRequest"]
    assert request["additionalProperties"] is False
    assert request["required"] == ["model", "input"]
    props = request["properties"]
    items, text = props["input"]["anyOf"]
    assert (items["minItems"], items["maxItems"]) == (1, protocol_responses.INPUT_MAX_ITEMS)
    assert text == {"type": "string", "maxLength": protocol_responses.TEXT_MAX_CHARS}
    assert props["model"]["maxLength"] == 256
    assert props["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 2}
    assert props["max_output_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert props["tools"]["anyOf"][0]["maxItems"] == 128
    assert props["include"]["anyOf"][0]["maxItems"] == 0
    assert props["truncation"]["anyOf"][0]["const"] == "disabled"
    assert schemas["InputMessage"]["properties"]["role"]["enum"] == [
        "user",
        "system",
        "developer",
        "assistant",
    ]
    assert schemas["FormatJSONSchema"]["required"] == ["type", "name", "schema"]


def test_the_response_object_is_closed_and_in_wire_order() -> None:
    schemas: dict[str, Any] = document()["components"]["schemas"]
    response = schemas["Response"]
    assert response["additionalProperties"] is False
    assert list(response["properties"]) == list(protocol_responses.Response.__annotations__)
    assert "output_text" not in response["properties"]  # the SDKs compute it
    assert set(response["required"]) == set(response["properties"])
