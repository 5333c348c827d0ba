"""POST /v1/chat/completions: a chat turn rendered by the model's template, whole or streamed.

Tools, tool choice and response formats are gateway/agent.py's (shared with /v1/responses);
this module reads them off OpenAI's chat shapes and writes the answer back in them.
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
from gateway import agent, relay, text
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
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    NamedToolChoice,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    TokenLogprob,
    ToolCallReply,
)
from gateway.replies import gateway_view, json_reply, relay_sse, streaming_reply
from gateway.resolve import require_kind, resolve
from workers import contract


async def plan_of(body: ChatCompletionRequest) -> agent.Plan:
    """The request's tools, tool choice and response format, checked, in chat's shapes."""
    tools = [
        agent.Tool(
            name=t.function.name,
            description=t.function.description or "",
            parameters=t.function.parameters
            if t.function.parameters is not None
            else {"type": "object", "properties": {}},
            strict=bool(t.function.strict),
        )
        for t in body.tools or []
    ]
    raw_choice = body.tool_choice
    named = raw_choice.function.name if isinstance(raw_choice, NamedToolChoice) else raw_choice
    fmt = body.response_format
    schema = None
    if isinstance(fmt, ResponseFormatJSONSchema):
        schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return await agent.plan(
        tools,
        named,
        parallel=body.parallel_tool_calls is not False,
        tool_param=lambda i: f"tools[{i}].function",
        json_schema=schema,
        json_object=isinstance(fmt, ResponseFormatJSONObject),
    )


def conversation(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as gateway/agent.py takes them."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        try:
            content = m.text()
        except ValueError as exc:
            raise invalid(str(exc), f"messages[{i}].content") from exc
        item: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": content,
        }
        if m.tool_calls:
            if m.role != "assistant":
                raise invalid("only assistant messages carry tool_calls", f"messages[{i}]")
            item["tool_calls"] = [
                agent.ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls
            ]
        if m.role == "tool":
            if not m.tool_call_id:
                raise invalid(
                    "a tool message needs the tool_call_id of the call it answers",
                    f"messages[{i}].tool_call_id",
                )
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


@gateway_view
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    await turns.take()
    require_method(request, "POST")
    body = parse_request(request, ChatCompletionRequest)
    plan = await plan_of(body)
    identity, spec = await resolve(request, body.model)
    assert spec is not None
    require_kind(spec, {"chat"}, "v1/chat/completions")
    if spec.routed:
        return await relay.serve(
            request,
            identity,
            spec,
            relay.call_of("chat/completions", relay.params(body), stream=bool(body.stream)),
            lambda: _on_pool(request, body, plan, identity, spec),
        )
    return await _on_pool(request, body, plan, identity, spec)


async def _on_pool(
    request: HttpRequest,
    body: ChatCompletionRequest,
    plan: agent.Plan,
    identity: KeyIdentity,
    spec: EndpointSpec,
) -> HttpResponseBase:
    """The request on the endpoint's own pool."""
    turns.give_up()  # the pool's own order (tiers, fair sharing) applies from here
    await shed_early(identity, spec, body.service_tier)
    text.check_bias(spec, body.bias(), "logit_bias")
    messages, tool_variables = agent.template_messages(
        conversation(body),
        plan.tools,
        native=agent.native_tools(spec.chat_template or ""),
        offer_tools=plan.detect,
    )
    prompt = await text.render_chat(spec, messages, identity.organization_id, tool_variables)
    prompt_ids = await text.encode(spec, prompt, "messages")
    sampling = dataclasses.replace(
        sampling_of(body),
        logprobs=(body.top_logprobs or 0) if body.logprobs else -1,
        grammar=plan.grammar,
    )
    generation = await start_generation(
        identity=identity,
        spec=spec,
        request_id=request_id_of(request),
        prompt_ids=prompt_ids,
        sampling=sampling,
        max_tokens=_max_tokens(body.max_completion_tokens, body.max_tokens),
        service_tier=body.service_tier,
    )
    completion_id = f"chatcmpl-{generation.request_id.removeprefix('req_')}"
    want_logprobs = bool(body.logprobs)
    if body.stream:
        if generation.service_class == contract.ServiceClass.FLEX:
            await generation.prime()  # a flex refusal is a 429 before the stream starts
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _Chunks(completion_id, body.model, generation, include_usage, plan, want_logprobs)
        stream = relay_sse(
            generation,
            opening=[
                chunks.chunk(i, {"role": "assistant", "content": "", "refusal": None}, None)
                for i in range(generation.n)
            ],
            chunks=chunks.of,
            usage=chunks.usage if include_usage else None,
        )
        return streaming_reply(stream, generation)
    texts = await gather(generation)
    choices: list[ChatChoice] = []
    for index, answer in enumerate(texts):
        state = generation.choices[index]
        content, calls = agent.split_tool_calls(
            answer, plan.tools, detect=plan.detect, forced=plan.forced
        )
        finish = state.finish_reason or generation.finish_reason
        choice: ChatChoice = {
            "index": index,
            "message": {
                "role": "assistant",
                "content": content if content or not calls else None,
                "refusal": None,
            },
            "logprobs": logprobs_reply(state.logprobs) if want_logprobs else None,
            "finish_reason": "tool_calls" if calls and finish == "stop" else finish,
        }
        if calls:
            choice["message"]["tool_calls"] = [_call_reply(c) for c in calls]
        choices.append(choice)
    reply: ChatCompletion = {
        "id": completion_id,
        "object": "chat.completion",
        "created": generation.created,
        "model": body.model,
        "system_fingerprint": system_fingerprint(generation.spec),
        "choices": choices,
        "usage": usage(generation),
        "service_tier": generation.service_tier,
    }
    return json_reply(reply, headers=generation.headers())


def _max_tokens(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _call_reply(call: agent.ToolCall) -> ToolCallReply:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def token_logprobs(entries: Sequence[Any]) -> list[TokenLogprob]:
    """The worker's entries ([token, bytes, logprob, [[token, bytes, logprob], ...]]) in
    OpenAI's chat shape."""
    return [
        {
            "token": token,
            "logprob": logprob,
            "bytes": raw,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in top],
        }
        for token, raw, logprob, top in entries
    ]


def logprobs_reply(entries: Sequence[Any]) -> ChoiceLogprobs:
    return {"content": token_logprobs(entries), "refusal": None}


@dataclass(slots=True)
class _Chunks:
    """The chunks of one chat stream: per choice, its text or tool calls as they come."""

    completion_id: str
    model: str
    generation: Generation
    include_usage: bool
    plan: agent.Plan
    want_logprobs: bool
    streams: list[agent.ToolCallStream] = field(default_factory=list)
    called: list[bool] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.generation.n
        self.streams = [
            agent.ToolCallStream(self.plan.tools, detect=self.plan.detect, forced=self.plan.forced)
            for _ in range(n)
        ]
        self.called = [False] * n
        self.finished = [False] * n

    def chunk(
        self,
        index: int,
        delta: ChatDelta,
        finish_reason: str | None,
        logprobs: ChoiceLogprobs | None = None,
    ) -> ChatCompletionChunk:
        out: ChatCompletionChunk = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.generation.created,
            "model": self.model,
            "system_fingerprint": system_fingerprint(self.generation.spec),
            "service_tier": self.generation.service_tier,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def of(self, read: Delta) -> list[ChatCompletionChunk]:
        if read.kind == "text":
            out = self._pieces(read.index, self.streams[read.index].push(read.text))
            if read.logprobs and self.want_logprobs:
                lp = logprobs_reply(read.logprobs)
                if out:
                    out[0]["choices"][0]["logprobs"] = lp
                else:
                    out.append(self.chunk(read.index, {}, None, lp))
            return out
        if read.kind == "finish":
            return self._finish(read.index, read.finish_reason)
        out = []
        for index, choice in enumerate(self.generation.choices):
            out += self._finish(index, choice.finish_reason or read.finish_reason)
        return out

    def _finish(self, index: int, reason: str) -> list[ChatCompletionChunk]:
        if self.finished[index]:
            return []
        self.finished[index] = True
        out = self._pieces(index, self.streams[index].finish())
        if self.called[index] and reason == "stop":
            reason = "tool_calls"
        out.append(self.chunk(index, {}, reason))
        return out

    def _pieces(self, index: int, pieces: list[agent.Piece]) -> list[ChatCompletionChunk]:
        out: list[ChatCompletionChunk] = []
        for piece in pieces:
            if isinstance(piece, agent.Text):
                out.append(self.chunk(index, {"content": piece.text}, None))
            elif isinstance(piece, agent.CallStart):
                self.called[index] = True
                out.append(
                    self.chunk(
                        index,
                        {
                            "tool_calls": [
                                {
                                    "index": piece.index,
                                    "id": piece.id,
                                    "type": "function",
                                    "function": {"name": piece.name, "arguments": ""},
                                }
                            ]
                        },
                        None,
                    )
                )
            elif piece.text:
                out.append(
                    self.chunk(
                        index,
                        {
                            "tool_calls": [
                                {"index": piece.index, "function": {"arguments": piece.text}}
                            ]
                        },
                        None,
                    )
                )
        return out

    def usage(self) -> ChatCompletionChunk:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.generation.created,
            "model": self.model,
            "system_fingerprint": system_fingerprint(self.generation.spec),
            "choices": [],
            "usage": usage(self.generation),
            "service_tier": self.generation.service_tier,
        }
