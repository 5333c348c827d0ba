"""The schemas the agent benchmarks share (bench/agent_engine.py, bench/grammar_engines.py)."""

from __future__ import annotations

from typing import Any

TEN_FIELDS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "email": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "height_m": {"type": "number"},
        "active": {"type": "boolean"},
        "city": {"type": "string"},
        "country": {"type": "string", "enum": ["FR", "DE", "US", "JP", "CN"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "score": {"type": "number"},
        "notes": {"type": ["string", "null"]},
    },
    "required": [
        "name",
        "email",
        "age",
        "height_m",
        "active",
        "city",
        "country",
        "tags",
        "score",
        "notes",
    ],
    "additionalProperties": False,
}
"""A typical 10-field object: every JSON type, an enum, an array, a nullable field."""
