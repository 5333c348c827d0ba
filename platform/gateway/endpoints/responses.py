"""/v1/responses: OpenAI's Responses API, on the same pipeline as chat completions.

A request's conversation (a previous response's input and output, then this input) is
rendered with the model's chat template, admitted, generated, relayed (whole or as typed
server-sent events) and settled as a chat turn is; the answer's text is split into
messages and function calls (gateway/agent.py). Stored responses (the default) are kept in
the database for MANTLE_RESPONSES_RETENTION_DAYS (gateway/responses_store.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse

from accounts.keys import KeyIdentity
from catalog.specs import EndpointSpec
from core import turns
from gateway import agent, relay, text
from gateway.backends import (
    REDIS_DOWN,
    database_read,
    forget_idle_redis_connections,
    redis_unavailable,
)
from gateway.errors import OpenAIError, invalid
from gateway.pipeline import (
    Generation,
    Sampling,
    gather,
    parse_request,
    request_id_of,
    shed_early,
    start_generation,
)
from gateway.protocol_responses import (
    LIST_DEFAULT_LIMIT,
    LIST_MAX_LIMIT,
    STORED_MAX_BYTES,
    FormatJSONObject,
    FormatJSONSchema,
    FunctionCallItem,
    FunctionToolReply,
    InputFunctionCall,
    InputFunctionCallOutput,
    InputMessage,
    OutputItem,
    OutputMessage,
    OutputText,
    Response,
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseItemList,
    ResponseUsage,
    StreamEvent,
    TextConfigReply,
    ToolChoiceFunction,
    ToolChoiceFunctionReply,
)
from gateway.replies import gateway_view, json_reply, streaming_reply
from gateway.resolve import require_kind, resolve
from gateway.responses_store import Owner, Stored, response_delete, response_load, response_store
from workers import contract

logger = logging.getLogger(__name__)

Item = dict[str, Any]


# --- views ----------------------------------------------------------------------------------


@gateway_view
async def responses(request: HttpRequest) -> HttpResponseBase:
    """POST /v1/responses."""
    await turns.take()
    _allow(request, "POST")
    body = parse_request(request, ResponseCreateRequest)
    identity, spec = await resolve(request, body.model)
    assert spec is not None
    require_kind(spec, {"chat"}, "v1/responses")
    plan = await plan_of(body)
    previous = await _previous(body.previous_response_id, identity)
    items = conversation_of(previous, body)
    owner = Owner(identity.organization_id, identity.project_id, identity.key_id)
    if spec.routed:
        return await relay.serve(
            request,
            identity,
            spec,
            relay.call_of("chat/completions", relayed_chat(body, plan, items)),
            lambda: _on_pool(request, body, plan, identity, spec, items, owner),
            convert=functools.partial(_converted, body, plan, items, owner),
        )
    return await _on_pool(request, body, plan, identity, spec, items, owner)


async def _on_pool(
    request: HttpRequest,
    body: ResponseCreateRequest,
    plan: agent.Plan,
    identity: KeyIdentity,
    spec: EndpointSpec,
    items: list[Item],
    owner: Owner,
) -> HttpResponseBase:
    """The request on the endpoint's own pool."""
    turns.give_up()  # the pool's own order (tiers, fair sharing) applies from here
    await shed_early(identity, spec, body.service_tier)
    messages, tools_variable = agent.template_messages(
        chat_messages(body.instructions, items),
        plan.tools,
        native=agent.native_tools(spec.chat_template or ""),
        offer_tools=plan.detect,
    )
    try:
        prompt = await text.render_chat(spec, messages, identity.organization_id, tools_variable)
        prompt_ids = await text.encode(spec, prompt, "input")
        generation = await start_generation(
            identity=identity,
            spec=spec,
            request_id=request_id_of(request),
            prompt_ids=prompt_ids,
            sampling=Sampling(temperature=body.temperature, top_p=body.top_p, grammar=plan.grammar),
            max_tokens=body.max_output_tokens,
            service_tier=body.service_tier,
        )
    except OpenAIError as exc:
        # The template and the context length speak of chat's `messages`; here, `input`.
        if exc.param == "messages":
            exc.param = "input"
        raise
    shape = dataclasses.replace(
        Shape.of(body, plan, agent.new_id("resp_"), generation.created),
        service_tier=generation.service_tier,
    )
    if body.stream:
        if generation.service_class == contract.ServiceClass.FLEX:
            await generation.prime()  # a flex refusal is a 429 before the stream starts
        return streaming_reply(relay_stream(generation, shape, plan, items, owner), generation)
    texts = await gather(generation)
    output = _Output(plan)
    output.push(texts[0])
    incomplete = generation.finish_reason == "length"
    output.close(incomplete=incomplete)
    reply = shape.response(
        "incomplete" if incomplete else "completed", output.items, _usage(generation)
    )
    if shape.store:
        await _store(shape, owner, items, output.items, reply)
    return json_reply(reply, headers=generation.headers())


@gateway_view
async def response(request: HttpRequest, response_id: str) -> HttpResponseBase:
    """GET and DELETE /v1/responses/{response_id}."""
    _allow(request, "GET", "DELETE")
    identity, _ = await resolve(request, None)
    if request.method == "DELETE":
        deleted = await database_read(
            functools.partial(
                response_delete,
                response_id=response_id,
                organization_id=identity.organization_id,
            )
        )
        if not deleted:
            raise _not_found(response_id)
        gone: ResponseDeleted = {"id": response_id, "object": "response.deleted", "deleted": True}
        return json_reply(gone)
    stored = await _load(response_id, identity)
    if stored is None:
        raise _not_found(response_id)
    return json_reply(stored.response)


@gateway_view
async def input_items(request: HttpRequest, response_id: str) -> HttpResponseBase:
    """GET /v1/responses/{response_id}/input_items: OpenAI's cursor list, newest first by
    default."""
    _allow(request, "GET")
    identity, _ = await resolve(request, None)
    limit, order, after = _list_query(request)
    stored = await _load(response_id, identity)
    if stored is None:
        raise _not_found(response_id)
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    if after is not None:
        at = next((i for i, item in enumerate(items) if item.get("id") == after), None)
        if at is None:
            raise invalid(f"No input item with id '{after[:100]}' in this response.", "after")
        items = items[at + 1 :]
    page = items[:limit]
    listed: ResponseItemList = {
        "object": "list",
        "data": cast(Any, page),
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
    return json_reply(listed)


def _allow(request: HttpRequest, *methods: str) -> None:
    if request.method not in methods:
        raise OpenAIError(
            405,
            f"Method {request.method} not allowed; use {' or '.join(methods)}.",
            code="method_not_allowed",
        )


def _not_found(response_id: str) -> OpenAIError:
    shown = response_id if len(response_id) <= 100 else f"{response_id[:100]}..."
    return OpenAIError(404, f"Response with id '{shown}' not found.")


def _list_query(request: HttpRequest) -> tuple[int, str, str | None]:
    raw_limit = request.GET.get("limit")
    limit = LIST_DEFAULT_LIMIT
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIST_MAX_LIMIT:
            raise invalid(
                f"Invalid value for 'limit': an integer from 1 to {LIST_MAX_LIMIT}.", "limit"
            )
        limit = int(raw_limit)
    order = request.GET.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("Invalid value for 'order': 'asc' or 'desc'.", "order")
    return limit, order, request.GET.get("after")


# --- the request ----------------------------------------------------------------------------


async def plan_of(body: ResponseCreateRequest) -> agent.Plan:
    """The tools and the format checked (400s naming the parameter), before anything is
    read from the database or reserved."""
    tools = [
        agent.Tool(
            name=t.name,
            description=t.description or "",
            parameters=t.parameters if t.parameters is not None else {"type": "object"},
            strict=t.strict is not False,
        )
        for t in body.tools or ()
    ]
    wanted = body.tool_choice
    fmt = body.text.format if body.text is not None else None
    return await agent.plan(
        tools,
        wanted.name if isinstance(wanted, ToolChoiceFunction) else wanted,
        parallel=body.parallel_tool_calls is not False,
        tool_param=lambda i: f"tools[{i}]",
        json_schema=fmt.schema_ if isinstance(fmt, FormatJSONSchema) else None,
        json_object=isinstance(fmt, FormatJSONObject),
        format_param="text.format.schema" if isinstance(fmt, FormatJSONSchema) else "text.format",
    )


async def _load(response_id: str, identity: KeyIdentity) -> Stored | None:
    if len(response_id) > 64:  # longer than any id we give: not one of ours
        return None
    return await database_read(
        functools.partial(
            response_load, response_id=response_id, organization_id=identity.organization_id
        )
    )


async def _previous(response_id: str | None, identity: KeyIdentity) -> Stored | None:
    if response_id is None:
        return None
    found = await _load(response_id, identity)
    if found is None:
        raise invalid(
            f"Previous response with id '{response_id}' not found.",
            "previous_response_id",
            code="previous_response_not_found",
        )
    return found


def conversation_of(previous: Stored | None, body: ResponseCreateRequest) -> list[Item]:
    """The items this response answers, in the input_items shapes with ids: the previous
    response's input and output, then this request's input. A function's output must
    answer a call made earlier in the conversation."""
    items: list[Item] = []
    if previous is not None:
        items += previous.input_items + previous.output
    called = {i["call_id"] for i in items if i["type"] == "function_call"}
    if isinstance(body.input, str):
        items.append(_user_message(body.input))
    else:
        for n, item in enumerate(body.input):
            if isinstance(item, InputFunctionCallOutput) and item.call_id not in called:
                raise invalid(
                    f"No tool call found for function call output with call_id "
                    f"{item.call_id[:100]!r}.",
                    f"input[{n}].call_id",
                )
            if isinstance(item, InputFunctionCall):
                called.add(item.call_id)
            items.append(_item(item))
    size = len(json.dumps(items, separators=(",", ":")).encode())
    if size > STORED_MAX_BYTES:
        raise invalid(
            f"The conversation is {size} bytes as JSON, over the {STORED_MAX_BYTES} a "
            "response may carry (a previous response's included); start a new one.",
            "input",
        )
    return items


def _user_message(content: str) -> Item:
    return {
        "type": "message",
        "id": agent.new_id("msg_"),
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_text", "text": content}],
    }


def _item(item: InputMessage | InputFunctionCall | InputFunctionCallOutput) -> Item:
    if isinstance(item, InputFunctionCall):
        return {
            "type": "function_call",
            "id": item.id or agent.new_id("fc_"),
            "call_id": item.call_id,
            "name": item.name,
            "arguments": item.arguments,
            "status": "completed",
        }
    if isinstance(item, InputFunctionCallOutput):
        return {
            "type": "function_call_output",
            "id": item.id or agent.new_id("fco_"),
            "call_id": item.call_id,
            "output": item.output,
            "status": "completed",
        }
    texts = [item.content] if isinstance(item.content, str) else [p.text for p in item.content]
    if item.role == "assistant":
        return {
            "type": "message",
            "id": item.id or agent.new_id("msg_"),
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": t, "annotations": []} for t in texts],
        }
    return {
        "type": "message",
        "id": item.id or agent.new_id("msg_"),
        "status": "completed",
        "role": item.role,
        "content": [{"type": "input_text", "text": t} for t in texts],
    }


def chat_messages(instructions: str | None, items: Sequence[Mapping[str, Any]]) -> list[Item]:
    """The conversation as chat messages for agent.template_messages: `instructions` first
    as the system message; calls join the assistant turn just before them."""
    messages: list[Item] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            content = "".join(part["text"] for part in item["content"])
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = agent.ToolCall(item["call_id"], item["name"], item["arguments"])
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            )
    return messages


# --- relayed to an upstream provider --------------------------------------------------------


def relayed_chat(
    body: ResponseCreateRequest, plan: agent.Plan, items: Sequence[Item]
) -> dict[str, Any]:
    """The request as a chat completion for a provider (docs/providers.md): the
    conversation with its calls and their outputs, the tools, the tool choice and the text
    format in chat's shapes. Sent whole (not streamed): the Responses stream is made of it."""
    messages: list[dict[str, Any]] = []
    for message in chat_messages(body.instructions, items):
        out: dict[str, Any] = {"role": message["role"], "content": message.get("content", "")}
        if message.get("tool_calls"):
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in message["tool_calls"]
            ]
        if message.get("tool_call_id"):
            out["tool_call_id"] = message["tool_call_id"]
        messages.append(out)
    chat: dict[str, Any] = {"model": body.model, "messages": messages}
    if body.max_output_tokens is not None:
        chat["max_tokens"] = body.max_output_tokens
    if body.temperature is not None:
        chat["temperature"] = body.temperature
    if body.top_p is not None:
        chat["top_p"] = body.top_p
    if plan.tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": dict(t.parameters),
                    "strict": t.strict,
                },
            }
            for t in plan.tools
        ]
        chat["tool_choice"] = (
            plan.choice
            if plan.choice in ("none", "auto", "required")
            else {"type": "function", "function": {"name": plan.choice}}
        )
        chat["parallel_tool_calls"] = plan.parallel
    fmt = body.text.format if body.text is not None else None
    if isinstance(fmt, FormatJSONSchema):
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict},
        }
    elif isinstance(fmt, FormatJSONObject):
        chat["response_format"] = {"type": "json_object"}
    return chat


async def _converted(
    body: ResponseCreateRequest,
    plan: agent.Plan,
    items: Sequence[Item],
    owner: Owner,
    answer: dict[str, Any],
    headers: dict[str, str],
) -> HttpResponseBase:
    """A provider's chat completion as the Response (stored as any), whole or as the
    Responses stream's events, sent at once."""
    shape = Shape.of(body, plan, agent.new_id("resp_"), int(time.time()))
    # Calls come structured from the provider: its text is all content.
    output = _Output(dataclasses.replace(plan, tools=()))
    opening = [output.next_sequence(), output.next_sequence()]
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], Mapping) else {}
    message = choice.get("message") or {}
    events: list[StreamEvent] = []
    if isinstance(message.get("content"), str) and message["content"]:
        events += output.push(message["content"])
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {} if isinstance(call, Mapping) else {}
        events += output.call(
            index,
            str(call.get("id") or agent.new_id("call_")),
            str(function.get("name") or ""),
            str(function.get("arguments") or ""),
        )
    incomplete = choice.get("finish_reason") == "length"
    events += output.close(incomplete=incomplete)
    reply = shape.response(
        "incomplete" if incomplete else "completed", output.items, _relayed_usage(answer)
    )
    if shape.store:
        await _store(shape, owner, items, output.items, reply)
    if not body.stream:
        return json_reply(reply, headers=headers)
    started = shape.response("in_progress", [], None)
    stream: list[Mapping[str, Any]] = [
        {"type": "response.created", "sequence_number": opening[0], "response": started},
        {"type": "response.in_progress", "sequence_number": opening[1], "response": started},
        *events,
        {
            "type": "response.incomplete" if incomplete else "response.completed",
            "sequence_number": output.next_sequence(),
            "response": reply,
        },
    ]

    async def burst() -> AsyncGenerator[bytes, None]:
        for event in stream:
            yield typed_sse(event)

    response = StreamingHttpResponse(burst(), content_type="text/event-stream")
    response["cache-control"] = "no-cache"
    for name, value in headers.items():
        response[name] = value
    return response


def _relayed_usage(answer: Mapping[str, Any]) -> ResponseUsage | None:
    counts = relay.usage_counts(answer.get("usage"))
    if counts is None:
        return None
    prompt, completion, cached = counts
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


# --- the reply ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What every Response object of one request repeats: the request's settings."""

    id: str
    created_at: int
    model: str
    instructions: str | None
    max_output_tokens: int | None
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float
    text: TextConfigReply
    tool_choice: str | ToolChoiceFunctionReply
    tools: list[FunctionToolReply]
    top_p: float
    user: str | None
    metadata: dict[str, str]
    service_tier: str = "default"

    @classmethod
    def of(
        cls, body: ResponseCreateRequest, plan: agent.Plan, response_id: str, created_at: int
    ) -> Shape:
        fmt = body.text.format if body.text is not None else None
        text_config: TextConfigReply = {"format": {"type": "text"}}
        if isinstance(fmt, FormatJSONSchema):
            text_config = {
                "format": {
                    "type": "json_schema",
                    "name": fmt.name,
                    "schema": fmt.schema_,
                    "description": fmt.description,
                    "strict": fmt.strict,
                }
            }
        elif isinstance(fmt, FormatJSONObject):
            text_config = {"format": {"type": "json_object"}}
        # OpenAI's default is `auto`, tools or not (without tools it calls nothing).
        choice: str | ToolChoiceFunctionReply = "auto" if body.tool_choice is None else plan.choice
        if plan.choice not in ("none", "auto", "required"):
            choice = {"type": "function", "name": plan.choice}
        return cls(
            id=response_id,
            created_at=created_at,
            model=body.model,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            parallel_tool_calls=plan.parallel,
            previous_response_id=body.previous_response_id,
            store=body.store is not False,
            temperature=1.0 if body.temperature is None else body.temperature,
            text=text_config,
            tool_choice=choice,
            tools=[
                {
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                    "strict": t.strict is not False,
                }
                for t in body.tools or ()
            ],
            top_p=1.0 if body.top_p is None else body.top_p,
            user=body.user,
            metadata=dict(body.metadata or {}),
        )

    def response(
        self,
        status: str,
        output: Sequence[OutputItem],
        usage: ResponseUsage | None,
        error: OpenAIError | None = None,
    ) -> Response:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": cast(Any, status),
            "error": None
            if error is None
            else {
                "code": "rate_limit_exceeded" if error.status == 429 else "server_error",
                "message": error.message,
            },
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": list(output),
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "temperature": self.temperature,
            "text": self.text,
            "tool_choice": cast(Any, self.tool_choice),
            "tools": self.tools,
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": self.user,
            "metadata": self.metadata,
            "service_tier": self.service_tier,
        }


def _usage(generation: Generation) -> ResponseUsage:
    return {
        "input_tokens": generation.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": generation.cached_tokens,
            "cache_write_tokens": 0,
        },
        "output_tokens": generation.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


class _Output:
    """The answer's output items, built piece by piece, with the stream events that say
    so (OpenAI's order: an item added, its content part added, deltas, done events)."""

    def __init__(self, plan: agent.Plan) -> None:
        self.sequence = 0
        self.items: list[OutputItem] = []
        self.events: list[StreamEvent] = []
        self._split = agent.ToolCallStream(plan.tools, detect=plan.detect, forced=plan.forced)
        self._open: OutputItem | None = None

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence - 1

    def push(self, piece: str) -> list[StreamEvent]:
        for part in self._split.push(piece):
            self._piece(part)
        return self._take()

    def call(self, index: int, call_id: str, name: str, arguments: str) -> list[StreamEvent]:
        """A whole tool call (a provider's, structured) as its item and events."""
        self._piece(agent.CallStart(index, call_id, name))
        if arguments:
            self._piece(agent.CallArguments(index, arguments))
        return self._take()

    def close(self, *, incomplete: bool) -> list[StreamEvent]:
        """The end of the text: held pieces released, the open item finished (`incomplete`
        when the text was cut at max_output_tokens); an answer with no item gets an empty
        message, as OpenAI gives one."""
        for part in self._split.finish():
            self._piece(part)
        if not self.items:
            self._open_message()
        self._finish(incomplete=incomplete)
        return self._take()

    def _take(self) -> list[StreamEvent]:
        events, self.events = self.events, []
        return events

    def _piece(self, part: agent.Piece) -> None:
        if isinstance(part, agent.Text):
            if not part.text:
                return
            if self._open is None or self._open["type"] != "message":
                self._finish(incomplete=False)
                self._open_message()
            message = cast(OutputMessage, self._open)
            message["content"][0]["text"] += part.text
            self.events.append(
                {
                    "type": "response.output_text.delta",
                    "sequence_number": self.next_sequence(),
                    "item_id": message["id"],
                    "output_index": len(self.items) - 1,
                    "content_index": 0,
                    "delta": part.text,
                    "logprobs": [],
                }
            )
        elif isinstance(part, agent.CallStart):
            self._finish(incomplete=False)
            call: FunctionCallItem = {
                "type": "function_call",
                "id": agent.new_id("fc_"),
                "call_id": part.id,
                "name": part.name,
                "arguments": "",
                "status": "in_progress",
            }
            self._add(call)
        elif part.text:
            call = cast(FunctionCallItem, self._open)
            call["arguments"] += part.text
            self.events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "sequence_number": self.next_sequence(),
                    "item_id": call["id"],
                    "output_index": len(self.items) - 1,
                    "delta": part.text,
                }
            )

    def _add(self, item: OutputItem) -> None:
        self.items.append(item)
        self._open = item
        self.events.append(
            {
                "type": "response.output_item.added",
                "sequence_number": self.next_sequence(),
                "output_index": len(self.items) - 1,
                "item": _copy(item),
            }
        )

    def _open_message(self) -> None:
        message: OutputMessage = {
            "type": "message",
            "id": agent.new_id("msg_"),
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self._add(message)
        message["content"].append(_part(""))
        self.events.append(
            {
                "type": "response.content_part.added",
                "sequence_number": self.next_sequence(),
                "item_id": message["id"],
                "output_index": len(self.items) - 1,
                "content_index": 0,
                "part": _part(""),
            }
        )

    def _finish(self, *, incomplete: bool) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = len(self.items) - 1
        item["status"] = "incomplete" if incomplete else "completed"
        if item["type"] == "message":
            part = item["content"][0]
            self.events.append(
                {
                    "type": "response.output_text.done",
                    "sequence_number": self.next_sequence(),
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "text": part["text"],
                    "logprobs": [],
                }
            )
            self.events.append(
                {
                    "type": "response.content_part.done",
                    "sequence_number": self.next_sequence(),
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": _part(part["text"]),
                }
            )
        else:
            self.events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "sequence_number": self.next_sequence(),
                    "item_id": item["id"],
                    "output_index": index,
                    "arguments": item["arguments"],
                }
            )
        self.events.append(
            {
                "type": "response.output_item.done",
                "sequence_number": self.next_sequence(),
                "output_index": index,
                "item": _copy(item),
            }
        )


def _part(text: str) -> OutputText:
    return {"type": "output_text", "text": text, "annotations": []}


def _copy(item: OutputItem) -> OutputItem:
    """The item as it is now: the events of one piece of text are serialized together,
    after the item they announce has changed."""
    if item["type"] == "message":
        message: OutputMessage = {
            **item,
            "content": [_part(p["text"]) for p in item["content"]],
        }
        return message
    call: FunctionCallItem = {**item}
    return call


async def _store(
    shape: Shape,
    owner: Owner,
    items: Sequence[Item],
    output: Sequence[OutputItem],
    reply: Response,
) -> None:
    await database_read(
        functools.partial(
            response_store,
            response_id=shape.id,
            owner=owner,
            model=shape.model,
            input_items=items,
            output=cast(Any, output),
            response=cast(Any, reply),
            created_at=datetime.fromtimestamp(shape.created_at, UTC),
        )
    )


# --- the stream -----------------------------------------------------------------------------


def typed_sse(event: Mapping[str, Any]) -> bytes:
    """One typed server-sent event: `event: <type>`, `data: <compact JSON>`, a blank line."""
    data = json.dumps(event, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


async def relay_stream(
    generation: Generation,
    shape: Shape,
    plan: agent.Plan,
    items: Sequence[Item],
    owner: Owner,
) -> AsyncGenerator[bytes, None]:
    """The Responses stream: created, in progress, the items' events as the text comes,
    then completed or incomplete with the whole response and its usage. A disconnect stops
    the worker; an error after the start is an `error` event, then `response.failed`.
    Settlement is the generation block's, on leaving it whatever happens."""
    output = _Output(plan)
    async with generation:
        try:
            started = shape.response("in_progress", [], None)
            yield typed_sse(
                {
                    "type": "response.created",
                    "sequence_number": output.next_sequence(),
                    "response": started,
                }
            )
            yield typed_sse(
                {
                    "type": "response.in_progress",
                    "sequence_number": output.next_sequence(),
                    "response": started,
                }
            )
            async for event in generation.events():
                piece = generation.take(event)
                if piece:
                    for out in output.push(piece):
                        yield typed_sse(out)
            if not generation.finished:
                raise OpenAIError(502, "The worker's stream ended early.", type_="server_error")
            incomplete = generation.finish_reason == "length"
            for out in output.close(incomplete=incomplete):
                yield typed_sse(out)
            status = "incomplete" if incomplete else "completed"
            reply = shape.response(status, output.items, _usage(generation))
            if shape.store:
                await _store(shape, owner, items, output.items, reply)
            yield typed_sse(
                {
                    "type": "response.incomplete" if incomplete else "response.completed",
                    "sequence_number": output.next_sequence(),
                    "response": reply,
                }
            )
        except OpenAIError as exc:
            await generation.cancel()
            for out in _failure(output, shape, exc):
                yield typed_sse(out)
        except REDIS_DOWN as exc:
            # The cancel cannot reach Redis now; the worker stops at the request's deadline.
            logger.warning("redis unreachable mid-stream of %s: %s", generation.request_id, exc)
            await forget_idle_redis_connections()
            for out in _failure(output, shape, redis_unavailable()):
                yield typed_sse(out)


def _failure(output: _Output, shape: Shape, exc: OpenAIError) -> list[StreamEvent]:
    return [
        {
            "type": "error",
            "sequence_number": output.next_sequence(),
            "code": exc.code,
            "message": exc.message,
            "param": exc.param,
        },
        {
            "type": "response.failed",
            "sequence_number": output.next_sequence(),
            "response": shape.response("failed", output.items, None, error=exc),
        },
    ]
