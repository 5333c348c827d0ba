"""Pieces of reply that the text-generation endpoints (chat, completions) share."""

from __future__ import annotations

from catalog.specs import EndpointSpec
from gateway.pipeline import Generation
from gateway.protocol import Usage


def usage(generation: Generation) -> Usage:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": generation.cached_tokens},
    }


def system_fingerprint(spec: EndpointSpec) -> str:
    """The model version's artifact, as OpenAI names the backend configuration."""
    return f"fp_{spec.sha256[:10]}"
