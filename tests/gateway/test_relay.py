"""The relay's pure parts: the order targets are tried in, what goes upstream, what the
provider's usage and refusals become (gateway/relay.py)."""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest

from catalog.selectors import ProviderConnection
from catalog.specs import EndpointSpec
from gateway import relay

SPEC = EndpointSpec(
    id="ep-x",
    name="m",
    organization_id=None,
    active=True,
    model_name="m",
    kind="chat",
    runtime="upstream",
    version_id="mv_x",
    sha256="",
    location="",
    tokenizer_file="",
    chat_template="",
    eos_token_ids=(),
    context_length=8192,
    max_input_tokens=8192,
    dimensions=0,
    pool="upstream",
    queue="inference.upstream",
    providers=(),
    rpm_limit=60,
    tpm_limit=100000,
    created=0,
)


def target(tid: str, position: int = 0, weight: int = 1, kind: str = "provider") -> dict[str, Any]:
    return {
        "id": tid,
        "kind": kind,
        "provider_id": "prv-1" if kind == "provider" else "",
        "model": "gpt",
        "position": position,
        "weight": weight,
        "cost_input": "0.000001",
        "cost_output": "0.000002",
        "cost_cached_input": "0.0000005",
    }


def _replace(targets: tuple[dict[str, Any], ...]) -> EndpointSpec:
    import dataclasses

    return dataclasses.replace(SPEC, targets=targets)


def test_no_targets_is_the_pool_alone() -> None:
    assert [t.kind for t in relay.route(SPEC)] == ["pool"]
    assert not SPEC.routed


def test_positions_are_tried_in_order_and_weights_share_the_first_place() -> None:
    spec = _replace(
        (target("b", 1), target("a1", 0, 3), target("a2", 0, 1), target("p", 2, kind="pool"))
    )
    assert spec.routed
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        order = [t.id for t in relay.route(spec)]
        assert set(order[:2]) == {"a1", "a2"}
        assert order[2:] == ["b", "p"]
        firsts[order[0]] += 1
    # a1 has weight 3 of 4: first about three times in four.
    assert 0.70 < firsts["a1"] / 4000 < 0.80


def test_cost_of_goods_in_nanos() -> None:
    t = relay.Target.of(target("a"))
    # 100 input (20 of them cached), 50 output.
    expected = 80 * Decimal("0.000001") + 20 * Decimal("0.0000005") + 50 * Decimal("0.000002")
    assert t.cost_nanos(100, 50, 20) == int(expected * 1_000_000_000)


def connection(kind: str) -> ProviderConnection:
    return ProviderConnection(
        id="prv-1",
        organization_id=None,
        name="p",
        kind=kind,
        base_url="https://res.openai.azure.com/"
        if kind == "azure-openai"
        else "https://api.example.com/v1",
        api_version="2024-10-21",
        credential="sk-upstream",
    )


def test_what_goes_to_azure_and_to_an_openai_compatible_server() -> None:
    call = relay.call_of(
        "chat/completions",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "service_tier": "priority",
            "store": True,
            "stream": True,
        },
        stream=True,
    )
    t = relay.Target.of(target("a"))
    url, headers, body = relay.upstream_request(connection("azure-openai"), t, call)
    assert url == (
        "https://res.openai.azure.com/openai/deployments/gpt/chat/completions"
        "?api-version=2024-10-21"
    )
    assert headers["api-key"] == "sk-upstream"
    assert "authorization" not in headers
    sent = json.loads(body)
    assert "model" not in sent and "service_tier" not in sent and "store" not in sent
    assert sent["stream_options"] == {"include_usage": True}
    # No maximum set by the client: the platform's default is sent (and reserved).
    assert sent["max_tokens"] == call.default_max_tokens and call.default_max_tokens

    url, headers, body = relay.upstream_request(connection("openai-compatible"), t, call)
    assert url == "https://api.example.com/v1/chat/completions"
    assert headers["authorization"] == "Bearer sk-upstream"
    assert set(headers) == {"content-type", "accept", "user-agent", "authorization"}
    assert json.loads(body)["model"] == "gpt"


def test_a_deployment_name_cannot_change_the_azure_path() -> None:
    call = relay.call_of("embeddings", {"model": "m", "input": "x"})
    t = relay.Target.of({**target("a"), "model": "../../admin?x=1"})
    url, _, _ = relay.upstream_request(connection("azure-openai"), t, call)
    assert url.startswith(
        "https://res.openai.azure.com/openai/deployments/..%2F..%2Fadmin%3Fx%3D1/"
    )


def test_admission_bounds_cover_the_prompt_and_every_choice() -> None:
    messages = [{"role": "user", "content": "é" * 100}]
    call = relay.call_of(
        "chat/completions", {"model": "m", "messages": messages, "max_tokens": 7, "n": 3}
    )
    assert call.completion_bound == 21
    assert call.default_max_tokens is None
    assert call.prompt_bound >= len(("é" * 100).encode())
    embed = relay.call_of("embeddings", {"model": "m", "input": ["a", "b"]})
    assert embed.completion_bound == 0


@pytest.mark.parametrize(
    ("usage", "counts"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}, (10, 3, 0)),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
            (10, 3, 4),
        ),
        ({"prompt_tokens": 5, "total_tokens": 5}, (5, 0, 0)),  # embeddings
        ({"prompt_tokens": 2, "prompt_tokens_details": {"cached_tokens": 9}}, (2, 0, 2)),
        (None, None),
        ("lots", None),
        ({"prompt_tokens": "many"}, None),
    ],
)
def test_usage_read_from_the_provider(usage: Any, counts: tuple[int, int, int] | None) -> None:
    assert relay.usage_counts(usage) == counts


def test_a_content_filter_refusal_passes_through_with_its_code() -> None:
    raw = json.dumps(
        {
            "error": {
                "message": "The response was filtered due to the prompt triggering Azure "
                "OpenAI's content management policy.",
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {"code": "ResponsibleAIPolicyViolation"},
            }
        }
    ).encode()
    error = relay.passed_through(400, raw)
    assert error.status == 400
    assert error.code == "content_filter"
    assert error.param == "prompt"
    assert "content management policy" in error.message
    garbage = relay.passed_through(400, b"<html>")
    assert garbage.status == 400 and garbage.message


def test_the_credential_is_not_in_the_connection_repr() -> None:
    assert "sk-upstream" not in repr(connection("openai"))


def test_a_responses_conversation_becomes_a_chat_completion() -> None:
    from gateway import agent
    from gateway.endpoints.responses import relayed_chat
    from gateway.protocol_responses import ResponseCreateRequest

    body = ResponseCreateRequest.model_validate(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": "hi",
            "max_output_tokens": 9,
            "text": {"format": {"type": "json_object"}},
        }
    )
    plan = agent.Plan(
        tools=(agent.Tool(name="lookup", parameters={"type": "object"}),),
        choice="lookup",
        parallel=False,
        grammar="",
    )
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"},
    ]
    chat = relayed_chat(body, plan, items)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    assert chat["max_tokens"] == 9
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert chat["response_format"] == {"type": "json_object"}
