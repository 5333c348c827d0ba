"""The Responses stream's relay with a scripted worker: OpenAI's event order for text and
function calls in one answer, and when a stream fails after it started (the worker told
to stop, an `error` event then `response.failed`, settlement last) or the client goes away."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.endpoints import responses
from gateway.errors import OpenAIError
from gateway.pipeline import Choice, Generation
from gateway.protocol_responses import ResponseCreateRequest
from gateway.responses_store import Owner

CALL = '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'


class Scripted(Generation):
    """A generation whose worker sends `pieces` of text, then ends (`failure` None: a done
    event with `finish_reason`) or fails with `failure`."""

    def __init__(
        self,
        pieces: list[str],
        order: list[str],
        failure: BaseException | None = None,
        finish_reason: str = "stop",
    ) -> None:
        self.request_id = "req-1"
        self.prompt_tokens = 3
        self.completion_tokens = 0
        self.finished = False
        self.finish_reason = "stop"
        self.n = 1
        self.choices = [Choice()]
        self.arrived = time.perf_counter()
        self.created = 1700000000
        self.pieces = pieces
        self.failure = failure
        self.final = finish_reason
        self.order = order

    async def _events(self) -> AsyncIterator[dict[str, str]]:
        for piece in self.pieces:
            yield {"type": "delta", "text": piece, "tokens": "1"}
        if self.failure is not None:
            raise self.failure
        yield {
            "type": "done",
            "finish_reason": self.final,
            "prompt_tokens": "3",
            "completion_tokens": str(len(self.pieces)),
        }

    def events(self) -> AsyncIterator[dict[str, str]]:
        return self._events()

    async def cancel(self) -> None:
        self.order.append("cancel")

    async def settle(self) -> None:
        self.order.append("settle")


def _relay(generation: Scripted, order: list[str], **body: Any) -> list[dict[str, Any]]:
    request = ResponseCreateRequest.model_validate(
        {"model": "m", "input": "x", "store": False, **body}
    )
    plan = asyncio.run(responses.plan_of(request))
    shape = responses.Shape.of(request, plan, "resp_1", generation.created)
    events: list[dict[str, Any]] = []

    async def run() -> None:
        stream = responses.relay_stream(generation, shape, plan, [], Owner("org", "proj", "key"))
        async for chunk in stream:
            head, data = chunk.decode().rstrip("\n").split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert head == f"event: {event['type']}"
            events.append(event)
            order.append(event["type"])

    asyncio.run(run())
    return events


def test_text_then_a_call_then_text_are_three_items_in_openais_order() -> None:
    order: list[str] = []
    tools = [{"type": "function", "name": "get_time", "parameters": {"type": "object"}}]
    pieces = ["Let me ", "check.", CALL[:20], CALL[20:], "Done."]
    events = _relay(Scripted(pieces, order), order, tools=tools, tool_choice="auto")
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert order[-1] == "settle" and "cancel" not in order
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "message"]
    first, call, last = final["output"]
    assert first["content"][0]["text"] == "Let me check."
    assert (call["name"], json.loads(call["arguments"])) == ("get_time", {"timezone": "UTC"})
    assert last["content"][0]["text"] == "Done."
    assert all(i["status"] == "completed" for i in final["output"])
    # Each item's events carry its index and id; an added item is announced empty.
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == [0, 1, 2]
    assert added[0]["item"]["content"] == [] and added[1]["item"]["arguments"] == ""
    assert final["usage"]["output_tokens"] == 5 and final["status"] == "completed"


def test_a_cut_answer_is_incomplete() -> None:
    order: list[str] = []
    events = _relay(Scripted(["Par"], order, finish_reason="length"), order)
    assert events[-1]["type"] == "response.incomplete"
    response = events[-1]["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


def test_an_empty_answer_is_an_empty_message() -> None:
    order: list[str] = []
    events = _relay(Scripted([], order), order)
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""
    assert [e["type"] for e in events][2:5] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
    ]


def test_a_worker_error_mid_stream_cancels_then_tells_the_client_then_settles() -> None:
    order: list[str] = []
    failure = OpenAIError(500, "the worker failed", type_="server_error", code="server_error")
    events = _relay(Scripted(["Hi"], order, failure), order)
    assert order == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "cancel",
        "error",
        "response.failed",
        "settle",
    ]
    error, failed = events[-2], events[-1]
    assert (error["code"], error["message"]) == ("server_error", "the worker failed")
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "the worker failed"}
    assert failed["response"]["output"][0]["content"][0]["text"] == "Hi"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_redis_outage_mid_stream_drops_the_dead_connections_before_settling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []

    async def forget() -> None:
        order.append("forget idle connections")

    monkeypatch.setattr(responses, "forget_idle_redis_connections", forget)
    events = _relay(Scripted(["Hi"], order, RedisConnectionError("gone")), order)
    assert order[-4:] == ["forget idle connections", "error", "response.failed", "settle"]
    assert "cancel" not in order  # it could not reach Redis anyway
    assert events[-2]["code"] == "redis_unavailable"


def test_a_client_that_goes_away_stops_the_worker_and_settles() -> None:
    order: list[str] = []
    request = ResponseCreateRequest.model_validate({"model": "m", "input": "x", "store": False})
    plan = asyncio.run(responses.plan_of(request))
    generation = Scripted(["Hi", "there"], order)
    shape = responses.Shape.of(request, plan, "resp_1", generation.created)

    async def run() -> None:
        stream = responses.relay_stream(generation, shape, plan, [], Owner("org", "proj", "key"))
        await stream.__anext__()
        await stream.aclose()  # the client went away after the first event

    asyncio.run(run())
    assert order == ["cancel", "settle"]
