"""A response's conversation, built before anything is reserved: items with their ids,
a previous response's first, a function's output only for a call made earlier, the size
bound, and the chat messages the template renders."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.agent import ToolCall
from gateway.endpoints import responses
from gateway.errors import OpenAIError
from gateway.protocol_responses import ResponseCreateRequest
from gateway.responses_store import Stored

PREVIOUS = Stored(
    id="resp_1",
    model="m",
    input_items=[
        {
            "type": "message",
            "id": "msg_a",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_text", "text": "Weather in Paris?"}],
        }
    ],
    output=[
        {
            "type": "function_call",
            "id": "fc_a",
            "call_id": "call_a",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
            "status": "completed",
        }
    ],
    response={},
)


def _body(**fields: Any) -> ResponseCreateRequest:
    return ResponseCreateRequest.model_validate({"model": "m", **fields})


def test_a_previous_responses_items_come_first_and_a_call_can_be_answered() -> None:
    body = _body(
        input=[
            {"type": "function_call_output", "call_id": "call_a", "output": "21 C"},
            {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
        ]
    )
    items = responses.conversation_of(PREVIOUS, body)
    assert [i["id"] for i in items[:2]] == ["msg_a", "fc_a"]
    answer, note = items[2:]
    assert answer["type"] == "function_call_output" and answer["id"].startswith("fco_")
    assert (answer["call_id"], answer["output"], answer["status"]) == (
        "call_a",
        "21 C",
        "completed",
    )
    assert note["role"] == "developer" and note["id"].startswith("msg_")
    assert note["content"] == [{"type": "input_text", "text": "Be brief."}]


def test_an_output_for_no_earlier_call_is_refused() -> None:
    body = _body(input=[{"type": "function_call_output", "call_id": "call_a", "output": "x"}])
    with pytest.raises(OpenAIError) as err:
        responses.conversation_of(None, body)
    assert (err.value.status, err.value.param) == (400, "input[0].call_id")
    # A call made in the same input counts.
    both = _body(
        input=[
            {"type": "function_call", "call_id": "call_b", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_b", "output": "x"},
        ]
    )
    assert len(responses.conversation_of(None, both)) == 2


def test_items_keep_the_ids_they_came_with() -> None:
    body = _body(
        input=[
            {
                "type": "message",
                "id": "msg_kept",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hi", "annotations": []}],
            },
            {
                "type": "function_call",
                "id": "fc_kept",
                "call_id": "c",
                "name": "f",
                "arguments": "{}",
            },
        ]
    )
    message, call = responses.conversation_of(None, body)
    assert (message["id"], call["id"]) == ("msg_kept", "fc_kept")
    assert message["content"] == [{"type": "output_text", "text": "Hi", "annotations": []}]


def test_a_conversation_over_the_stored_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(responses, "STORED_MAX_BYTES", 600)
    assert responses.conversation_of(PREVIOUS, _body(input="short"))
    with pytest.raises(OpenAIError) as err:
        responses.conversation_of(PREVIOUS, _body(input="x" * 300))
    assert (err.value.status, err.value.param) == (400, "input")


def test_chat_messages_put_calls_on_the_assistant_turn() -> None:
    items = responses.conversation_of(
        None,
        _body(
            input=[
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Let me look."},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "1"},
                {"type": "function_call_output", "call_id": "c2", "output": "2"},
                {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
            ]
        ),
    )
    assert responses.chat_messages("Be kind.", items) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [ToolCall("c1", "f", "{}"), ToolCall("c2", "g", "{}")],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
        {"role": "assistant", "content": "", "tool_calls": [ToolCall("c3", "f", "{}")]},
    ]
