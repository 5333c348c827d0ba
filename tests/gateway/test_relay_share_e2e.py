"""An organization's share of an operator's provider (docs/providers.md, "Concurrency and
each organization's share") through real processes: the relaying gateway, the fake provider
(tests/support/upstream_fake.py) made slow so that a flood's requests are in flight
together, Redis.

The provider has `max_concurrency` 4 and the gateway MANTLE_PROVIDER_ORG_SHARE 0.5: an
organization holds at most 2 of its slots, alone or not, and another organization finds the
other 2 free. An organization's own provider has no share.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import openai
import pytest

from accounts.models import Organization
from catalog.models import Endpoint, Model, ModelVersion, Provider, RouteTarget
from catalog.services import endpoint_publish, pool_ensure
from core.redis import get_redis
from tests.factories import OrganizationFactory, make_api_key, price_model
from tests.gateway.relay_support import LOOPBACK_ALLOWED, client, provider, relayed_endpoint
from tests.support.stack import Process, Stack
from tests.support.upstream_fake import UpstreamFake

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Every request the fake answers takes this long: long enough that a flood's requests,
# sent together, are all in flight at once.
LATENCY_MS = 4000
REFUSED = "upstream_rate_limited"


@pytest.fixture(scope="module")
def share_gateway(django_db_setup: None) -> Iterator[Process]:
    """A gateway that reaches the fake on loopback, for the operator's providers and for
    organizations' own; an organization's share of an operator's provider is one half."""
    stack = Stack.for_tests()
    try:
        proc = stack.start_gateway(
            "gateway-relay-share",
            env={
                **LOOPBACK_ALLOWED,
                "MANTLE_PROVIDER_ORG_SHARE": "0.5",
                "MANTLE_PROVIDER_BYOK": "true",
                "MANTLE_PROVIDER_BYOK_ALLOWED_HTTP": "127.0.0.1",
                "MANTLE_PROVIDER_BYOK_ALLOWED_PRIVATE": "127.0.0.1",
            },
        )
        stack.wait_serving(proc)
        yield proc
    finally:
        stack.stop_all()


@pytest.fixture
def slow_fake(upstream_fake: UpstreamFake) -> Iterator[UpstreamFake]:
    upstream_fake.set_latency(LATENCY_MS)
    try:
        yield upstream_fake
    finally:
        upstream_fake.set_latency(0)


@dataclass
class Flood:
    """Requests of one organization sent together, each in its own thread: `outcomes`
    holds each one's answer text, or the code of its refusal."""

    tag: str
    outcomes: list[str | None]
    threads: list[threading.Thread] = field(default_factory=list)

    def answered(self) -> list[str]:
        return [o for o in self.outcomes if o is not None and o != REFUSED]

    def refused(self) -> int:
        return sum(1 for o in self.outcomes if o == REFUSED)

    def join(self) -> Flood:
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive()
        return self


def flood(url: str, secret: str, model: str, tag: str, n: int, *, stream: bool = False) -> Flood:
    """`n` requests of `tag` at once (a barrier releases them together)."""
    sent = Flood(tag, [None] * n)
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        relay = client(url, secret)
        messages = [{"role": "user", "content": f"{tag} {i}"}]
        barrier.wait()
        try:
            if stream:
                chunks = relay.chat.completions.create(
                    model=model, messages=messages, max_tokens=20, stream=True
                )
                sent.outcomes[i] = "".join(
                    c.choices[0].delta.content or "" for c in chunks if c.choices
                )
            else:
                reply = relay.chat.completions.create(model=model, messages=messages, max_tokens=20)
                sent.outcomes[i] = reply.choices[0].message.content or ""
        except openai.RateLimitError as exc:
            sent.outcomes[i] = str(exc.code)

    sent.threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in sent.threads:
        thread.start()
    return sent


def wait_for(what: Callable[[], bool], timeout: float = 20) -> bool:
    """Whether `what` came true within `timeout` seconds."""
    give_up = time.monotonic() + timeout
    while not what():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.05)
    return True


def at_fake(fake: UpstreamFake, tag: str, since: int, outcome: str | None = None) -> int:
    """The requests of `tag` the fake received after `since` (with that outcome)."""
    return sum(
        1
        for r in fake.requests(since=since)
        if (r["body"] or {}).get("messages", [{}])[0].get("content", "").startswith(f"{tag} ")
        and (outcome is None or r["outcome"] == outcome)
    )


def in_flight(upstream: Provider) -> int:
    return int(get_redis().zcard(f"mantle:relay:inflight:{upstream.id}"))


def customer() -> tuple[Organization, str]:
    org = OrganizationFactory()
    _, secret = make_api_key(org, scopes=["inference"])
    return org, secret


def test_a_flooding_organization_holds_its_share_and_another_is_still_served(
    share_gateway: Process, slow_fake: UpstreamFake
) -> None:
    """Organization A sends 6 requests at once to a provider of 4 slots, nobody else active:
    it gets its share, 2, and its 4 others are refused (429 upstream_rate_limited) without
    reaching the provider. While A's 2 are in flight, organization B's 2 are served: A
    could not take the slots B needed. Afterwards every place is given back (whole answers
    beside the reply, streams at their end) and A has its share again."""
    shared = provider("shared-openai", slow_fake.openai_base_url, slow_fake.key, max_concurrency=4)
    relayed_endpoint(
        "share-chat", "chat", [{"kind": "provider", "provider": shared, "upstream_model": "gpt"}]
    )
    _, a_secret = customer()
    _, b_secret = customer()
    url = share_gateway.url
    seen = max((r["seq"] for r in slow_fake.requests()), default=0)

    a = flood(url, a_secret, "share-chat", "org-a", 6)
    # A alone: its share in flight at the provider, the rest refused at once.
    assert wait_for(
        lambda: a.refused() == 4 and at_fake(slow_fake, "org-a", seen, "pending") == 2
    ), (a.outcomes, at_fake(slow_fake, "org-a", seen, "pending"))
    assert in_flight(shared) == 2
    b = flood(url, b_secret, "share-chat", "org-b", 2, stream=True)
    b.join()
    a.join()
    assert len(a.answered()) == 2 and a.refused() == 4
    assert sorted(b.outcomes) == ["echo: org-b 0", "echo: org-b 1"]
    # The refused requests never reached the provider.
    assert at_fake(slow_fake, "org-a", seen) == 2
    assert at_fake(slow_fake, "org-b", seen) == 2

    # Every slot and every organization's place given back.
    assert wait_for(lambda: in_flight(shared) == 0), in_flight(shared)
    assert not get_redis().keys(f"mantle:relay:inflight-org:{shared.id}:*")
    again = flood(url, a_secret, "share-chat", "org-a-again", 3, stream=True).join()
    assert len(again.answered()) == 2 and again.refused() == 1


def test_an_organizations_own_provider_has_no_share(
    share_gateway: Process, slow_fake: UpstreamFake
) -> None:
    """Only its organization calls it: all its `max_concurrency` is the organization's."""
    org, secret = customer()
    own = provider("own-openai", slow_fake.openai_base_url, slow_fake.key, max_concurrency=4)
    own.organization = org
    own.save(update_fields=["organization"])
    model = Model.objects.create(
        name="own-chat", kind="chat", context_length=8192, organization=org
    )
    version = ModelVersion.objects.create(
        model=model, version=1, runtime="upstream", sha256="", location=""
    )
    pool = pool_ensure(name="upstream", region="any", providers=[])
    endpoint = Endpoint.objects.create(
        name="own-chat", model_version=version, pool=pool, organization=org
    )
    RouteTarget.objects.create(
        endpoint=endpoint, kind="provider", provider=own, upstream_model="gpt"
    )
    endpoint_publish(endpoint)
    price_model("own-chat", "chat", unit_price="0.000001")

    mine = flood(share_gateway.url, secret, endpoint.id, "own", 5).join()
    assert len(mine.answered()) == 4 and mine.refused() == 1  # the provider's own bound
