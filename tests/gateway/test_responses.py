"""The Responses API (/v1/responses) end to end with the official `openai` client: a real
gateway, worker, model, PostgreSQL and Redis. Text, streams, structured output, function
calls and their second turn, stored responses (retrieve, input items, delete, chaining),
other organizations' ids, store=false, bad input refused before anything is reserved,
billing on the chat path."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest
from django.utils import timezone
from pydantic import BaseModel, Field

from core.redis import get_redis
from gateway.models import StoredResponse
from tests.factories import OrganizationFactory, make_api_key
from tests.gateway.conftest import CHAT, EMBED, Served
from tests.gateway.test_openai_e2e import usage_events, wait_usage

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

FRANCE = "What is the capital of France?"
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
TIME: Any = {
    "type": "function",
    "name": "get_time",
    "description": "The local time in a timezone",
    "parameters": {
        "type": "object",
        "properties": {"timezone": {"type": "string", "maxLength": 40}},
        "required": ["timezone"],
        "additionalProperties": False,
    },
    "strict": True,
}
ASK_WEATHER = "What is the weather like in Paris today?"
CITY_SCHEMA: Any = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
    },
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}


def _wallet(served: Served, *, price_in: int = 150, price_out: int = 600) -> str:
    """A prepaid wallet with known prices (nanos per token) for CHAT; its Redis key."""
    redis = get_redis()
    wallet = f"mantle:wallet:{served.org.id}"
    redis.hset(wallet, mapping={"mode": "prepaid", "cap_nanos": 10**9})
    redis.hset(
        f"mantle:price:{served.org.id}:{CHAT}",
        mapping={"in": price_in, "out": price_out, "req": 0, "ms": 0},
    )
    return wallet


def _raw(served: Served, method: str, path: str, secret: str | None = None) -> httpx.Response:
    return httpx.request(
        method,
        f"{served.live.url}/v1/{path}",
        timeout=60,
        headers={"authorization": f"Bearer {secret or served.secret}"},
    )


# --- text -------------------------------------------------------------------------------------


def test_string_input_answers_and_is_billed_like_chat(served: Served) -> None:
    wallet = _wallet(served)
    raw = served.client().responses.with_raw_response.create(
        model=CHAT, input=FRANCE, temperature=0, max_output_tokens=24
    )
    response = raw.parse()
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == CHAT
    assert response.error is None and response.incomplete_details is None
    assert "Paris" in response.output_text
    [message] = response.output
    assert message.type == "message" and message.id.startswith("msg_")
    assert message.role == "assistant" and message.status == "completed"
    assert [c.type for c in message.content] == ["output_text"]
    assert message.content[0].annotations == []
    assert (response.store, response.temperature, response.top_p) == (True, 0, 1.0)
    assert response.tools == [] and response.tool_choice == "auto"
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "text"
    usage = response.usage
    assert usage is not None and usage.input_tokens > 10 and 0 < usage.output_tokens <= 24
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert int(raw.headers["x-ratelimit-limit-requests"]) > 0
    # Metered on the chat path: one usage event with the response's tokens, and the
    # reservation settled into the exact cost.
    [event] = wait_usage(raw.headers["x-request-id"])
    assert (event["organization_id"], event["api_key_id"], event["project_id"]) == (
        served.org.id,
        served.key.id,
        served.key.project_id,
    )
    assert (int(event["input_tokens"]), int(event["output_tokens"])) == (
        usage.input_tokens,
        usage.output_tokens,
    )
    state = get_redis().hgetall(wallet)
    assert state["reserved_nanos"] == "0"
    expected = usage.input_tokens * 150 + usage.output_tokens * 600
    assert int(state.get("pending_nanos", 0)) + int(state.get("spent_nanos", 0)) == expected


def test_message_items_and_instructions_render_as_the_chat_turn(served: Served) -> None:
    """The conversation as items, with instructions, is the prompt chat completions make of
    the same messages: the same tokens in, the same greedy answer out."""
    client = served.client()
    instructions = "You are a geography teacher. Answer in one sentence."
    items: Any = [
        {"role": "user", "content": "Hello!"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello! How can I help?"}],
        },
        {"role": "user", "content": [{"type": "input_text", "text": FRANCE}]},
    ]
    response = client.responses.create(
        model=CHAT, input=items, instructions=instructions, temperature=0, max_output_tokens=30
    )
    chat = client.chat.completions.create(
        model=CHAT,
        messages=[
            {"role": "system", "content": instructions},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": FRANCE},
        ],
        temperature=0,
        max_tokens=30,
    )
    assert response.instructions == instructions
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.output_text == chat.choices[0].message.content
    # A string input is one user message: the same prompt as the one-item list.
    plain = client.responses.create(model=CHAT, input=FRANCE, temperature=0, max_output_tokens=30)
    listed = client.responses.create(
        model=CHAT,
        input=[{"role": "user", "content": FRANCE}],
        temperature=0,
        max_output_tokens=30,
    )
    assert plain.usage is not None and listed.usage is not None
    assert plain.usage.input_tokens == listed.usage.input_tokens
    assert plain.output_text == listed.output_text


def test_cut_at_max_output_tokens_is_incomplete(served: Served) -> None:
    response = served.client().responses.create(
        model=CHAT, input=FRANCE, temperature=0, max_output_tokens=2
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 2
    assert response.output[0].status == "incomplete"


# --- streams ----------------------------------------------------------------------------------

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
TEXT_DONE = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_stream_sends_openais_events_in_order(served: Served) -> None:
    client = served.client()
    whole = client.responses.create(model=CHAT, input=FRANCE, temperature=0, max_output_tokens=24)
    with client.responses.stream(
        model=CHAT, input=FRANCE, temperature=0, max_output_tokens=24
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == TEXT_EVENTS + ["response.output_text.delta"] * len(deltas) + TEXT_DONE
    assert len(deltas) > 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in deltas)
    assert text == whole.output_text == final.output_text
    done = events[-4]
    assert done.type == "response.output_text.done" and done.text == text
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and completed.type == "response.completed"
    assert created.response.status == "in_progress" and created.response.output == []
    assert created.response.id == completed.response.id == final.id
    message_id = events[2].item.id  # type: ignore[union-attr]
    assert all(e.item_id == message_id for e in deltas)
    assert completed.response.status == "completed"
    assert completed.response.usage is not None and whole.usage is not None
    assert completed.response.usage.output_tokens == whole.usage.output_tokens
    assert completed.response.usage.input_tokens == whole.usage.input_tokens
    # Stored as streamed.
    assert client.responses.retrieve(final.id).output_text == text


def test_stream_events_are_typed_server_sent_events(served: Served) -> None:
    """On the wire: an `event:` line naming each event's type before its `data:` line."""
    with httpx.stream(
        "POST",
        f"{served.live.url}/v1/responses",
        json={"model": CHAT, "input": FRANCE, "max_output_tokens": 4, "stream": True},
        headers={"authorization": f"Bearer {served.secret}"},
        timeout=60,
    ) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        blocks = reply.read().decode().strip().split("\n\n")
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line.removeprefix("data: "))["type"] == event_line[7:]
    assert blocks[-1].startswith("event: response.incomplete")


def test_disconnect_mid_stream_cancels_the_worker(served: Served) -> None:
    body = {
        "model": CHAT,
        "input": "Write a very long essay about the history of Europe.",
        "max_output_tokens": 2000,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{served.live.url}/v1/responses",
        json=body,
        timeout=60,
        headers={"authorization": f"Bearer {served.secret}"},
    ) as reply:
        request_id = reply.headers["x-request-id"]
        seen = 0
        for line in reply.iter_lines():
            if line == "event: response.output_text.delta":
                seen += 1
                if seen >= 5:
                    break
    [event] = wait_usage(request_id, timeout=30)
    assert event["status"] == "cancelled"
    assert seen <= int(event["output_tokens"]) < 2000


# --- structured output ------------------------------------------------------------------------


def _valid_city(value: Any) -> None:
    assert isinstance(value, dict) and set(value) == {"city", "country", "population"}
    assert isinstance(value["city"], str) and len(value["city"]) <= 40
    assert isinstance(value["country"], str) and len(value["country"]) <= 40
    assert isinstance(value["population"], int) and 0 <= value["population"] <= 99999999


class City(BaseModel):
    """CITY_SCHEMA as a pydantic model (bounded like it: without a maximum, a small model
    can write digits until max_output_tokens, as the 4-bit SmolLM2 did for Italy)."""

    city: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population: int = Field(ge=0, le=99_999_999)


def test_json_schema_format_gives_valid_json(served: Served) -> None:
    client = served.client()
    response = client.responses.create(
        model=CHAT,
        input="Describe the capital of France as JSON.",
        text={
            "format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}
        },
        temperature=0,
        max_output_tokens=80,
    )
    assert response.status == "completed"
    _valid_city(json.loads(response.output_text))
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    # The SDK's own structured outputs: a pydantic model in, the parsed object out.
    parsed = client.responses.parse(
        model=CHAT,
        input="Describe the capital of Italy as JSON.",
        text_format=City,
        temperature=0,
        max_output_tokens=80,
    )
    assert isinstance(parsed.output_parsed, City)
    # json_object: any JSON object.
    obj = client.responses.create(
        model=CHAT,
        input="Describe Paris as a JSON object.",
        text={"format": {"type": "json_object"}},
        temperature=0,
        max_output_tokens=60,
    )
    # (This small model may ramble on inside the object until max_output_tokens.)
    assert obj.output_text.startswith("{")
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


# --- function calls ---------------------------------------------------------------------------


def _weather_arguments(arguments: str) -> dict[str, Any]:
    value = json.loads(arguments)
    assert set(value) == {"city", "unit"}
    assert isinstance(value["city"], str) and value["unit"] in {"celsius", "fahrenheit"}
    return dict(value)


def test_required_and_named_function_calls_then_the_second_turn(served: Served) -> None:
    client = served.client()
    required = client.responses.create(
        model=CHAT,
        input=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=80,
    )
    assert required.status == "completed"
    [call] = required.output
    assert call.type == "function_call"
    assert call.id is not None and call.id.startswith("fc_")
    assert call.call_id.startswith("call_") and call.status == "completed"
    assert call.name in {"get_weather", "get_time"}
    if call.name == "get_weather":
        _weather_arguments(call.arguments)
    else:
        assert isinstance(json.loads(call.arguments)["timezone"], str)
    assert required.tool_choice == "required"
    assert [t.name for t in required.tools] == ["get_weather", "get_time"]  # type: ignore[union-attr]

    named = client.responses.create(
        model=CHAT,
        input=ASK_WEATHER,
        tools=[TIME, WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=80,
    )
    [weather] = named.output
    assert weather.type == "function_call" and weather.name == "get_weather"
    arguments = _weather_arguments(weather.arguments)
    assert named.tool_choice.type == "function"  # type: ignore[union-attr]

    # The second turn: the function's output, chained to the call's response.
    answer = client.responses.create(
        model=CHAT,
        previous_response_id=named.id,
        input=[
            {
                "type": "function_call_output",
                "call_id": weather.call_id,
                "output": json.dumps({"temperature": 21, "unit": arguments["unit"]}),
            }
        ],
        tools=[TIME, WEATHER],
        tool_choice="none",
        temperature=0,
        max_output_tokens=40,
    )
    # The fp32 built-in ended this answer within 40 tokens; the 4-bit one does not end it
    # within 120 (it repeats itself: issue 16's note). Either way the turn was chained and
    # answered, and the chat form below must give the same greedy text.
    assert answer.previous_response_id == named.id
    assert answer.status == "completed" or (
        answer.status == "incomplete"
        and answer.incomplete_details is not None
        and answer.incomplete_details.reason == "max_output_tokens"
    )
    [message] = answer.output
    assert message.type == "message" and answer.output_text
    # The same conversation as chat messages: the call on the assistant turn, its result
    # as a tool message; the same prompt, the same greedy answer.
    chat = client.chat.completions.create(
        model=CHAT,
        messages=[
            {"role": "user", "content": ASK_WEATHER},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": weather.call_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": weather.arguments},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": weather.call_id,
                "content": json.dumps({"temperature": 21, "unit": arguments["unit"]}),
            },
        ],
        tools=[
            {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
            for t in (TIME, WEATHER)
        ],
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    assert answer.usage is not None and chat.usage is not None
    assert answer.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.output_text == chat.choices[0].message.content
    items = client.responses.input_items.list(answer.id, order="asc").data
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].id == weather.id and items[2].call_id == weather.call_id  # type: ignore[union-attr]


def test_streamed_function_call_arguments_assemble(served: Served) -> None:
    client = served.client()
    kwargs: Any = {
        "model": CHAT,
        "input": ASK_WEATHER,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "temperature": 0,
        "max_output_tokens": 80,
    }
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    pieces = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(pieces),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert len(pieces) > 1
    added = events[2]
    assert added.type == "response.output_item.added"
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    arguments = "".join(p.delta for p in pieces)
    _weather_arguments(arguments)
    [call] = final.output
    assert call.type == "function_call" and call.arguments == arguments
    assert whole.output[0].arguments == arguments  # type: ignore[union-attr]


# --- stored responses -------------------------------------------------------------------------


def test_retrieve_list_input_items_and_delete(served: Served) -> None:
    client = served.client()
    items: Any = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": FRANCE},
    ]
    created = client.responses.create(
        model=CHAT, input=items, temperature=0, max_output_tokens=8, metadata={"team": "geo"}
    )
    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    assert fetched.metadata == {"team": "geo"}

    listed = client.responses.input_items.list(created.id)
    assert listed.has_more is False
    newest_first = listed.data
    assert [i.role for i in newest_first] == ["user", "assistant", "user", "developer"]  # type: ignore[union-attr]
    assert newest_first[1].type == "message"
    assert newest_first[1].content[0].type == "output_text"  # type: ignore[union-attr]
    assert newest_first[0].content[0].text == FRANCE  # type: ignore[union-attr]
    ids = [i.id for i in newest_first]
    assert len(set(ids)) == 4 and all(i.startswith("msg_") for i in ids)
    assert (listed.first_id, listed.last_id) == (ids[0], ids[-1])
    # Pages: two at a time, oldest first, `after` the last one seen.
    first = client.responses.input_items.list(created.id, limit=2, order="asc")
    assert [i.id for i in first.data] == ids[::-1][:2] and first.has_more is True
    second = client.responses.input_items.list(
        created.id, limit=2, order="asc", after=first.data[-1].id
    )
    assert [i.id for i in second.data] == ids[::-1][2:] and second.has_more is False
    # The SDK's auto-pagination walks the same cursor.
    assert [i.id for i in client.responses.input_items.list(created.id, limit=1)] == ids

    with pytest.raises(openai.BadRequestError) as err:
        client.responses.input_items.list(created.id, limit=101)
    assert err.value.param == "limit"

    deleted = _raw(served, "DELETE", f"responses/{created.id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": created.id, "object": "response.deleted", "deleted": True}
    for call in (
        lambda: client.responses.retrieve(created.id),
        lambda: client.responses.input_items.list(created.id),
        lambda: client.responses.delete(created.id),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert missing.value.body["message"] == f"Response with id '{created.id}' not found."
    assert not StoredResponse.objects.filter(id=created.id).exists()


def test_nul_characters_are_stored_and_given_back_as_sent(served: Served) -> None:
    """PostgreSQL's jsonb refuses \\u0000; the store keeps JSON text, so it round-trips."""
    raw = b'{"model": "%s", "input": "Say hi\\u0000 \\ud83d\\ude00!", "max_output_tokens": 2}' % (
        CHAT.encode()
    )
    created = httpx.post(
        f"{served.live.url}/v1/responses",
        content=raw,
        timeout=60,
        headers={"authorization": f"Bearer {served.secret}", "content-type": "application/json"},
    )
    assert created.status_code == 200, created.text
    response_id = created.json()["id"]
    listed = _raw(served, "GET", f"responses/{response_id}/input_items")
    assert listed.json()["data"][0]["content"][0]["text"] == "Say hi\x00 \U0001f600!"
    assert _raw(served, "GET", f"responses/{response_id}").json() == created.json()


def test_another_organizations_response_is_404_and_cannot_be_chained(served: Served) -> None:
    created = served.client().responses.create(model=CHAT, input=FRANCE, max_output_tokens=4)
    other = OrganizationFactory()
    _, other_secret = make_api_key(other, scopes=["inference"])
    stranger = served.client(secret=other_secret)
    unknown = "resp_" + "x" * 24
    for response_id in (created.id, unknown):
        with pytest.raises(openai.NotFoundError) as err:
            stranger.responses.retrieve(response_id)
        assert err.value.body["message"] == f"Response with id '{response_id}' not found."
        with pytest.raises(openai.NotFoundError):
            stranger.responses.input_items.list(response_id)
        with pytest.raises(openai.NotFoundError):
            stranger.responses.delete(response_id)
    # Still there for its owner.
    assert served.client().responses.retrieve(created.id).id == created.id
    with pytest.raises(openai.BadRequestError) as err:
        stranger.responses.create(
            model=CHAT, input="Go on.", previous_response_id=created.id, max_output_tokens=4
        )
    assert err.value.param == "previous_response_id"
    assert err.value.code == "previous_response_not_found"


def test_store_false_is_neither_retrievable_nor_chainable(served: Served) -> None:
    client = served.client()
    response = client.responses.create(model=CHAT, input=FRANCE, store=False, max_output_tokens=4)
    assert response.store is False and response.output_text
    assert not StoredResponse.objects.filter(id=response.id).exists()
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model=CHAT, input="And Italy?", previous_response_id=response.id, max_output_tokens=4
        )
    assert err.value.param == "previous_response_id"


def test_chaining_prepends_the_previous_conversation(served: Served) -> None:
    client = served.client()
    first = client.responses.create(
        model=CHAT, input=FRANCE, instructions="Be brief.", temperature=0, max_output_tokens=16
    )
    second = client.responses.create(
        model=CHAT,
        input="And of Italy?",
        previous_response_id=first.id,
        temperature=0,
        max_output_tokens=16,
    )
    # Chat sees the same conversation (instructions are not carried over, as OpenAI does).
    chat = client.chat.completions.create(
        model=CHAT,
        messages=[
            {"role": "user", "content": FRANCE},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And of Italy?"},
        ],
        temperature=0,
        max_tokens=16,
    )
    assert second.usage is not None and chat.usage is not None
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [i.id for i in items] == [
        client.responses.input_items.list(first.id).data[0].id,
        first.output[0].id,
        items[2].id,
    ]


def test_expired_response_is_gone(served: Served) -> None:
    client = served.client()
    created = client.responses.create(model=CHAT, input=FRANCE, max_output_tokens=4)
    StoredResponse.objects.filter(id=created.id).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(
            model=CHAT, input="Go on.", previous_response_id=created.id, max_output_tokens=4
        )
    assert err.value.param == "previous_response_id"


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"extra_body": {"frobnicate": True}}, "frobnicate"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
        ({"tools": [{**WEATHER, "name": "get weather"}]}, "tools[0].name"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"previous_response_id": "resp_" + "x" * 24}, "previous_response_id"),
        ({"input": [{"role": "wizard", "content": "hi"}]}, "input.0.role"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0"),
        (
            {"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
            "input[0].call_id",
        ),
        ({"input": []}, "input"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}},
            "text.format.schema",
        ),
        ({"max_output_tokens": 9000}, "input"),
    ],
)
def test_bad_input_is_400_naming_param_and_nothing_is_reserved(
    served: Served, params: dict[str, Any], param: str
) -> None:
    wallet = _wallet(served)
    kwargs: dict[str, Any] = {"model": CHAT, "input": FRANCE, **params}
    with pytest.raises(openai.BadRequestError) as err:
        served.client().responses.create(**kwargs)
    assert err.value.param == param
    assert err.value.type == "invalid_request_error"
    request_id = err.value.response.headers["x-request-id"]
    time.sleep(0.3)  # a usage event, had the request been dispatched, would be there by now
    assert usage_events(request_id) == []
    assert get_redis().hget(wallet, "reserved_nanos") in (None, "0")
    assert not StoredResponse.objects.filter(organization=served.org).exists()


def test_other_model_kinds_and_methods_are_refused(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        served.client().responses.create(model=EMBED, input="hi")
    assert err.value.code == "model_not_supported"
    wrong = _raw(served, "GET", "responses")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    unrouted = _raw(served, "POST", "responses/resp_x/cancel")
    assert unrouted.status_code == 404
