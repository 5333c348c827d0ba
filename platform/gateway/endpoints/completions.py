"""POST /v1/completions: text (or token ids) continued, whole or streamed."""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest, HttpResponseBase

from gateway import text
from gateway.endpoints.shared import system_fingerprint, usage
from gateway.errors import invalid
from gateway.pipeline import (
    Generation,
    gather,
    parse_request,
    request_id_of,
    require_method,
    start_generation,
)
from gateway.protocol import Completion, CompletionChunk, CompletionRequest
from gateway.replies import gateway_view, json_reply, relay_sse, streaming_reply
from gateway.resolve import require_kind, resolve


@gateway_view
async def completions(request: HttpRequest) -> HttpResponseBase:
    require_method(request, "POST")
    body = parse_request(request, CompletionRequest)
    identity, spec = await resolve(request, body.model)
    assert spec is not None
    require_kind(spec, {"chat", "completion"}, "v1/completions")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid("Only one prompt per request is supported.", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = await text.encode(spec, prompt, "prompt")
    else:
        prompt_ids = text.check_token_ids(spec, prompt, "prompt")  # type: ignore[arg-type]
    if body.suffix:
        raise invalid("suffix is not supported", "suffix")
    if not prompt_ids:
        raise invalid("prompt must not be empty", "prompt")
    generation = await start_generation(
        identity=identity,
        spec=spec,
        request_id=request_id_of(request),
        prompt_ids=prompt_ids,
        body=body,
        max_tokens=body.max_tokens,
    )
    completion_id = f"cmpl-{generation.request_id.removeprefix('req_')}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _Chunks(completion_id, body.model, generation, include_usage)
        stream = relay_sse(
            generation,
            opening=chunks.chunk("", None),
            delta=chunks.delta,
            finish=chunks.finish,
            usage=chunks.usage if include_usage else None,
        )
        return streaming_reply(stream, generation)
    content = await gather(generation)
    reply: Completion = {
        "id": completion_id,
        "object": "text_completion",
        "created": generation.created,
        "model": body.model,
        "system_fingerprint": system_fingerprint(generation.spec),
        "choices": [
            {
                "text": content,
                "index": 0,
                "logprobs": None,
                "finish_reason": generation.finish_reason,
            }
        ],
        "usage": usage(generation),
    }
    return json_reply(reply, headers=generation.headers())


@dataclass(frozen=True, slots=True)
class _Chunks:
    """The chunks of one completion stream."""

    completion_id: str
    model: str
    generation: Generation
    include_usage: bool

    def chunk(self, content: str, finish_reason: str | None) -> CompletionChunk:
        out: CompletionChunk = {
            "id": self.completion_id,
            "object": "text_completion",
            "created": self.generation.created,
            "model": self.model,
            "system_fingerprint": system_fingerprint(self.generation.spec),
            "choices": [
                {"text": content, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def delta(self, content: str) -> CompletionChunk:
        return self.chunk(content, None)

    def finish(self, finish_reason: str) -> CompletionChunk:
        return self.chunk("", finish_reason)

    def usage(self) -> CompletionChunk:
        # No system_fingerprint: the usage chunk has always gone out without one.
        return {
            "id": self.completion_id,
            "object": "text_completion",
            "created": self.generation.created,
            "model": self.model,
            "choices": [],
            "usage": usage(self.generation),
        }
