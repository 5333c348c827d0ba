"""gateway/agent.py without processes: tool checks, grammars, prompts, splitting answers."""

from __future__ import annotations

import json

import pytest

from gateway import agent
from gateway.errors import OpenAIError
from workers import grammar

WEATHER = agent.Tool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
ADD = agent.Tool("add", "", {"type": "object", "properties": {"a": {"type": "integer"}}})
TOOLS = [WEATHER, ADD]

CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ri\\"s", "n": [1, {"a": 2}]}}'
    '\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>'
)


def _texts(pieces: list[agent.Piece]) -> str:
    return "".join(p.text for p in pieces if isinstance(p, agent.Text))


def param_of(exc: pytest.ExceptionInfo[OpenAIError]) -> str | None:
    return exc.value.body()["error"]["param"]


@pytest.mark.parametrize("forced", [True, False])
@pytest.mark.parametrize("step", [1, 2, 5, 13, 10_000])
def test_streamed_calls_assemble_into_the_whole_answers_calls(forced: bool, step: int) -> None:
    whole_content, whole_calls = agent.split_tool_calls(CALLS, TOOLS, detect=True, forced=forced)
    stream = agent.ToolCallStream(TOOLS, detect=True, forced=forced)
    pieces: list[agent.Piece] = []
    for i in range(0, len(CALLS), step):
        pieces += stream.push(CALLS[i : i + step])
    pieces += stream.finish()
    names = {p.index: p.name for p in pieces if isinstance(p, agent.CallStart)}
    arguments: dict[int, str] = {}
    for p in pieces:
        if isinstance(p, agent.CallArguments):
            arguments[p.index] = arguments.get(p.index, "") + p.text
    assert not any(isinstance(p, agent.Text) for p in pieces)
    assert whole_content == "" and stream.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in whole_calls] == [
        ("get_weather", {"city": 'Pa}ri"s', "n": [1, {"a": 2}]}),
        ("add", {}),
    ]
    assert names == {0: "get_weather", 1: "add"}
    assert [json.loads(arguments[i]) for i in (0, 1)] == [
        json.loads(c.arguments) for c in whole_calls
    ]
    # A call's first piece says who is called, before any of its arguments.
    first = next(i for i, p in enumerate(pieces) if isinstance(p, agent.CallStart))
    assert all(not isinstance(p, agent.CallArguments) for p in pieces[:first])


@pytest.mark.parametrize(
    "text",
    [
        'I would call <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call> but no',
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}\n</tool_call>',  # broken JSON
        '<tool_call>\n{"name": "add", "arguments": [1]}\n</tool_call>',  # not an object
        '<tool_call>\n{"name": "add", "arguments": {}, "x": 1}\n</tool_call>',  # extra key
        '<tool_call>\n{"name": "add", "arguments": {}}',  # never closed
        "a < b and <tool_ca",
    ],
)
def test_a_malformed_call_the_model_chose_to_make_is_text(text: str) -> None:
    for step in (1, 4, 1000):
        stream = agent.ToolCallStream(TOOLS, detect=True)
        out = ""
        for i in range(0, len(text), step):
            out += "".join(
                p.text for p in stream.push(text[i : i + step]) if isinstance(p, agent.Text)
            )
        out += "".join(p.text for p in stream.finish() if isinstance(p, agent.Text))
        assert stream.calls == []
        assert out == text == stream.content


def test_text_before_a_call_is_content_and_key_order_does_not_matter() -> None:
    content, calls = agent.split_tool_calls(
        'Sure. <tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>',
        TOOLS,
        detect=True,
    )
    assert content == "Sure. "
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1})]
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29


def test_without_detection_everything_is_content() -> None:
    content, calls = agent.split_tool_calls(CALLS, TOOLS, detect=False)
    assert (content, calls) == (CALLS, [])


def test_generic_prompt_lists_tools_and_renders_calls_and_results() -> None:
    call = agent.ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    messages, variables = agent.template_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        ],
        TOOLS,
        native=False,
    )
    assert variables is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert messages[3]["content"] == (
        "<tool_response>\n18C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
    )
    # tool_choice none: the tools stay out of the prompt.
    plain, _ = agent.template_messages(
        [{"role": "user", "content": "hi"}], TOOLS, native=False, offer_tools=False
    )
    assert plain == [{"role": "user", "content": "hi"}]


def test_native_templates_get_the_tools_variable_and_structured_calls() -> None:
    assert agent.native_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not agent.native_tools("{{ messages[0]['content'] }}")
    call = agent.ToolCall("call_1", "add", '{"a": 1}')
    messages, variables = agent.template_messages(
        [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "2", "tool_call_id": "call_1"},
        ],
        TOOLS,
        native=True,
    )
    assert variables is not None and variables[1]["function"]["name"] == "add"
    assert messages[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1}}
    assert messages[1] == {"role": "tool", "content": "2", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("tools", "param", "words"),
    [
        ([WEATHER, WEATHER], "tools[1].function.name", "Duplicate"),
        ([agent.Tool("bad name")], "tools[0].function.name", "Invalid tool name"),
        (
            [agent.Tool("x", parameters={"type": "object", "properties": {"a": {"not": {}}}})],
            "tools[0].function.parameters",
            "unsupported keywords",
        ),
        (
            [agent.Tool("x", parameters={"type": "wat"})],
            "tools[0].function.parameters",
            "Invalid type",
        ),
        ([agent.Tool("x", "d" * 5000)], "tools[0].function.description", "4096"),
    ],
)
def test_bad_tools_are_400_naming_the_tool(tools: list[agent.Tool], param: str, words: str) -> None:
    with pytest.raises(OpenAIError) as exc:
        agent.check_tools(tools, lambda i: f"tools[{i}].function")
    assert param_of(exc) == param
    assert words in exc.value.body()["error"]["message"]


def test_tool_choice_must_name_a_tool_and_required_needs_tools() -> None:
    assert agent.tool_choice_of(None, TOOLS) == "auto"
    assert agent.tool_choice_of(None, []) == "none"
    assert agent.tool_choice_of("add", TOOLS) == "add"
    for choice, tools in (("subtract", TOOLS), ("required", [])):
        with pytest.raises(OpenAIError) as exc:
            agent.tool_choice_of(choice, tools)
        assert param_of(exc) == "tool_choice"


def test_schemas_that_are_too_large_or_too_complex_are_refused() -> None:
    huge = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(5000)}}
    with pytest.raises(OpenAIError) as exc:
        agent.grammar_for([], "none", parallel=True, json_schema=huge)
    assert param_of(exc) == "response_format"
    assert "bytes" in exc.value.body()["error"]["message"]
    # Small as JSON (3 KiB), but its combinations of alternatives expand past the limits.
    costly = {
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
    with pytest.raises(OpenAIError) as exc:
        agent.grammar_for([], "none", parallel=True, json_schema=costly)
    assert param_of(exc) == "response_format"
    assert "too complex" in exc.value.body()["error"]["message"]


def test_grammar_choice_follows_tool_choice_then_format() -> None:
    assert agent.grammar_for(TOOLS, "auto", parallel=True) == ""
    assert agent.grammar_for(TOOLS, "none", parallel=True, json_object=True) == (
        grammar.json_grammar(None)
    )
    forced = agent.grammar_for(TOOLS, "add", parallel=True, json_object=True)
    assert '\\"add\\"' in forced and "get_weather" not in forced
    assert "get_weather" in agent.grammar_for(TOOLS, "required", parallel=False)


def test_the_tools_schemas_together_have_a_budget_and_errors_stay_short() -> None:
    field = {"type": "string", "description": "x" * 200}
    big = {"type": "object", "properties": {f"p{i}": field for i in range(250)}}  # ~60 KiB
    tools = [agent.Tool(f"t{k}", parameters=big) for k in range(5)]  # ~300 KiB together
    with pytest.raises(OpenAIError) as exc:
        agent.check_tools(tools, lambda i: f"tools[{i}].function")
    assert param_of(exc) == "tools"
    assert str(grammar.MAX_REQUEST_SCHEMA_BYTES) in exc.value.body()["error"]["message"]
    # llguidance quotes the grammar in its errors (here ~48 KB of it): the client gets a
    # short message on one line that still says what is wrong.
    props: dict[str, object] = {f"p{i}": field for i in range(200)}
    props["bad"] = {"type": "string", "pattern": "(a"}
    with pytest.raises(OpenAIError) as exc:
        agent.check_tools(
            [agent.Tool("t", parameters={"type": "object", "properties": props})],
            lambda i: f"tools[{i}].function",
        )
    assert param_of(exc) == "tools[0].function.parameters"
    message = exc.value.body()["error"]["message"]
    assert "unclosed group" in message
    assert len(message) <= grammar.MAX_ERROR_CHARS + 40 and "\n" not in message


def test_plan_checks_off_the_event_loop_only_when_there_is_something_to_compile() -> None:
    import asyncio
    import threading

    seen: list[str] = []
    original = agent.check_tools

    def spy(tools: list[agent.Tool], param: object) -> None:
        seen.append(threading.current_thread().name)
        original(tools, param)  # type: ignore[arg-type]

    async def run() -> tuple[agent.Plan, agent.Plan]:
        plain = await agent.plan([], None, parallel=True, tool_param=str)
        forced = await agent.plan(TOOLS, "add", parallel=True, tool_param=str)
        return plain, forced

    agent.check_tools = spy  # type: ignore[assignment]
    try:
        plain, forced = asyncio.run(run())
    finally:
        agent.check_tools = original  # type: ignore[assignment]
    assert plain == agent.Plan((), "none", True, "")
    assert forced.forced and forced.detect and '\\"add\\"' in forced.grammar
    assert seen[0] == threading.main_thread().name and seen[1] != seen[0]
