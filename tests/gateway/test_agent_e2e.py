"""The agent API end to end (issue 15) with the official `openai` client: tools, structured
outputs, log probabilities, n and logit_bias, against a real gateway, worker and model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import BaseModel
from tokenizers import Tokenizer

from core.redis import get_redis
from tests.gateway.conftest import CHAT, Served
from tests.gateway.test_openai_e2e import usage_events, wait_usage

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}
NAMED_X = {"name": "x"}
ASK: Any = [{"role": "user", "content": "What is the weather like in Paris today?"}]

PERSON_SCHEMA: Any = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
        "student": {"type": "boolean"},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "student", "hobbies"],
    "additionalProperties": False,
}
HUGE_SCHEMA: Any = {
    "type": "object",
    "properties": {f"field_{i}": {"type": "string"} for i in range(3000)},
}
COSTLY_SCHEMA: Any = {
    "allOf": [
        {
            "anyOf": [
                {"type": "object", "properties": {f"a{j}{i}": {"type": "integer"}}}
                for i in range(8)
            ]
        }
        for j in range(6)
    ]
}
MANY_TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": f"tool_{k}",
            "parameters": {
                "type": "object",
                "properties": {f"field_{i}": {"type": "string"} for i in range(1500)},
            },
        },
    }
    for k in range(12)
]
DESCRIBE: Any = [
    {"role": "user", "content": "Invent a person who lives in Paris and describe them as JSON."}
]


def _valid_person(value: Any) -> None:
    assert isinstance(value, dict) and set(value) == set(PERSON_SCHEMA["required"])
    assert isinstance(value["name"], str) and len(value["name"]) <= 40
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
    assert isinstance(value["student"], bool)
    assert isinstance(value["hobbies"], list) and len(value["hobbies"]) <= 3
    assert all(isinstance(h, str) for h in value["hobbies"])


# --- tools -------------------------------------------------------------------------------


def test_required_tool_call_has_schema_valid_arguments(served: Served) -> None:
    completion = served.client().chat.completions.create(
        model=CHAT,
        messages=ASK,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in {"get_weather", "get_time"}
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in {"celsius", "fahrenheit"}
    else:
        assert isinstance(arguments["timezone"], str)


def test_named_function_is_called_and_streams_as_openai_deltas(served: Served) -> None:
    client = served.client()
    kwargs: Any = {
        "model": CHAT,
        "messages": ASK,
        "tools": [TIME_TOOL, WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "max_tokens": 80,
    }
    whole = client.chat.completions.create(**kwargs)
    call = (whole.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str) and arguments["unit"] in {"celsius", "fahrenheit"}

    deltas: list[Any] = []
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            deltas.extend(c.delta.tool_calls or [])
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    first = deltas[0]
    # id, type and name first, with empty arguments; then pieces of the arguments.
    assert first.id and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 2  # the arguments arrive in pieces
    assembled = "".join(d.function.arguments or "" for d in deltas)
    assert assembled == call.function.arguments


def test_a_conversation_with_tool_results_is_accepted(served: Served) -> None:
    messages: Any = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 18}'},
    ]
    completion = served.client().chat.completions.create(
        model=CHAT, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=30
    )
    choice = completion.choices[0]
    # With tool_choice auto the model answers in words or calls again; either is well formed.
    assert choice.finish_reason in {"stop", "length", "tool_calls"}
    assert choice.message.content or choice.message.tool_calls


def test_tool_choice_none_answers_in_words(served: Served) -> None:
    completion = served.client().chat.completions.create(
        model=CHAT,
        messages=ASK,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        temperature=0,
        max_tokens=20,
    )
    choice = completion.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in {"stop", "length"}


# --- structured outputs ------------------------------------------------------------------


def test_json_schema_output_validates_and_json_object_parses(served: Served) -> None:
    client = served.client()
    for strict in (True, False):
        completion = client.chat.completions.create(
            model=CHAT,
            messages=DESCRIBE,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": strict},
            },
            temperature=0.7,
            seed=3,
            max_tokens=200,
        )
        assert completion.choices[0].finish_reason == "stop"
        _valid_person(json.loads(completion.choices[0].message.content or ""))
    mode = client.chat.completions.create(
        model=CHAT,
        messages=DESCRIBE,
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    assert isinstance(json.loads(mode.choices[0].message.content or ""), dict)


class Person(BaseModel):
    name: str
    age: int
    city: str


def test_parse_with_a_pydantic_model(served: Served) -> None:
    completion = served.client().chat.completions.parse(
        model=CHAT, messages=DESCRIBE, response_format=Person, temperature=0, max_tokens=120
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person)
    assert isinstance(parsed.age, int)


# --- sampling and scoring ----------------------------------------------------------------


def test_logprobs_with_top_alternatives(served: Served) -> None:
    completion = served.client().chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    usage = completion.usage
    assert usage is not None
    # One entry per generated token, the end-of-turn token excepted.
    ended = choice.finish_reason == "stop"
    assert len(entries) == usage.completion_tokens - (1 if ended else 0)
    text = b"".join(bytes(e.bytes or []) for e in entries).decode()
    assert text == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the likeliest.
        assert entry.token == entry.top_logprobs[0].token
        assert math.isclose(entry.logprob, tops[0], abs_tol=1e-5)
        assert sum(math.exp(t) for t in tops) <= 1.0 + 1e-5


def test_n_choices_share_one_prompt_and_are_all_billed(served: Served) -> None:
    client = served.client()
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=DESCRIBE, n=4, temperature=1.0, seed=11, max_tokens=6
    )
    completion = raw.parse()
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in completion.choices]
    assert len(set(texts)) > 1  # each choice draws on its own
    usage = completion.usage
    assert usage is not None
    single = client.chat.completions.create(
        model=CHAT, messages=DESCRIBE, temperature=1.0, seed=11, max_tokens=6
    )
    assert single.usage is not None and usage.prompt_tokens == single.usage.prompt_tokens
    assert all(c.finish_reason == "length" for c in completion.choices)
    assert usage.completion_tokens == 4 * 6
    # The same seed draws the same choices, and choice 0 is what n=1 draws.
    again = client.chat.completions.create(
        model=CHAT, messages=DESCRIBE, n=4, temperature=1.0, seed=11, max_tokens=6
    )
    assert [c.message.content for c in again.choices] == texts
    assert single.choices[0].message.content == texts[0]
    events = wait_usage(raw.headers["x-request-id"])
    assert len(events) == 1
    assert int(events[0]["input_tokens"]) == usage.prompt_tokens
    assert int(events[0]["output_tokens"]) == 4 * 6


def test_n_choices_stream_with_their_indexes(served: Served) -> None:
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in served.client().chat.completions.create(
        model=CHAT, messages=DESCRIBE, n=3, temperature=1.0, seed=5, max_tokens=6, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert sorted(texts) == [0, 1, 2] and finishes == {0: "length", 1: "length", 2: "length"}
    whole = served.client().chat.completions.create(
        model=CHAT, messages=DESCRIBE, n=3, temperature=1.0, seed=5, max_tokens=6
    )
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]


def test_n_reserves_every_choices_worst_case(served: Served) -> None:
    redis = get_redis()
    redis.hset(f"mantle:wallet:{served.org.id}", mapping={"mode": "prepaid", "cap_nanos": 10**6})
    redis.hset(
        f"mantle:price:{served.org.id}:{CHAT}", mapping={"in": 0, "out": 1000, "req": 0, "ms": 0}
    )
    client = served.client()
    # One choice of 600 tokens fits in the cap; four do not.
    client.chat.completions.create(model=CHAT, messages=ASK, max_tokens=600, n=1, stop=["."])
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model=CHAT, messages=ASK, max_tokens=600, n=4)
    assert exc.value.code == "insufficient_quota"


def test_logit_bias_steers_greedy_decoding(served: Served) -> None:
    manifest = next(m for m in served.live.manifests if m["name"] == CHAT)
    tokenizer = Tokenizer.from_file(str(Path(manifest["location"]) / manifest["tokenizer_file"]))
    client = served.client()

    def first_token(**kwargs: Any) -> str:
        completion = client.completions.create(
            model=CHAT,
            prompt="The capital of France is",
            temperature=0,
            max_tokens=2,
            logprobs=0,
            **kwargs,
        )
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens
        return logprobs.tokens[0]

    greedy = first_token()
    greedy_id = tokenizer.encode(greedy, add_special_tokens=False).ids[0]
    assert tokenizer.decode([greedy_id]) == greedy
    assert first_token(logit_bias={str(greedy_id): -100}) != greedy
    banana = tokenizer.encode(" banana", add_special_tokens=False).ids[0]
    assert first_token(logit_bias={str(banana): 100}) == tokenizer.decode([banana])


def test_completions_echo_with_prompt_logprobs(served: Served) -> None:
    prompt = "The capital of France is"
    completion = served.client().completions.create(
        model=CHAT, prompt=prompt, echo=True, logprobs=2, temperature=0, max_tokens=3
    )
    choice = completion.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    logprobs = choice.logprobs
    assert logprobs is not None
    tokens = logprobs.tokens or []
    assert "".join(tokens) == choice.text
    assert logprobs.token_logprobs is not None and logprobs.token_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.top_logprobs is not None and logprobs.top_logprobs[0] is None
    assert all(t is not None and 1 <= len(t) <= 2 for t in logprobs.top_logprobs[1:])
    offsets = logprobs.text_offset or []
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 3


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools[1].function.name"),
        (
            {
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "x"}},
            },
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "nonsense"}},
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}},
                }
            },
            "response_format",
        ),
        # Attacks on the compiler: a schema over 64 KiB, and a small one whose combinations
        # of alternatives expand past the grammar limits. Both refused before anything runs.
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "big", "schema": HUGE_SCHEMA},
                }
            },
            "response_format",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": COSTLY_SCHEMA}}
                ]
            },
            "tools[0].function.parameters",
        ),
        # Many tools, each under its own limit, over the request's budget together.
        ({"tools": MANY_TOOLS}, "tools"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"n": 9}, "n"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_agent_fields_are_400_and_nothing_is_reserved(
    served: Served, params: dict[str, Any], param: str
) -> None:
    redis = get_redis()
    wallet = f"mantle:wallet:{served.org.id}"
    redis.hset(wallet, mapping={"mode": "prepaid", "cap_nanos": 10**9})
    redis.hset(
        f"mantle:price:{served.org.id}:{CHAT}", mapping={"in": 100, "out": 100, "req": 0, "ms": 0}
    )
    with pytest.raises(openai.BadRequestError) as exc:
        served.client().chat.completions.with_raw_response.create(
            model=CHAT, messages=ASK, max_tokens=5, **params
        )
    body = exc.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    request_id = exc.value.response.headers["x-request-id"]
    state = redis.hgetall(wallet)
    assert int(state.get("reserved_nanos", 0)) == 0
    assert int(state.get("pending_nanos", 0)) == 0
    assert usage_events(request_id) == []
