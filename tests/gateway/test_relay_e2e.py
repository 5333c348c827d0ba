"""Upstream providers end to end (docs/providers.md): a relaying gateway process in front of a
second Mantle gateway (an OpenAI-compatible provider, with its own worker and model), driven
by the official `openai` client; usage metered once from the provider's own counts."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from catalog.models import RouteTarget
from catalog.services import endpoint_publish
from tests.factories import make_api_key
from tests.gateway.conftest import CHAT, ECHO, EMBED, Served
from tests.gateway.relay_support import (
    client,
    provider,
    relayed_endpoint,
    upstream_org_key,
    wait_usage,
)
from tests.support.stack import Process
from tests.support.upstream_fake import UpstreamFake

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]


def test_a_model_served_by_a_second_mantle_answers_streams_and_is_metered_once(
    served: Served, relay_gateway: Process
) -> None:
    upstream = provider("second-mantle", f"{served.live.url}/v1", upstream_org_key())
    relayed_endpoint(
        "relayed-chat",
        "chat",
        [
            {
                "kind": "provider",
                "provider": upstream,
                "upstream_model": CHAT,
                "cost_input": Decimal("0.0000002"),
                "cost_output": Decimal("0.0000004"),
            }
        ],
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    direct = served.client().chat.completions.create(
        model=CHAT, messages=messages, max_tokens=8, temperature=0
    )
    relay = client(relay_gateway.url, served.secret)
    raw = relay.chat.completions.with_raw_response.create(
        model="relayed-chat", messages=messages, max_tokens=8, temperature=0
    )
    reply = raw.parse()
    assert reply.model == "relayed-chat"
    assert reply.choices[0].message.content == direct.choices[0].message.content
    assert raw.headers["x-mantle-served-by"] == f"provider:second-mantle/{CHAT}"
    assert reply.usage is not None
    events = wait_usage(raw.headers["x-request-id"])
    assert len(events) == 1
    event = events[0]
    assert event["organization_id"] == served.org.id
    assert event["model_name"] == "relayed-chat"
    assert event["provider_id"] == upstream.id
    assert event["estimated"] == "0"
    assert int(event["input_tokens"]) == reply.usage.prompt_tokens
    assert int(event["output_tokens"]) == reply.usage.completion_tokens
    expected = (
        reply.usage.prompt_tokens * Decimal("0.0000002")
        + reply.usage.completion_tokens * Decimal("0.0000004")
    ) * 1_000_000_000
    assert int(event["cost_nanos"]) == int(expected)

    # Streamed: the same text; the usage chunk the relay asked for is hidden unless asked.
    chunks = list(
        relay.chat.completions.create(
            model="relayed-chat", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    assert all(c.usage is None for c in chunks)
    assert all(c.model == "relayed-chat" for c in chunks)
    with_usage = list(
        relay.chat.completions.create(
            model="relayed-chat",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].usage is not None and not with_usage[-1].choices
    assert with_usage[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_and_embeddings_are_relayed(served: Served, relay_gateway: Process) -> None:
    upstream = provider("second-mantle-2", f"{served.live.url}/v1", upstream_org_key())
    relayed_endpoint(
        "relayed-echo",
        "chat",
        [{"kind": "provider", "provider": upstream, "upstream_model": ECHO}],
    )
    relayed_endpoint(
        "relayed-embed",
        "embedding",
        [{"kind": "provider", "provider": upstream, "upstream_model": EMBED}],
    )
    relay = client(relay_gateway.url, served.secret)
    direct = served.client().completions.create(model=ECHO, prompt="one two three", max_tokens=3)
    relayed = relay.completions.create(model="relayed-echo", prompt="one two three", max_tokens=3)
    assert relayed.choices[0].text == direct.choices[0].text
    vectors = relay.embeddings.create(model="relayed-embed", input=["hello", "world"])
    direct_vectors = served.client().embeddings.create(model=EMBED, input=["hello", "world"])
    assert [v.embedding for v in vectors.data] == [v.embedding for v in direct_vectors.data]
    assert vectors.model == "relayed-embed"


def test_the_operator_moves_a_model_between_its_pool_and_a_provider(
    served: Served, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    """The customer calls the same name with the same key throughout. (The provider is the
    fake: a second gateway sharing this one's database would read the same route.)"""
    upstream = provider("fake-3", upstream_fake.openai_base_url, upstream_fake.key)
    endpoint = served.endpoints[ECHO]
    relay = client(relay_gateway.url, served.secret)

    def served_by() -> str:
        raw = relay.chat.completions.with_raw_response.create(
            model=ECHO, messages=[{"role": "user", "content": "ping pong"}], max_tokens=4
        )
        assert raw.parse().choices[0].message.content
        return str(raw.headers.get("x-mantle-served-by", "pool (no route)"))

    assert served_by() == "pool (no route)"
    RouteTarget.objects.create(
        endpoint=endpoint, kind="provider", provider=upstream, upstream_model=ECHO
    )
    endpoint_publish(endpoint)
    assert served_by() == f"provider:fake-3/{ECHO}"
    RouteTarget.objects.filter(endpoint=endpoint).delete()
    RouteTarget.objects.create(endpoint=endpoint, kind="pool")
    endpoint_publish(endpoint)
    assert served_by() == "pool:cpu"


def test_the_platform_limits_apply_to_relayed_requests(
    served: Served, relay_gateway: Process
) -> None:
    upstream = provider("second-mantle-4", f"{served.live.url}/v1", upstream_org_key())
    relayed_endpoint(
        "relayed-limited",
        "chat",
        [{"kind": "provider", "provider": upstream, "upstream_model": ECHO}],
    )
    _, secret = make_api_key(served.org, scopes=["inference"], rpm_limit=1)
    relay = client(relay_gateway.url, secret)
    messages = [{"role": "user", "content": "hi"}]
    relay.chat.completions.create(model="relayed-limited", messages=messages, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as refused:
        relay.chat.completions.create(model="relayed-limited", messages=messages, max_tokens=2)
    assert refused.value.code == "rate_limit_exceeded"


def test_a_provider_at_a_private_address_is_refused_without_the_allow_list(
    served: Served,
) -> None:
    """The session's gateway has no allow-list: a provider on loopback (or the cloud
    metadata address) is never called, and the customer's request is not billed."""
    relayed_endpoint(
        "relayed-metadata",
        "chat",
        [
            {
                "kind": "provider",
                "provider": provider("metadata", "http://169.254.169.254/v1", "x"),
                "upstream_model": "m",
            },
            {
                "kind": "provider",
                "provider": provider("loopback", f"{served.live.url}/v1", "x"),
                "upstream_model": ECHO,
                "position": 1,
            },
        ],
    )
    with pytest.raises(openai.APIStatusError) as refused:
        served.client().chat.completions.with_raw_response.create(
            model="relayed-metadata", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert refused.value.status_code == 502
    body = refused.value.body
    assert isinstance(body, dict) and body.get("code") == "upstream_unavailable"
    request_id = refused.value.response.headers["x-request-id"]
    assert wait_usage(request_id, timeout=1) == []


def test_a_route_back_to_the_relay_itself_stops(served: Served, relay_gateway: Process) -> None:
    """An operator's mistake: a provider that is this platform, for a model it relays."""
    itself = provider("itself", f"{relay_gateway.url}/v1", upstream_org_key())
    relayed_endpoint(
        "loop-model",
        "chat",
        [{"kind": "provider", "provider": itself, "upstream_model": "loop-model"}],
    )
    with pytest.raises(openai.APIStatusError) as stopped:
        client(relay_gateway.url, served.secret).chat.completions.create(
            model="loop-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert stopped.value.status_code == 508
    assert stopped.value.code == "relay_loop"
