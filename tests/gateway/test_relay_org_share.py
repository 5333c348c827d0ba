"""An organization's share of an operator's provider's `max_concurrency` (gateway/relay.py,
`take_slot`'s Lua script), on real Redis: the cap, an organization's own provider, the
lease that frees a dead gateway's slots, the releases, the cooldown, races."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import pytest
from django.test import override_settings

from accounts.keys import KeyIdentity
from catalog.selectors import ProviderConnection
from core.redis import get_async_redis, get_redis, run_scripts
from gateway import leases, relay
from tests.gateway.test_relay import SPEC
from tests.support.stack import ROOT

OPERATOR = ProviderConnection(
    id="prv-shared",
    organization_id=None,
    name="shared",
    kind="openai",
    base_url="https://api.example.com/v1",
    api_version="",
    credential="sk-upstream",
    max_concurrency=4,
)
OWN = dataclasses.replace(OPERATOR, id="prv-own", organization_id="org-a")
TARGET = "tgt-1"


def take(
    org: str,
    request_id: str,
    provider: ProviderConnection = OPERATOR,
    *,
    deadline: float | None = None,
    force: bool = False,
) -> int:
    return asyncio.run(
        relay.take_slot(
            TARGET,
            provider,
            org,
            request_id,
            time.time() + 60 if deadline is None else deadline,
            force=force,
        )
    )


def in_flight(provider: ProviderConnection = OPERATOR) -> set[str]:
    return set(get_redis().zrange(f"mantle:relay:inflight:{provider.id}", 0, -1))


@override_settings(MANTLE_PROVIDER_ORG_SHARE=0.5)
def test_an_organization_holds_at_most_its_share_and_the_others_get_the_rest() -> None:
    """The attack: one organization floods a shared provider of 4 slots. It gets 2 (half,
    rounded down); another organization still gets the other 2; the provider's bound holds
    for everyone."""
    assert relay.org_cap(OPERATOR) == 2
    assert [take("org-a", f"a{i}") for i in range(6)] == [1, 1, 0, 0, 0, 0]
    assert [take("org-b", f"b{i}") for i in range(3)] == [1, 1, 0]
    assert take("org-c", "c0") == 0  # full: the provider's own bound
    assert in_flight() == {"a0", "a1", "b0", "b1"}
    # One of org-a's ends: its place is org-a's again, and not a third one.
    asyncio.run(relay.release_slot(OPERATOR, "org-a", "a0"))
    assert take("org-c", "c1") == 1  # the free slot is anyone's within their share
    assert take("org-a", "a6") == 0  # the provider is full again
    asyncio.run(relay.release_slot(OPERATOR, "org-c", "c1"))
    assert take("org-a", "a7") == 1
    asyncio.run(relay.release_slot(OPERATOR, "org-b", "b0"))
    assert take("org-a", "a8") == 0  # its share again, though a slot is free
    assert in_flight() == {"a1", "a7", "b1"}


@override_settings(MANTLE_PROVIDER_ORG_SHARE=0.5)
def test_alone_an_organization_still_holds_only_its_share() -> None:
    """The share is a cap, as a pool's (docs/providers.md): an organization alone on the
    provider holds its share, and the rest stays free for whoever comes next."""
    assert [take("org-a", f"a{i}") for i in range(4)] == [1, 1, 0, 0]
    assert in_flight() == {"a0", "a1"}
    assert take("org-b", "b0") == 1  # at once: nothing to wait for


@override_settings(MANTLE_PROVIDER_ORG_SHARE=1.0)
def test_a_share_of_one_is_no_share() -> None:
    assert relay.org_cap(OPERATOR) == 4
    assert [take("org-a", f"a{i}") for i in range(5)] == [1, 1, 1, 1, 0]
    assert take("org-b", "b0") == 0
    # Nothing per organization is written when no share applies.
    assert not get_redis().exists(f"mantle:relay:inflight-org:{OPERATOR.id}:org-a")


@override_settings(MANTLE_PROVIDER_ORG_SHARE=0.5)
def test_an_organizations_own_provider_has_no_share() -> None:
    """Only its organization calls it: it may use all of it."""
    assert relay.org_cap(OWN) == 4
    assert [take("org-a", f"a{i}", OWN) for i in range(5)] == [1, 1, 1, 1, 0]


@pytest.mark.parametrize(
    ("most", "share", "cap"),
    [(1, 0.5, 1), (2, 0.5, 1), (3, 0.5, 1), (4, 0.75, 3), (3, 0.75, 2), (64, 0.5, 32), (5, 0.1, 1)],
)
def test_the_cap_is_the_share_rounded_down_at_least_one(most: int, share: float, cap: int) -> None:
    """Rounded down: with two slots or more, at least one is always left to the others."""
    with override_settings(MANTLE_PROVIDER_ORG_SHARE=share):
        assert relay.org_cap(dataclasses.replace(OPERATOR, max_concurrency=most)) == cap


@override_settings(MANTLE_PROVIDER_ORG_SHARE=0.5)
def test_slots_past_their_deadline_are_free_again_in_the_share_too() -> None:
    """A gateway that died never releases its slots: they end at their lease's end, at the
    latest the request's deadline, for the provider's count and the organization's alike."""
    gone = time.time() - 1  # as the next take sees a deadline that has passed
    assert take("org-a", "dead0", deadline=gone) == 1
    assert take("org-a", "dead1", deadline=gone) == 1
    assert [take("org-a", f"a{i}") for i in range(3)] == [1, 1, 0]
    assert in_flight() == {"a0", "a1"}
    assert get_redis().ttl(f"mantle:relay:inflight-org:{OPERATOR.id}:org-a") > 0


@override_settings(MANTLE_PROVIDER_ORG_SHARE=0.5)
def test_a_whole_answers_release_frees_the_organizations_place() -> None:
    """The release beside a whole answer (`succeeded_call`, run in the metering pipeline),
    at a stream's end (`release_call`) and after a failure (`_release`) give back both the
    provider's slot and the organization's place."""
    identity = KeyIdentity(
        digest="d",
        key_id="k",
        organization_id="org-a",
        project_id="p",
        scopes=("inference",),
        expires_at=None,
        revoked=False,
        organization_active=True,
        rpm_limit=60,
        tpm_limit=1000,
        project_rpm_limit=60,
        project_tpm_limit=1000,
    )
    call = relay.call_of("chat/completions", {"model": "m", "messages": []})
    target = relay.Target(id=TARGET, kind="provider", provider_id=OPERATOR.id, model="gpt")
    assert take("org-a", "r1") == 1
    assert take("org-a", "r2") == 1
    assert take("org-a", "r3") == 0  # the share is full: 2 of 4
    get_redis().set(f"mantle:relay:fails:{TARGET}", 2)

    async def both() -> None:
        await run_scripts(
            get_async_redis(), [relay.succeeded_call(target, OPERATOR, "org-a", "r1")]
        )
        await relay._Relay("r2", identity, SPEC, call)._release(OPERATOR)

    asyncio.run(both())
    assert take("org-a", "r3") == 1

    async def stream_end() -> None:
        await run_scripts(get_async_redis(), [relay.release_call(OPERATOR, "org-a", "r3")])

    asyncio.run(stream_end())
    assert in_flight() == set()
    assert not get_redis().exists(f"mantle:relay:fails:{TARGET}")
    assert [take("org-a", f"a{i}") for i in range(3)] == [1, 1, 0]


def lease_end(request_id: str, provider: ProviderConnection = OPERATOR) -> float | None:
    return get_redis().zscore(f"mantle:relay:inflight:{provider.id}", request_id)


@override_settings(MANTLE_PROVIDER_ORG_SHARE=0.5, MANTLE_INFLIGHT_LEASE_S=0.6)
def test_a_slot_is_a_lease_that_ends_unless_its_gateway_renews_it() -> None:
    """A gateway that died holding slots (its event loop gone: nothing renews them) gives
    them back at the end of their lease, not at their requests' deadlines (minutes later);
    a live one keeps them for as long as its requests run, and a slot given back stays so."""
    far = time.time() + 600
    assert take("org-a", "dead0", deadline=far) == 1  # its loop ends: the "gateway" died
    assert take("org-a", "dead1", deadline=far) == 1
    assert (lease_end("dead0") or 0) < time.time() + 0.7  # the lease, not the deadline
    assert take("org-a", "a0") == 0  # the organization's share is held...
    time.sleep(0.7)
    assert take("org-a", "a0") == 1  # ...until the leases ended
    assert "dead0" not in in_flight()

    async def live_gateway() -> tuple[bool, bool, set[str]]:
        assert await relay.take_slot(TARGET, OPERATOR, "org-b", "live", far) == 1
        await asyncio.sleep(2.0)  # three leases and more, renewed every 0.2 s
        # Held: its lease ends in the future (an ended one stays listed until a take
        # sweeps it).
        held_while_running = (lease_end("live") or 0) > time.time()
        await relay.release_slot(OPERATOR, "org-b", "live")
        await asyncio.sleep(0.5)  # a renewal after the release must not take it again
        return leases.holding("live"), held_while_running, in_flight()

    leased, held_while_running, after = asyncio.run(live_gateway())
    assert held_while_running
    assert "live" not in after and not leased


@override_settings(MANTLE_PROVIDER_ORG_SHARE=0.5)
def test_a_cooled_target_is_refused_before_the_share_and_forcing_it_keeps_the_share() -> None:
    get_redis().set(f"mantle:relay:cool:{TARGET}", "1")
    assert take("org-a", "a0") == -1
    assert in_flight() == set()
    assert [take("org-a", f"a{i}", force=True) for i in range(3)] == [1, 1, 0]


@override_settings(MANTLE_PROVIDER_ORG_SHARE=0.5)
def test_racing_takes_never_pass_the_share_or_the_maximum() -> None:
    """Many gateways' takes at once: the script is one atomic step each."""
    provider = dataclasses.replace(OPERATOR, max_concurrency=10)

    async def flood() -> list[int]:
        return await asyncio.gather(
            *[
                relay.take_slot(TARGET, provider, f"org-{i % 3}", f"r{i}", time.time() + 60)
                for i in range(60)
            ]
        )

    taken = asyncio.run(flood())
    held = in_flight(provider)
    assert sum(taken) == len(held) == 10  # the maximum, each organization within its 5
    for org in ("org-0", "org-1", "org-2"):
        mine = {f"r{i}" for i in range(60) if i % 3 == int(org[-1])} & held
        assert len(mine) <= 5


def start_django(share: str) -> subprocess.CompletedProcess[str]:
    """Django set up in a fresh interpreter (settings are read once per process)."""
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); print('started')"],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}",
            "MANTLE_PROVIDER_ORG_SHARE": share,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "half"])
def test_a_share_outside_0_to_1_stops_the_process_naming_it(value: str) -> None:
    started = start_django(value)
    assert started.returncode != 0
    assert "ImproperlyConfigured: MANTLE_PROVIDER_ORG_SHARE" in started.stderr
    assert "started" not in started.stdout


def test_a_share_within_0_to_1_starts() -> None:
    started = start_django("0.25")
    assert started.returncode == 0, started.stderr
    assert "started" in started.stdout
