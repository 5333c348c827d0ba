"""An OpenAPI document of the /v1 gateway as it behaves (requests, replies, OpenAI's errors)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string", "minLength": 1},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
    },
}
_ERRORS = {
    "default": {
        "description": "an OpenAI-shaped error",
        "content": {"application/json": {"schema": _ERROR}},
    }
}
_SAMPLING = {
    "max_tokens": {"type": ["integer", "null"]},
    "temperature": {"type": ["number", "null"]},
    "top_p": {"type": ["number", "null"]},
    "seed": {"type": ["integer", "null"]},
    "stop": {
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
            {"type": "null"},
        ]
    },
    "stream": {"type": ["boolean", "null"]},
}
_COMPLETION_REPLY = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"enum": ["chat.completion", "text_completion"]},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "minItems": 1},
        "usage": _USAGE,
    },
}


def _post(request: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": {
                "200": {
                    "description": "the result (an event stream when `stream` is true)",
                    "content": {
                        "application/json": {"schema": reply},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_ERRORS,
            },
            "security": [{"bearer": []}],
        }
    }


MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Mantle /v1 (OpenAI-compatible)", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/v1/models": {
            "get": {
                "responses": {
                    "200": {
                        "description": "visible models",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["object", "data"],
                                    "properties": {
                                        "object": {"const": "list"},
                                        "data": {"type": "array", "items": MODEL},
                                    },
                                }
                            }
                        },
                    },
                    **_ERRORS,
                },
                "security": [{"bearer": []}],
            }
        },
        "/v1/models/{model_id}": {
            "get": {
                "parameters": [
                    {
                        "name": "model_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "one model",
                        "content": {"application/json": {"schema": MODEL}},
                    },
                    **_ERRORS,
                },
                "security": [{"bearer": []}],
            }
        },
        "/v1/chat/completions": _post(
            {
                "type": "object",
                "required": ["model", "messages"],
                "properties": {
                    "model": {"type": "string"},
                    "messages": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {
                                "role": {
                                    "enum": [
                                        "system",
                                        "developer",
                                        "user",
                                        "assistant",
                                        "tool",
                                        "wizard",
                                    ]
                                },
                                "content": {
                                    "oneOf": [
                                        {"type": "string"},
                                        {"type": "array"},
                                        {"type": "null"},
                                    ]
                                },
                            },
                        },
                    },
                    "max_completion_tokens": {"type": ["integer", "null"]},
                    "n": {"type": ["integer", "null"]},
                    **_SAMPLING,
                },
            },
            _COMPLETION_REPLY,
        ),
        "/v1/completions": _post(
            {
                "type": "object",
                "required": ["model", "prompt"],
                "properties": {
                    "model": {"type": "string"},
                    "prompt": {
                        "oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "string"}},
                            {"type": "array", "items": {"type": "integer"}},
                        ]
                    },
                    "echo": {"type": ["boolean", "null"]},
                    "suffix": {"type": ["string", "null"]},
                    **_SAMPLING,
                },
            },
            _COMPLETION_REPLY,
        ),
        "/v1/embeddings": _post(
            {
                "type": "object",
                "required": ["model", "input"],
                "properties": {
                    "model": {"type": "string"},
                    "input": {
                        "oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "string"}},
                            {"type": "array", "items": {"type": "integer"}},
                            {
                                "type": "array",
                                "items": {"type": "array", "items": {"type": "integer"}},
                            },
                        ]
                    },
                    "encoding_format": {"enum": ["float", "base64", "other"]},
                    "dimensions": {"type": ["integer", "null"]},
                },
            },
            {
                "type": "object",
                "required": ["object", "data", "model", "usage"],
                "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array"},
                    "model": {"type": "string"},
                    "usage": _USAGE,
                },
            },
        ),
    },
}
