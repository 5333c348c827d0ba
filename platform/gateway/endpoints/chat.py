"""POST /v1/chat/completions: a chat turn rendered by the model's template, whole or streamed."""

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
from gateway.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatDelta
from gateway.replies import gateway_view, json_reply, relay_sse, streaming_reply
from gateway.resolve import require_kind, resolve


@gateway_view
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    require_method(request, "POST")
    body = parse_request(request, ChatCompletionRequest)
    identity, spec = await resolve(request, body.model)
    assert spec is not None
    require_kind(spec, {"chat"}, "v1/chat/completions")
    try:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
    except ValueError as exc:
        raise invalid(str(exc), "messages") from exc
    prompt = await text.render_chat(spec, messages, identity.organization_id)
    prompt_ids = await text.encode(spec, prompt, "messages")
    generation = await start_generation(
        identity=identity,
        spec=spec,
        request_id=request_id_of(request),
        prompt_ids=prompt_ids,
        body=body,
        max_tokens=_max_tokens(body.max_completion_tokens, body.max_tokens),
    )
    completion_id = f"chatcmpl-{generation.request_id.removeprefix('req_')}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _Chunks(completion_id, body.model, generation, include_usage)
        stream = relay_sse(
            generation,
            opening=chunks.chunk({"role": "assistant", "content": "", "refusal": None}, None),
            delta=chunks.delta,
            finish=chunks.finish,
            usage=chunks.usage if include_usage else None,
        )
        return streaming_reply(stream, generation)
    content = await gather(generation)
    reply: ChatCompletion = {
        "id": completion_id,
        "object": "chat.completion",
        "created": generation.created,
        "model": body.model,
        "system_fingerprint": system_fingerprint(generation.spec),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": generation.finish_reason,
            }
        ],
        "usage": usage(generation),
    }
    return json_reply(reply, headers=generation.headers())


def _max_tokens(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


@dataclass(frozen=True, slots=True)
class _Chunks:
    """The chunks of one chat stream."""

    completion_id: str
    model: str
    generation: Generation
    include_usage: bool

    def chunk(self, delta: ChatDelta, finish_reason: str | None) -> ChatCompletionChunk:
        out: ChatCompletionChunk = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.generation.created,
            "model": self.model,
            "system_fingerprint": system_fingerprint(self.generation.spec),
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def delta(self, content: str) -> ChatCompletionChunk:
        return self.chunk({"content": content}, None)

    def finish(self, finish_reason: str) -> ChatCompletionChunk:
        return self.chunk({}, finish_reason)

    def usage(self) -> ChatCompletionChunk:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.generation.created,
            "model": self.model,
            "system_fingerprint": system_fingerprint(self.generation.spec),
            "choices": [],
            "usage": usage(self.generation),
        }
