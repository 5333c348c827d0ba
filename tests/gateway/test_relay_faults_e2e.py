"""The relay against a provider that misbehaves on command (tests/support/upstream_fake.py):
Azure OpenAI's scheme, retries honouring retry-after, fallback, the circuit breaker, a stream
cut mid-way, no usage, a content-filter refusal, a slow first byte, a client that leaves, the
provider's concurrency. Real processes: the relaying gateway, the fake, Redis."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from accounts.models import Organization
from catalog.models import Provider
from tests.factories import OrganizationFactory, make_api_key
from tests.gateway.relay_support import (
    LOOPBACK_ALLOWED,
    client,
    provider,
    relayed_endpoint,
    usage_events,
    wait_usage,
)
from tests.reliability.support import wait_until
from tests.support.metrics import scraped
from tests.support.stack import Process, Stack
from tests.support.upstream_fake import UpstreamFake

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def relay_gateway(django_db_setup: None) -> Iterator[Process]:
    """A gateway allowed to reach loopback providers; no worker, no model of its own."""
    stack = Stack.for_tests()
    try:
        proc = stack.start_gateway(
            "gateway-relay-faults",
            env={**LOOPBACK_ALLOWED, "MANTLE_OPS_NETWORKS": "127.0.0.1/32"},  # its /metrics
        )
        stack.wait_serving(proc)
        yield proc
    finally:
        stack.stop_all()


@dataclass
class Customer:
    org: Organization
    secret: str


@pytest.fixture
def served(transactional_db: None) -> Customer:
    """An organization calling the relay (named as the end-to-end fixture it stands for)."""
    org = OrganizationFactory()
    _, secret = make_api_key(org, scopes=["inference"])
    return Customer(org=org, secret=secret)


MESSAGES = [{"role": "user", "content": "one two three four five"}]


def azure(fake: UpstreamFake, name: str, **extra: Any) -> Provider:
    return provider(
        name,
        fake.azure_endpoint,
        fake.key,
        kind=Provider.Kind.AZURE_OPENAI,
        api_version="2024-10-21",
        **extra,
    )


def openai_scheme(fake: UpstreamFake, name: str, **extra: Any) -> Provider:
    return provider(name, fake.openai_base_url, fake.key, **extra)


def one_target(model: str, upstream: Provider, **extra: Any) -> None:
    relayed_endpoint(
        model,
        "chat",
        [{"kind": "provider", "provider": upstream, "upstream_model": "gpt-4o", **extra}],
    )


def test_azure_scheme_whole_and_streamed_with_only_documented_headers(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-chat", azure(upstream_fake, "azure-1"))
    relay = client(relay_gateway.url, served.secret)
    raw = relay.chat.completions.with_raw_response.create(
        model="az-chat", messages=MESSAGES, max_tokens=50
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == "echo: one two three four five"
    assert reply.model == "az-chat"
    assert raw.headers["x-mantle-served-by"] == "provider:azure-1/gpt-4o"
    chunks = list(
        relay.chat.completions.create(
            model="az-chat", messages=MESSAGES, max_tokens=50, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["echo:", "one", "two", "three", "four", "five"]
    assert all(c.usage is None for c in chunks)  # the usage chunk the relay asked for: hidden
    seen = upstream_fake.requests()
    assert [r["path"] for r in seen] == ["/openai/deployments/gpt-4o/chat/completions"] * 2
    for entry in seen:
        assert entry["query"] == {"api-version": "2024-10-21"}
        assert entry["secrets"]["api-key"] == {"present": True, "matched": True}
        # The customer's Mantle key never leaves the platform; nothing else of theirs either.
        assert (
            "authorization" not in entry["secrets"]
            or not entry["secrets"]["authorization"]["present"]
        )
        names = {n.lower() for n in entry["headers"]}
        assert names <= {
            "host",
            "content-type",
            "accept",
            "user-agent",
            "content-length",
            "accept-encoding",
            "connection",
            "x-mantle-relay-hops",  # the relay's own, documented
        }
        assert entry["headers"]["x-mantle-relay-hops"] == "1"
        assert "model" not in entry["body"]
    assert seen[1]["body"]["stream_options"] == {"include_usage": True}
    # Metered once each, from the provider's usage (words in the fake).
    event = wait_usage(raw.headers["x-request-id"])
    assert len(event) == 1 and event[0]["estimated"] == "0"
    assert event[0]["input_tokens"] == "5" and event[0]["output_tokens"] == "6"


def test_a_429_with_retry_after_is_waited_for_and_retried(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-retry", azure(upstream_fake, "azure-2"))
    upstream_fake.add_faults({"status": 429, "retry_after": 1})
    started = time.monotonic()
    reply = client(relay_gateway.url, served.secret).chat.completions.create(
        model="az-retry", messages=MESSAGES, max_tokens=50
    )
    assert reply.choices[0].message.content
    assert time.monotonic() - started >= 1.0  # the provider's retry-after was honoured
    assert [r["status"] for r in upstream_fake.requests()] == [429, 200]


def test_failures_move_to_the_next_target_and_cool_the_failing_one_down(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    """A target that keeps failing (here: its credential is refused) is cooled after three
    failed requests, one failure each however often a request retried (one client request
    cannot cool a shared target for everyone)."""
    broken = provider(
        "azure-3",
        upstream_fake.azure_endpoint,
        "a-revoked-key",
        kind=Provider.Kind.AZURE_OPENAI,
        api_version="2024-10-21",
    )
    relayed_endpoint(
        "az-fallback",
        "chat",
        [
            {"kind": "provider", "provider": broken, "upstream_model": "gpt-4o"},
            {
                "kind": "provider",
                "provider": openai_scheme(upstream_fake, "backup-3"),
                "upstream_model": "gpt-4o-mini",
                "position": 1,
            },
        ],
    )
    relay = client(relay_gateway.url, served.secret)
    azure_path = "/openai/deployments/gpt-4o/chat/completions"

    def ask() -> tuple[str, list[str]]:
        seen = max((r["seq"] for r in upstream_fake.requests()), default=0)
        raw = relay.chat.completions.with_raw_response.create(
            model="az-fallback", messages=MESSAGES, max_tokens=50
        )
        return raw.headers["x-mantle-served-by"], [
            r["path"] for r in upstream_fake.requests(since=seen)
        ]

    for _ in range(3):
        assert ask() == ("provider:backup-3/gpt-4o-mini", [azure_path, "/v1/chat/completions"])
    # Three failed requests in a row cooled the Azure target: the next goes straight on.
    assert ask() == ("provider:backup-3/gpt-4o-mini", ["/v1/chat/completions"])
    # After the cooldown (5 s in this gateway) the first target is tried again.
    time.sleep(5.5)
    assert ask() == ("provider:backup-3/gpt-4o-mini", [azure_path, "/v1/chat/completions"])


def test_a_cooled_target_that_is_the_only_one_still_serves(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-only", azure(upstream_fake, "azure-13"))
    relay = client(relay_gateway.url, served.secret)
    for _ in range(3):
        upstream_fake.add_faults(*[{"status": 500}] * 3)
        with pytest.raises(openai.APIStatusError):
            relay.chat.completions.create(model="az-only", messages=MESSAGES, max_tokens=5)
    # Cooled now, but the route has nothing else: it is still tried (and answers).
    reply = relay.chat.completions.create(model="az-only", messages=MESSAGES, max_tokens=50)
    assert reply.choices[0].message.content


def test_nothing_answers_is_a_clean_error_and_nothing_is_billed(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-down", azure(upstream_fake, "azure-4"))
    upstream_fake.add_faults(*[{"status": 500}] * 3)
    with pytest.raises(openai.APIStatusError) as failed:
        client(relay_gateway.url, served.secret).chat.completions.create(
            model="az-down", messages=MESSAGES, max_tokens=50
        )
    assert failed.value.status_code == 502
    assert failed.value.code == "upstream_unavailable"
    assert usage_events(failed.value.response.headers["x-request-id"]) == []


def test_a_stream_cut_midway_ends_with_an_error_and_is_billed_once_as_estimated(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-cut", azure(upstream_fake, "azure-5"))
    upstream_fake.add_faults({"cut_after_chunks": 4})
    raw = httpx.post(
        f"{relay_gateway.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {served.secret}"},
        json={"model": "az-cut", "messages": MESSAGES, "max_tokens": 50, "stream": True},
        timeout=30,
    )
    assert raw.status_code == 200
    events = [line[6:] for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    assert json.loads(events[-1])["error"]["code"] == "upstream_stream_cut"
    texts = [
        c["choices"][0]["delta"].get("content") or ""
        for c in map(json.loads, events[:-1])
        if c.get("choices")
    ]
    assert "".join(texts)  # what came before the cut reached the client
    # Nothing retried after the first byte: one request at the provider.
    assert len(upstream_fake.requests()) == 1
    found = wait_usage(raw.headers["x-request-id"])
    assert len(found) == 1
    assert found[0]["estimated"] == "1" and int(found[0]["output_tokens"]) > 0


def test_a_provider_without_usage_is_counted_and_marked_estimated(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-nousage", azure(upstream_fake, "azure-6"))
    upstream_fake.add_faults({"no_usage": True})
    raw = client(relay_gateway.url, served.secret).chat.completions.with_raw_response.create(
        model="az-nousage", messages=MESSAGES, max_tokens=50
    )
    found = wait_usage(raw.headers["x-request-id"])
    assert len(found) == 1 and found[0]["estimated"] == "1"
    assert int(found[0]["input_tokens"]) > 0 and int(found[0]["output_tokens"]) > 0


def test_a_content_filter_refusal_reaches_the_client_as_the_documented_error(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-filter", azure(upstream_fake, "azure-7"))
    upstream_fake.add_faults({"content_filter": True})
    with pytest.raises(openai.BadRequestError) as refused:
        client(relay_gateway.url, served.secret).chat.completions.create(
            model="az-filter", messages=MESSAGES, max_tokens=50
        )
    assert refused.value.code == "content_filter"
    assert len(upstream_fake.requests()) == 1  # a refusal of the request is not retried
    assert usage_events(refused.value.response.headers["x-request-id"]) == []


def test_a_slow_first_byte_times_out_and_is_retried(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-slow", azure(upstream_fake, "azure-8", first_byte_timeout_s=1.0))
    upstream_fake.add_faults({"first_byte_delay_s": 4})
    chunks = list(
        client(relay_gateway.url, served.secret).chat.completions.create(
            model="az-slow", messages=MESSAGES, max_tokens=50, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(upstream_fake.requests()) >= 2
    # A whole (not streamed) answer comes when the provider has generated all of it: it has
    # until the request's deadline, not the first-byte time.
    upstream_fake.add_faults({"first_byte_delay_s": 2})
    seen = upstream_fake.requests()[-1]["seq"]
    reply = client(relay_gateway.url, served.secret).chat.completions.create(
        model="az-slow", messages=MESSAGES, max_tokens=50
    )
    assert reply.choices[0].message.content
    assert len(upstream_fake.requests(since=seen)) == 1


def test_a_client_that_leaves_mid_stream_is_metered_once(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-leave", azure(upstream_fake, "azure-9"))
    upstream_fake.add_faults({"chunk_delay_s": 0.3})
    with httpx.stream(
        "POST",
        f"{relay_gateway.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {served.secret}"},
        json={"model": "az-leave", "messages": MESSAGES, "max_tokens": 50, "stream": True},
        timeout=30,
    ) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                break
    found = wait_usage(request_id)
    assert len(found) == 1
    assert found[0]["status"] == "cancelled"
    time.sleep(1.0)
    assert len(usage_events(request_id)) == 1


def test_a_provider_at_its_concurrency_is_not_sent_more(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-busy", azure(upstream_fake, "azure-10", max_concurrency=1))
    upstream_fake.add_faults({"first_byte_delay_s": 3})
    relay = client(relay_gateway.url, served.secret)
    outcome: dict[str, Any] = {}
    seen = max((r["seq"] for r in upstream_fake.requests()), default=0)

    def slow() -> None:
        outcome["slow"] = relay.chat.completions.create(
            model="az-busy", messages=MESSAGES, max_tokens=50
        )

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(1.0)
    with pytest.raises(openai.RateLimitError) as busy:
        relay.chat.completions.create(model="az-busy", messages=MESSAGES, max_tokens=50)
    assert busy.value.code == "upstream_rate_limited"
    thread.join(10)
    assert outcome["slow"].choices[0].message.content
    # The refused request never reached the provider (the fake's in-flight figures also
    # count requests earlier tests left sleeping there, so the log is what is read).
    assert len(upstream_fake.requests(since=seen)) == 1


def test_another_organizations_provider_is_never_used_for_a_public_model(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    """The catalog refuses such a target; the relay refuses it again if one exists."""
    owned = azure(upstream_fake, "someone-elses", organization=served.org)
    one_target("az-owned", owned)
    _, secret = make_api_key(served.org, scopes=["inference"])
    with pytest.raises(openai.APIStatusError) as refused:
        client(relay_gateway.url, secret).chat.completions.create(
            model="az-owned", messages=MESSAGES, max_tokens=5
        )
    assert refused.value.status_code == 502
    assert upstream_fake.requests() == []


def test_the_responses_api_is_relayed_over_chat_completions(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    one_target("az-responses", azure(upstream_fake, "azure-11"))
    relay = client(relay_gateway.url, served.secret)
    first = relay.responses.create(model="az-responses", input="one two three")
    assert first.output_text == "echo: one two three"
    assert first.model == "az-responses"
    assert first.usage is not None and first.usage.input_tokens == 3
    # Stored as any response: the next turn continues it (the conversation goes upstream).
    second = relay.responses.create(
        model="az-responses",
        input="four five",
        previous_response_id=first.id,
        instructions="Be brief.",
    )
    assert second.output_text == "echo: four five"
    sent = upstream_fake.requests()[-1]["body"]
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["messages"][2]["content"] == "echo: one two three"
    assert relay.responses.retrieve(second.id).output_text == "echo: four five"
    # Streamed: the Responses events, in order, ending completed.
    events = list(relay.responses.create(model="az-responses", input="six seven", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "echo: six seven"


def test_a_key_limited_to_other_models_is_refused_before_the_provider_is_called(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    """Issue 20's allowlist through a real /v1 request, on a relayed model."""
    from accounts.principal import SYSTEM
    from accounts.services import api_key_controls_set

    one_target("az-allowed", azure(upstream_fake, "azure-12"))
    key, secret = make_api_key(served.org, scopes=["inference"])
    api_key_controls_set(
        principal=SYSTEM, key=key, monthly_budget=None, budget_mode="hard", allowed_models=["x"]
    )
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client(relay_gateway.url, secret).chat.completions.create(
            model="az-allowed", messages=MESSAGES, max_tokens=5
        )
    assert refused.value.code == "model_not_allowed"
    assert upstream_fake.requests() == []


def test_a_key_past_its_hard_budget_is_refused_before_the_provider_is_called(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    """Issue 20's per-key hard budget through a real /v1 request: refused by the gateway's
    admission step (429 insufficient_quota naming the key's budget) with nothing sent
    upstream, while another key of the same organization and project is served."""
    from accounts.principal import SYSTEM
    from billing.key_budgets import key_controls_set
    from billing.wallet import wallet_sync

    one_target("az-key-budget", azure(upstream_fake, "azure-13"))
    key, secret = make_api_key(served.org, scopes=["inference"])
    key_controls_set(principal=SYSTEM, key=key, monthly_budget="0.00", budget_mode="hard")
    wallet_sync(served.org)
    with pytest.raises(openai.RateLimitError) as refused:
        client(relay_gateway.url, secret).chat.completions.create(
            model="az-key-budget", messages=MESSAGES, max_tokens=5
        )
    assert refused.value.code == "insufficient_quota"
    assert "API key's monthly budget" in refused.value.message
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert upstream_fake.requests() == []
    # The provider's slot, taken in the admission's round trip, was given back before the
    # refusal went out: nothing holds one of the provider's or the organization's slots.
    from core.redis import get_redis

    held = get_redis().keys("mantle:relay:inflight*")
    assert not [key for key in held if get_redis().zcard(key)], held
    reply = client(relay_gateway.url, served.secret).chat.completions.create(
        model="az-key-budget", messages=MESSAGES, max_tokens=5
    )
    assert reply.choices[0].message.content
    assert len(upstream_fake.requests()) == 1


def test_a_relayed_requests_usage_and_cost_are_read_back_with_a_read_usage_key(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    """Issue 20's usage and cost API over real processes: a request through the relaying
    gateway is metered, stored by the real drain, and answered by the same server's
    /api/v1 to a read-usage key (an inference key is refused naming the scope), its cost a
    decimal string at the model's price, exact."""
    from decimal import Decimal

    from billing.metering.drain import usage_drain
    from billing.money import exact_amount
    from core.redis import get_redis

    one_target("az-usage", azure(upstream_fake, "azure-14"))
    raw = client(relay_gateway.url, served.secret).chat.completions.with_raw_response.create(
        model="az-usage", messages=MESSAGES, max_tokens=5
    )
    [event] = wait_usage(raw.headers["x-request-id"])
    usage_drain(consumer="test", client=get_redis(), once=True, hooks=())

    _, reader = make_api_key(served.org, scopes=["read-usage"])
    api = f"{relay_gateway.url}/api/v1/organizations/{served.org.id}"
    query = {
        "start_time": int(time.time()) - 3600,
        "bucket_width": "1d",
        "group_by": "model",
        "models": "az-usage",
    }
    refused = httpx.get(
        f"{api}/usage", params=query, headers={"authorization": f"Bearer {served.secret}"}
    )
    assert refused.status_code == 403 and "read-usage" in refused.json()["error"]["message"]
    auth = {"authorization": f"Bearer {reader}"}
    usage = httpx.get(f"{api}/usage", params=query, headers=auth, timeout=30)
    assert usage.status_code == 200, usage.text
    [used] = [r for b in usage.json()["data"] for r in b["results"]]
    assert used["model"] == "az-usage"
    assert used["requests"] == 1
    assert used["input_tokens"] == int(event["input_tokens"]) > 0
    assert used["output_tokens"] == int(event["output_tokens"]) > 0
    costs = httpx.get(f"{api}/costs", params=query, headers=auth, timeout=30)
    assert costs.status_code == 200, costs.text
    [cost] = [r for b in costs.json()["data"] for r in b["results"]]
    price = Decimal("0.000001")  # relayed_endpoint's price for every unit
    assert isinstance(cost["amount"]["value"], str)
    assert Decimal(cost["amount"]["value"]) == exact_amount(
        used["input_tokens"], price
    ) + exact_amount(used["output_tokens"], price)


def test_a_gateway_killed_holding_a_providers_slots_gives_them_back_within_a_lease(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    """A gateway dies (SIGKILL: OOM, a lost node) while its request holds all of a provider's
    slots. The slot was a lease its gateway renewed: held while the gateway lived, it ends
    within MANTLE_INFLIGHT_LEASE_S of the death, and the other gateway serves the model
    again instead of answering 429 until the dead request's deadline (the whole
    MANTLE_REQUEST_TIMEOUT_S, minutes)."""
    one_target(
        "az-lease", azure(upstream_fake, "azure-lease", max_concurrency=1, first_byte_timeout_s=120)
    )
    stack = Stack.for_tests()
    doomed = stack.start_gateway(
        "gateway-relay-doomed", env={**LOOPBACK_ALLOWED, "MANTLE_INFLIGHT_LEASE_S": "2"}
    )
    try:
        stack.wait_serving(doomed)
        seen = max((r["seq"] for r in upstream_fake.requests()), default=0)
        upstream_fake.add_faults({"first_byte_delay_s": 90})

        def held_by_the_doomed() -> None:
            with contextlib.suppress(openai.APIError):  # its gateway is killed under it
                client(doomed.url, served.secret).chat.completions.create(
                    model="az-lease", messages=MESSAGES, max_tokens=5
                )

        threading.Thread(target=held_by_the_doomed, daemon=True).start()
        assert wait_until(lambda: len(upstream_fake.requests(since=seen)) == 1, 30)
        survivor = client(relay_gateway.url, served.secret)
        time.sleep(3.0)  # past a lease: the live gateway renews it
        with pytest.raises(openai.RateLimitError) as busy:
            survivor.chat.completions.create(model="az-lease", messages=MESSAGES, max_tokens=5)
        assert busy.value.code == "upstream_rate_limited"
        stack.kill(doomed)
        answers: list[str] = []

        def served_again() -> bool:
            try:
                reply = survivor.chat.completions.create(
                    model="az-lease", messages=MESSAGES, max_tokens=5
                )
            except openai.RateLimitError:
                return False
            answers.append(reply.choices[0].message.content or "")
            return True

        # Within 30 s of the kill: the dead request's deadline is 120 s away
        # (MANTLE_REQUEST_TIMEOUT_S), its lease's end at most 2 s.
        assert wait_until(served_again, 30, interval=0.25), "the dead gateway's slot stayed"
        assert answers[0]
    finally:
        stack.stop_all()


def test_a_whole_answer_past_the_deadline_bills_its_prompt_and_is_not_sent_again(
    served: Customer, upstream_fake: UpstreamFake
) -> None:
    """The provider accepted the request (its headers came) and then sent half its answer
    and nothing more: at the request's deadline the client gets the timeout, the request is
    not tried again anywhere (another target is listed), and its prompt is metered once,
    estimated, with its cost of goods: the operator may be charged for it, so nobody
    computes for free by asking for answers that outlast the deadline."""
    from decimal import Decimal

    # Its first byte within 2 s: a whole answer then has until the deadline (4 s).
    first = openai_scheme(upstream_fake, "stall-1", first_byte_timeout_s=2)
    second = openai_scheme(upstream_fake, "stall-2")
    relayed_endpoint(
        "stall-chat",
        "chat",
        [
            {
                "kind": "provider",
                "provider": first,
                "upstream_model": "gpt-4o",
                "cost_input": Decimal("0.000001"),
                "cost_output": Decimal("0.000002"),
            },
            # Behind the first (a later position), so the first is always tried first.
            {"kind": "provider", "provider": second, "upstream_model": "gpt-4o", "position": 1},
        ],
    )
    upstream_fake.add_faults({"stall_after_chunks": 1})
    stack = Stack.for_tests()
    gateway = stack.start_gateway(
        "gateway-relay-deadline", env={**LOOPBACK_ALLOWED, "MANTLE_REQUEST_TIMEOUT_S": "4"}
    )
    try:
        stack.wait_serving(gateway)
        with pytest.raises(openai.APIStatusError) as timed_out:
            client(gateway.url, served.secret).chat.completions.create(
                model="stall-chat", messages=MESSAGES, max_tokens=50
            )
    finally:
        stack.stop(gateway)
    assert timed_out.value.status_code == 504, timed_out.value.body
    assert len(upstream_fake.requests()) == 1  # not retried, not sent to the second target
    [event] = wait_usage(timed_out.value.response.headers["x-request-id"])
    assert event["estimated"] == "1" and event["status"] == "timeout"
    assert int(event["input_tokens"]) > 0 and int(event["output_tokens"]) == 0
    assert event["provider_id"] == first.id
    assert int(event["cost_nanos"]) == int(
        int(event["input_tokens"]) * Decimal("0.000001") * 1_000_000_000
    )


def test_a_burst_takes_turns_and_leaves_no_turn_held(
    served: Customer, relay_gateway: Process, upstream_fake: UpstreamFake
) -> None:
    """A burst of relayed requests at one gateway process does its gateway work in turns
    (core/turns.py: handed from one request to the next), and whatever each request
    became (answered, a wrong key, a body that does not parse, the provider failing), no
    turn stays held or waited for."""
    import asyncio

    one_target("turns-burst", openai_scheme(upstream_fake, "turns-1"))
    upstream_fake.set_latency(50)
    upstream_fake.add_faults(*[{"status": 500}] * 4)
    handed_before = scraped(relay_gateway.url, "mantle_gateway_turns_handed_total")

    async def burst() -> list[int]:
        body = {"model": "turns-burst", "messages": MESSAGES, "max_tokens": 5}
        async with httpx.AsyncClient(base_url=relay_gateway.url, timeout=60) as http:

            async def one(secret: str, sent: dict[str, Any] = body) -> int:
                reply = await http.post(
                    "/v1/chat/completions",
                    json=sent,
                    headers={"authorization": f"Bearer {secret}"},
                )
                return reply.status_code

            wrong = "sk-mantle-not-a-key-of-anyone-000000"
            unparsed = {"model": "turns-burst", "max_tokens": 5}  # no messages
            return list(
                await asyncio.gather(
                    *(one(served.secret) for _ in range(32)),
                    *(one(wrong) for _ in range(8)),
                    *(one(served.secret, unparsed) for _ in range(4)),
                )
            )

    statuses = asyncio.run(burst())
    answered, refused, unparsed = statuses[:32], statuses[32:40], statuses[40:]
    assert answered.count(200) >= 30  # the provider's four 500s: retried, or a clean 502
    assert set(answered) <= {200, 502}
    assert set(refused) <= {401, 429}  # 429: this address has sent too many wrong keys
    assert unparsed == [400] * 4  # refused by the view itself: its wrapper gives the turn up
    assert scraped(relay_gateway.url, "mantle_gateway_turns_handed_total") > handed_before

    # A request waiting on its provider holds no turn: one that comes meanwhile does not wait
    # for it (a wait that ran out would be counted).
    expired = "mantle_gateway_turn_waits_expired_total"
    expired_before = scraped(relay_gateway.url, expired)
    upstream_fake.set_latency(1000)
    relay = client(relay_gateway.url, served.secret)

    def ask() -> None:
        relay.chat.completions.create(model="turns-burst", messages=MESSAGES, max_tokens=5)

    slow = threading.Thread(target=ask)
    slow.start()
    time.sleep(0.3)
    ask()
    slow.join()
    assert scraped(relay_gateway.url, expired) == expired_before

    # Clients that leave while their provider works leave nothing held either.
    leaving = client(relay_gateway.url, served.secret).with_options(timeout=0.3)
    for _ in range(4):
        with contextlib.suppress(openai.APITimeoutError):
            leaving.chat.completions.create(model="turns-burst", messages=MESSAGES, max_tokens=5)
    upstream_fake.set_latency(0)
    assert wait_until(
        lambda: (
            scraped(relay_gateway.url, "mantle_gateway_turns_held") == 0
            and scraped(relay_gateway.url, "mantle_gateway_turns_waiting") == 0
        ),
        timeout=10,
    )
