"""The OpenAPI document of the gateway's /v2 as it behaves: requests, replies and errors.

`DOCUMENT_V2` is the /v2 open inference protocol (KServe / Triton v2, JSON) of
platform/gateway/v2.py, with its errors `{"error": "<message>", "code", "param"}`. The /v1
document is not kept here: the gateway generates it from its protocol types and serves it
(GET /v1/openapi.json, platform/gateway/openapi.py).
"""

from __future__ import annotations

from typing import Any


def _closed(**properties: Any) -> dict[str, Any]:
    """An object with exactly these members, all required (the /v2 replies are exact)."""
    return {
        "type": "object",
        "required": list(properties),
        "additionalProperties": False,
        "properties": properties,
    }


# --- /v2: the open inference protocol (KServe / Triton v2, JSON) ----------------------------

# The protocol's error, `{"error": "<message>"}`, plus Mantle's `code` and `param`
# (gateway/v2.py `_error`): always all three members, nothing else.


V2_ERROR = {
    "type": "object",
    "required": ["error", "code", "param"],
    "additionalProperties": False,
    "properties": {
        "error": {"type": "string", "minLength": 1},
        "code": {"type": ["string", "null"]},
        "param": {"type": ["string", "null"]},
    },
}
_V2_ERRORS = {
    "default": {
        "description": "the protocol's error object",
        "content": {"application/json": {"schema": V2_ERROR}},
    }
}
# What the protocol names; BYTES is refused by name (400), the others map to numpy dtypes.
V2_DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
_V2_PARAMETERS = {"type": ["object", "null"]}
_V2_TENSOR_METADATA = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "datatype": {"enum": V2_DATATYPES},
        # -1: a dynamic dimension
        "shape": {"type": "array", "items": {"type": "integer", "minimum": -1}},
    },
}
V2_MODEL_METADATA = {
    "type": "object",
    "required": ["name", "versions", "platform", "inputs", "outputs"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "versions": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "platform": {"const": "onnxruntime_onnx"},
        "inputs": {"type": "array", "items": _V2_TENSOR_METADATA},
        "outputs": {"type": "array", "items": _V2_TENSOR_METADATA},
    },
}
_V2_NUMBERS = {"type": "array", "items": {"type": ["number", "boolean"]}}
# As gateway/v2.py `V2InferRequest` takes it (pydantic, extra members refused): a body this
# admits gets past parsing to the checks against the model's inputs (names, datatype,
# rank, fixed dimensions, element count, values that fit the datatype).
V2_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": ["string", "null"], "maxLength": 256},
        "parameters": _V2_PARAMETERS,
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 64,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype", "data"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 256},
                    "shape": {
                        "type": "array",
                        "maxItems": 16,
                        "items": {"type": "integer", "minimum": 0},
                    },
                    "datatype": {"enum": V2_DATATYPES},
                    "parameters": _V2_PARAMETERS,
                    # Flat (row-major) or nested.
                    "data": {
                        "anyOf": [_V2_NUMBERS, {"type": "array", "items": _V2_NUMBERS}],
                    },
                },
            },
        },
        "outputs": {
            "type": ["array", "null"],
            "maxItems": 64,
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 256},
                    "parameters": _V2_PARAMETERS,
                },
            },
        },
    },
}
V2_INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "model_version", "id", "outputs"],
    "additionalProperties": False,
    "properties": {
        "model_name": {"type": "string", "minLength": 1},
        "model_version": {"type": "string", "minLength": 1},
        "id": {"type": "string"},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape", "data"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "datatype": {"enum": V2_DATATYPES},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    # Flat, row-major, as the protocol specifies; a non-finite float as the
                    # protobuf JSON mapping writes it (JSON has no NaN or infinities).
                    "data": {
                        "type": "array",
                        "items": {
                            "anyOf": [
                                {"type": ["number", "boolean"]},
                                {"enum": ["NaN", "Infinity", "-Infinity"]},
                            ]
                        },
                    },
                },
            },
        },
    },
}
V2_READY = _closed(name={"type": "string", "minLength": 1}, ready={"const": True})
V2_NOT_READY = _closed(
    name={"type": "string", "minLength": 1},
    ready={"const": False},
    reason={"type": "string", "minLength": 1},
)


def _json_reply(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _v2_path_parameters(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for n in names
    ]


def _v2_get(reply: dict[str, Any], *path_parameters: str, keyed: bool = True) -> dict[str, Any]:
    operation: dict[str, Any] = {"responses": {"200": reply, **_V2_ERRORS}}
    if path_parameters:
        operation["parameters"] = _v2_path_parameters(*path_parameters)
    if keyed:
        operation["security"] = [{"bearer": []}]
    return {"get": operation}


def _v2_ready(*path_parameters: str) -> dict[str, Any]:
    operation = _v2_get(_json_reply("ready", V2_READY), *path_parameters)
    operation["get"]["responses"]["400"] = _json_reply(
        "not ready: the endpoint is paused, or no worker of its pool is live", V2_NOT_READY
    )
    return operation


def _v2_infer(*path_parameters: str) -> dict[str, Any]:
    return {
        "post": {
            "parameters": _v2_path_parameters(*path_parameters),
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": V2_INFER_REQUEST}},
            },
            "responses": {"200": _json_reply("the outputs", V2_INFER_RESPONSE), **_V2_ERRORS},
            "security": [{"bearer": []}],
        }
    }


_V2_METADATA = _json_reply("the model's metadata", V2_MODEL_METADATA)

DOCUMENT_V2: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Mantle /v2 (open inference protocol, JSON)", "version": "2"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        # `GET /v2` answers 301 to this (APPEND_SLASH); the view sits at `/v2/`.
        "/v2/": _v2_get(
            _json_reply(
                "server metadata",
                _closed(
                    name={"const": "mantle"},
                    version={"type": "string"},
                    extensions={"type": "array", "items": {"type": "string"}},
                ),
            ),
            keyed=False,
        ),
        "/v2/health/live": _v2_get(
            _json_reply("live", _closed(live={"const": True})),
            keyed=False,
        ),
        "/v2/health/ready": _v2_get(
            _json_reply("ready", _closed(ready={"const": True})),
            keyed=False,
        ),
        "/v2/models": _v2_get(
            _json_reply(
                "the tensor models the key may call",
                _closed(
                    models={
                        "type": "array",
                        "items": _closed(
                            name={"type": "string", "minLength": 1},
                            version={"type": "string", "minLength": 1},
                            state={"enum": ["READY", "PAUSED"]},
                        ),
                    }
                ),
            )
        ),
        "/v2/models/{name}": _v2_get(_V2_METADATA, "name"),
        "/v2/models/{name}/ready": _v2_ready("name"),
        "/v2/models/{name}/infer": _v2_infer("name"),
        "/v2/models/{name}/versions/{version}": _v2_get(_V2_METADATA, "name", "version"),
        "/v2/models/{name}/versions/{version}/ready": _v2_ready("name", "version"),
        "/v2/models/{name}/versions/{version}/infer": _v2_infer("name", "version"),
    },
}
