"""Service tiers end to end with the official `openai` client: a real gateway, real workers,
a real model, the real usage stream (docs/service_tiers.md)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import openai
import pytest

from catalog.models import Endpoint
from catalog.services import endpoint_publish, pool_ensure
from core.redis import get_redis
from tests.factories import OrganizationFactory, make_api_key
from tests.gateway.conftest import CHAT, Served
from tests.support.metrics import scraped
from workers import contract
from workers.contract import USAGE_STREAM

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]


def ask(
    client: openai.OpenAI, model: str, content: str, tier: str, *, stream: bool, max_tokens: int
) -> None:
    """One chat request in `tier`, streamed (read to its end) or not."""
    created = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        service_tier=tier,  # type: ignore[arg-type]
        stream=stream,
    )
    if stream:
        list(created)  # type: ignore[arg-type]


def usage_class(request_id: str) -> str | None:
    for _, fields in get_redis().xrange(USAGE_STREAM):
        if fields.get("request_id") == request_id:  # type: ignore[union-attr]
            return str(fields.get("service_class"))  # type: ignore[union-attr]
    return None


def wait_usage(request_id: str) -> str | None:
    deadline = time.time() + 10
    while time.time() < deadline:
        found = usage_class(request_id)
        if found is not None:
            return found
        time.sleep(0.1)
    return None


@pytest.mark.parametrize(
    ("asked", "reported", "metered"),
    [
        (None, "default", "online"),
        ("auto", "default", "online"),
        ("default", "default", "online"),
        ("priority", "priority", "priority"),
        ("flex", "flex", "flex"),
    ],
)
def test_the_tier_asked_for_is_served_reported_and_metered(
    served: Served, asked: str | None, reported: str, metered: str
) -> None:
    client = served.client()
    extra: dict[str, Any] = {} if asked is None else {"service_tier": asked}
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, **extra
    )
    reply = raw.parse()
    assert reply.service_tier == reported
    assert wait_usage(raw.headers["x-request-id"]) == metered
    # Streams report it in every chunk; completions and responses too.
    chunks = list(
        client.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=3,
            stream=True,
            **extra,
        )
    )
    assert chunks and {c.service_tier for c in chunks} == {reported}
    # The SDK's legacy completions have no service_tier argument: sent as an extra field.
    completion = client.completions.create(model=CHAT, prompt="Hi", max_tokens=2, extra_body=extra)
    assert completion.model_extra is not None
    assert completion.model_extra["service_tier"] == reported
    response = client.responses.create(model=CHAT, input="Hi", max_output_tokens=16, **extra)
    assert response.service_tier == reported


def test_each_tier_is_reserved_and_settled_at_its_prices(served: Served) -> None:
    """The gateway parks each request's cost at its tier's prices (priority twice the
    online ones, flex half: the default multipliers), as the drain and the invoice count it
    (tests/billing/test_tier_prices.py)."""
    from decimal import Decimal

    from billing import wallet_keys
    from billing.wallet import prices_compute

    client = served.client()
    prices = prices_compute(served.org.id)[CHAT]
    parked: dict[str, tuple[int, int]] = {}
    for tier, service_class in (("default", "online"), ("priority", "priority"), ("flex", "flex")):
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT,
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=4,
            service_tier=tier,  # type: ignore[arg-type]
        )
        reply = raw.parse()
        assert reply.usage is not None
        details = reply.usage.prompt_tokens_details
        expected = prices.for_class(service_class).cost(
            input_tokens=reply.usage.prompt_tokens,
            output_tokens=reply.usage.completion_tokens,
            # the prefix cache serves the later requests' prompts
            cached_input_tokens=(details.cached_tokens or 0) if details else 0,
        )
        pending = wallet_keys.pending_key(served.org.id)
        deadline = time.time() + 10
        while (found := get_redis().hget(pending, raw.headers["x-request-id"])) is None:
            assert time.time() < deadline, f"{tier}: nothing settled"
            time.sleep(0.05)
        parked[service_class] = (int(str(found).split(":")[0]), expected)
    assert all(cost == expected for cost, expected in parked.values()), parked
    online, priority, flex = (
        Decimal(prices.for_class(c).input) for c in ("online", "priority", "flex")
    )
    assert (priority, flex) == (online * 2, online / 2)
    assert parked["priority"][0] > parked["flex"][0]


def test_provisioned_units_serve_as_scale_at_no_token_cost_and_refuse_past_them(
    served: Served,
) -> None:
    """One unit sold (refusing traffic past it) on the organization's chat endpoint: a
    request with no service_tier runs within it (reported `scale`, metered `provisioned`,
    nothing parked per token); while a long stream holds the unit the next such request
    is a 429 naming the units, and one asking for the default tier runs pay-as-you-go."""
    from django.utils import timezone

    from billing import provisioned as billing_provisioned
    from billing import wallet_keys
    from billing.periods import hour_start
    from tests.billing.factories import staff_principal

    endpoint = served.endpoints[CHAT]
    billing_provisioned.commitment_create(
        principal=staff_principal(), org=served.org, endpoint_id=endpoint.id, units=1,
        unit_hour_price="3", overflow="refuse", starts_at=hour_start(timezone.now()),
        reason="e2e",
    )  # fmt: skip
    billing_provisioned.provisioned_sync()
    client = served.client()

    raw = client.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
    )

    reply = raw.parse()
    assert reply.service_tier == "scale"
    assert wait_usage(raw.headers["x-request-id"]) == "provisioned"
    pending = wallet_keys.pending_key(served.org.id)
    assert get_redis().hget(pending, raw.headers["x-request-id"]) is None  # 0 per token
    holder: dict[str, Any] = {}

    def hold() -> None:
        holder["stream"] = list(
            client.chat.completions.create(
                model=CHAT,
                messages=[{"role": "user", "content": "Tell a long story."}],
                max_tokens=400,
                logit_bias={"2": -100},
                stream=True,
            )
        )

    thread = threading.Thread(target=hold)
    thread.start()
    units = billing_provisioned.inflight_key(endpoint.id, served.org.id)
    deadline = time.time() + 30
    while get_redis().zcard(units) < 1:
        assert time.time() < deadline, "the stream never took the unit"
        time.sleep(0.02)
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
        assert "provisioned throughput unit" in str(refused.value)
        paid = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
            service_tier="default",
        )  # fmt: skip
        assert paid.service_tier == "default"
        # n choices are n rows: never within the units (pay-as-you-go, not refused).
        several = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, n=2
        )
        assert several.service_tier == "default" and len(several.choices) == 2
    finally:
        thread.join(120)
    assert {c.service_tier for c in holder["stream"]} == {"scale"}
    # Given back when the stream ended: the gateway settles on leaving the stream, just
    # after `[DONE]` went out, so the client can look a moment before. (A place left
    # behind would stay listed: expired places are only dropped by the next take.)
    given_back = time.time() + 10
    while get_redis().zcard(units) and time.time() < given_back:
        time.sleep(0.02)
    assert get_redis().zcard(units) == 0


def test_every_node_consumes_its_pools_priority_queue(served: Served) -> None:
    """What lets the gateway send the priority tier to `inference.<pool>.priority`."""
    client = get_redis()
    nodes = client.zrange(contract.pool_live_key("cpu"), 0, -1)
    assert nodes
    for node in nodes:
        info = json.loads(client.get(contract.worker_info_key(str(node))) or "{}")
        assert contract.priority_queue("cpu") in info["queues"], info


def test_an_unknown_tier_is_a_400_naming_it(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        served.client().chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            service_tier="platinum",  # type: ignore[arg-type]
        )
    assert raised.value.body is not None
    assert raised.value.body["param"] == "service_tier"  # type: ignore[index]


def test_flex_that_cannot_start_in_time_is_a_429_with_retry_after_and_costs_nothing(
    served: Served,
) -> None:
    """A pool of one row busy with a long default-tier answer: a flex request waits
    MANTLE_FLEX_MAX_WAIT_S and is refused with OpenAI's 429 resource_unavailable, streamed
    or not, never served late or dropped; the default request goes on."""
    stack = served.live.stack
    pool = pool_ensure(name="flexpool", region="local", providers=["CPUExecutionProvider"])
    endpoint = Endpoint.objects.create(
        organization=served.org,
        name="flex-chat",
        pool=pool,
        model_version=served.endpoints[CHAT].model_version,
    )
    endpoint_publish(endpoint)
    worker = stack.worker(
        "flexpool",
        name="flex-worker",
        concurrency=4,
        MANTLE_MAX_BATCH="1",
        MANTLE_FLEX_MAX_WAIT_S="1",
    )
    client = served.client()
    busy: dict[str, Any] = {}
    running = threading.Event()

    def long_answer() -> None:
        stream = client.chat.completions.create(
            model=endpoint.id,
            messages=[{"role": "user", "content": "Write a very long story about the sea."}],
            max_tokens=400,
            logit_bias={"2": -100},  # no end of sequence: it runs its 400 tokens
            stream=True,
        )
        for chunk in stream:
            running.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                busy["finish_reason"] = chunk.choices[0].finish_reason

    try:
        runner = threading.Thread(target=long_answer)
        runner.start()
        # The long answer holds the one row (and the burst row is priority's) once its first
        # token came: on a loaded machine a fixed sleep was not always long enough.
        assert running.wait(60)
        refused = []
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as raised:
                ask(client, endpoint.id, "hi", "flex", stream=stream, max_tokens=2)
            refused.append(raised.value)
        runner.join(120)
    finally:
        stack.stop(worker)
    for error in refused:
        assert error.code == "resource_unavailable", error.body
        assert error.response.headers["retry-after"] == "30"
    assert busy["finish_reason"] in ("length", "stop")


def test_a_quiet_organization_is_served_while_another_floods_the_pool(served: Served) -> None:
    """Organization A sends twice as many long answers as the pool has task slots; B then
    asks one short question. A holds at most MANTLE_FAIR_POOL_ORG_SHARE of the slots (its
    surplus waits at the gateway, in no queue of B's), and in the engine B's request is
    within its fair share of rows: B's answer comes back while A's first answers are still
    being written, and every answer of A's comes back too."""
    stack = served.live.stack
    pool = pool_ensure(name="fairpool", region="local", providers=["CPUExecutionProvider"])
    version = served.endpoints[CHAT].model_version
    endpoint_a = Endpoint.objects.create(
        organization=served.org, name="fair-a", pool=pool, model_version=version
    )
    endpoint_publish(endpoint_a)
    org_b = OrganizationFactory()
    endpoint_b = Endpoint.objects.create(
        organization=org_b, name="fair-b", pool=pool, model_version=version
    )
    endpoint_publish(endpoint_b)
    _, secret_b = make_api_key(org_b, scopes=["inference"])
    worker = stack.worker("fairpool", name="fair-worker", concurrency=4, MANTLE_MAX_BATCH="2")
    # A's surplus waits at the gateway for one of A's own answers to end, up to
    # MANTLE_FAIR_POOL_WAIT_S, then gets a 429 with retry-after (by design): A retries, as
    # the official SDKs do by default (on a loaded machine an answer can outlast the wait).
    client_a = served.client().with_options(max_retries=20)
    client_b = served.client(secret_b)
    finished: list[tuple[str, float]] = []
    lock = threading.Lock()
    writing = threading.Event()  # one of A's answers has begun to arrive

    def flood(i: int) -> None:
        # Streamed, so that B is sent once A's answers are being written, whatever the
        # machine's speed; long enough (300 tokens, end of sequence biased away) that
        # none can end in the time B's short answer takes.
        tokens = 0
        for chunk in client_a.chat.completions.create(
            model=endpoint_a.id,
            messages=[{"role": "user", "content": f"Tell story number {i}."}],
            max_tokens=300,
            logit_bias={"2": -100},
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                writing.set()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        with lock:
            finished.append((f"a{i}:{tokens}", time.time()))

    try:
        threads = [threading.Thread(target=flood, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        assert writing.wait(120), "none of A's answers began"
        quiet = client_b.chat.completions.create(
            model=endpoint_b.id, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
        )
        with lock:
            finished.append(("b", time.time()))
        for t in threads:
            t.join(300)
    finally:
        stack.stop(worker)
    assert quiet.choices[0].message.content
    order = [name for name, _ in sorted(finished, key=lambda f: f[1])]
    assert order[0] == "b", order  # before any of A's answers ended
    assert sorted(n for n in order if n != "b") == sorted(f"a{i}:300" for i in range(8))


def test_a_surges_flex_refusal_comes_before_the_prompt_is_rendered_and_tokenized(
    served: Served,
) -> None:
    """With the pool at its bound, a flex request is refused at once, before its prompt is
    rendered and tokenized (gateway/pool_share.shed): a prompt over the model's context,
    which tokenizing answers with a 400, gets the 429. The default tier, which may still
    wait for a place, is tokenized as before; flex is served again once places free."""
    from gateway import pool_share

    client = served.client()
    key = pool_share.pool_key(served.endpoints[CHAT].pool.name)
    surge = {f"surge-{i}": time.time() + 120 for i in range(1000)}  # past every tier's bound
    too_long = [{"role": "user", "content": "word " * 20_000}]
    get_redis().zadd(key, surge)  # type: ignore[arg-type]
    try:
        with pytest.raises(openai.RateLimitError) as flex:
            client.chat.completions.create(
                model=CHAT, messages=too_long, max_tokens=2, service_tier="flex"
            )
        with pytest.raises(openai.BadRequestError) as default:
            client.chat.completions.create(model=CHAT, messages=too_long, max_tokens=2)
    finally:
        get_redis().zrem(key, *surge)
    assert flex.value.code == "resource_unavailable", flex.value.body
    assert flex.value.response.headers["retry-after"] == "30"
    assert default.value.code == "context_length_exceeded", default.value.body
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=2,
        service_tier="flex",
    )
    assert reply.service_tier == "flex"


def ttft_count(url: str, tier: str) -> float:
    return scraped(url, "mantle_gateway_time_to_first_token_seconds_count", tier=tier)


def test_the_gateway_exports_time_to_first_token_by_tier(served: Served) -> None:
    """Each generation's first token is timed at the gateway from the request's arrival,
    by tier (an SLO's server-side figure; a load generator's own lag is not in it)."""
    stack = served.live.stack
    gateway = stack.start_gateway("gateway-ttft", env={"MANTLE_OPS_NETWORKS": "127.0.0.1/32"})
    try:
        stack.wait_serving(gateway)
        _first_tokens_counted(served, gateway.url)
    finally:
        stack.stop(gateway)


def _first_tokens_counted(served: Served, url: str) -> None:
    client = served.client(url=url)
    before = {tier: ttft_count(url, tier) for tier in ("priority", "default")}
    for stream in (True, False):
        ask(client, CHAT, "Say hi.", "priority", stream=stream, max_tokens=3)
    client.completions.create(model=CHAT, prompt="Hi", max_tokens=2)
    assert ttft_count(url, "priority") == before["priority"] + 2
    assert ttft_count(url, "default") == before["default"] + 1
