"""POST /v1/completions: text (or token ids) continued, whole or streamed.

`echo` puts the prompt in front of each choice's text; integer `logprobs` gives each token's
log probability and that many alternatives, in the legacy shape (with `echo`, the prompt's
tokens are scored too, the first one null).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.http import HttpRequest, HttpResponseBase

from accounts.keys import KeyIdentity
from catalog.specs import EndpointSpec
from core import turns
from gateway import relay, text
from gateway.endpoints.shared import system_fingerprint, usage
from gateway.errors import invalid
from gateway.pipeline import (
    Delta,
    Generation,
    gather,
    parse_request,
    request_id_of,
    require_method,
    sampling_of,
    shed_early,
    start_generation,
)
from gateway.protocol import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
)
from gateway.replies import gateway_view, json_reply, relay_sse, streaming_reply
from gateway.resolve import require_kind, resolve
from workers import contract


@gateway_view
async def completions(request: HttpRequest) -> HttpResponseBase:
    await turns.take()
    require_method(request, "POST")
    body = parse_request(request, CompletionRequest)
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise invalid("best_of is supported only equal to n (every choice is returned)", "best_of")
    identity, spec = await resolve(request, body.model)
    assert spec is not None
    require_kind(spec, {"chat", "completion"}, "v1/completions")
    if spec.routed:
        return await relay.serve(
            request,
            identity,
            spec,
            relay.call_of("completions", relay.params(body), stream=bool(body.stream)),
            lambda: _on_pool(request, body, identity, spec),
        )
    return await _on_pool(request, body, identity, spec)


async def _on_pool(
    request: HttpRequest, body: CompletionRequest, identity: KeyIdentity, spec: EndpointSpec
) -> HttpResponseBase:
    """The request on the endpoint's own pool."""
    turns.give_up()  # the pool's own order (tiers, fair sharing) applies from here
    await shed_early(identity, spec, body.service_tier)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid("Only one prompt per request is supported.", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = await text.encode(spec, prompt, "prompt")
        prompt_text = prompt
    else:
        prompt_ids = text.check_token_ids(spec, prompt, "prompt")  # type: ignore[arg-type]
        prompt_text = text.tokenizer_for(spec).decode(prompt_ids) if body.echo else ""
    first = text.tokenizer_for(spec).decode(prompt_ids[:1]) if body.echo and prompt_ids else ""
    if body.suffix:
        raise invalid("suffix is not supported", "suffix")
    if not prompt_ids:
        raise invalid("prompt must not be empty", "prompt")
    text.check_bias(spec, body.bias(), "logit_bias")
    k = -1 if body.logprobs is None else body.logprobs
    sampling = dataclasses.replace(
        sampling_of(body), logprobs=k, prompt_logprobs=k if body.echo else -1
    )
    generation = await start_generation(
        identity=identity,
        spec=spec,
        request_id=request_id_of(request),
        prompt_ids=prompt_ids,
        sampling=sampling,
        max_tokens=body.max_tokens,
        service_tier=body.service_tier,
    )
    completion_id = f"cmpl-{generation.request_id.removeprefix('req_')}"
    echo = prompt_text if body.echo else ""
    if body.stream:
        if generation.service_class == contract.ServiceClass.FLEX:
            await generation.prime()  # a flex refusal is a 429 before the stream starts
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _Chunks(completion_id, body.model, generation, include_usage, echo, k >= 0, first)
        stream = relay_sse(
            generation,
            opening=[] if echo else [chunks.chunk(i, "", None) for i in range(generation.n)],
            chunks=chunks.of,
            usage=chunks.usage if include_usage else None,
        )
        return streaming_reply(stream, generation)
    texts = await gather(generation)
    choices: list[CompletionChoice] = []
    for index, answer in enumerate(texts):
        state = generation.choices[index]
        logprobs = None
        if k >= 0:
            entries = list(state.logprobs)
            if echo:
                entries = list(generation.prompt_logprobs or []) + entries
            logprobs = legacy_logprobs(entries, 0, first)
        choices.append(
            {
                "text": echo + answer,
                "index": index,
                "logprobs": logprobs,
                "finish_reason": state.finish_reason or generation.finish_reason,
            }
        )
    reply: Completion = {
        "id": completion_id,
        "object": "text_completion",
        "created": generation.created,
        "model": body.model,
        "system_fingerprint": system_fingerprint(generation.spec),
        "choices": choices,
        "usage": usage(generation),
        "service_tier": generation.service_tier,
    }
    return json_reply(reply, headers=generation.headers())


def legacy_logprobs(entries: Sequence[Any], offset: int, first: str = "") -> CompletionLogprobs:
    """The worker's entries in the legacy shape; None stands for the prompt's first token
    (`first`: nothing before it predicts it). Text offsets count characters of the choice's
    text from `offset`."""
    out: CompletionLogprobs = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for entry in entries:
        if entry is None:
            out["tokens"].append(first)
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(offset)
            offset += len(first)
            continue
        token, _raw, logprob, top = entry
        out["tokens"].append(token)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({t: lp for t, _b, lp in top})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


@dataclass(slots=True)
class _Chunks:
    """The chunks of one completion stream."""

    completion_id: str
    model: str
    generation: Generation
    include_usage: bool
    echo: str
    want_logprobs: bool
    first: str
    offsets: list[int] = field(default_factory=list)
    opened: list[bool] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.generation.n
        self.offsets = [0] * n
        self.opened = [not self.echo] * n
        self.finished = [False] * n

    def chunk(
        self,
        index: int,
        content: str,
        finish_reason: str | None,
        logprobs: CompletionLogprobs | None = None,
    ) -> CompletionChunk:
        out: CompletionChunk = {
            "id": self.completion_id,
            "object": "text_completion",
            "created": self.generation.created,
            "model": self.model,
            "system_fingerprint": system_fingerprint(self.generation.spec),
            "service_tier": self.generation.service_tier,
            "choices": [
                {
                    "text": content,
                    "index": index,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def _open(self, index: int) -> list[CompletionChunk]:
        """With echo, each choice's first chunk is the prompt (scored when asked)."""
        if self.opened[index]:
            return []
        self.opened[index] = True
        logprobs = None
        if self.want_logprobs:
            logprobs = legacy_logprobs(self.generation.prompt_logprobs or [], 0, self.first)
        self.offsets[index] = len(self.echo)
        return [self.chunk(index, self.echo, None, logprobs)]

    def of(self, read: Delta) -> list[CompletionChunk]:
        if read.kind == "text":
            out = self._open(read.index)
            logprobs = None
            if self.want_logprobs and read.logprobs:
                logprobs = legacy_logprobs(read.logprobs, self.offsets[read.index])
            self.offsets[read.index] += len(read.text)
            if read.text or logprobs:
                out.append(self.chunk(read.index, read.text, None, logprobs))
            return out
        if read.kind == "finish":
            return self._finish(read.index, read.finish_reason)
        out = []
        for index, choice in enumerate(self.generation.choices):
            out += self._finish(index, choice.finish_reason or read.finish_reason)
        return out

    def _finish(self, index: int, reason: str) -> list[CompletionChunk]:
        if self.finished[index]:
            return []
        self.finished[index] = True
        return [*self._open(index), self.chunk(index, "", reason)]

    def usage(self) -> CompletionChunk:
        # No system_fingerprint: the usage chunk has always gone out without one.
        return {
            "id": self.completion_id,
            "object": "text_completion",
            "created": self.generation.created,
            "model": self.model,
            "choices": [],
            "usage": usage(self.generation),
            "service_tier": self.generation.service_tier,
        }
