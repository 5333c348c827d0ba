"""The Redis rate limiter: token buckets per key, project and endpoint, and pool liveness."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aredis
from django.conf import settings

from gateway.limits import Admission, Limits, RateLimiter, format_duration
from workers.contract import pool_live_key

POOL = "limits-test"


def limits(**caps: int) -> Limits:
    base = dict(
        key_rpm=1000,
        key_tpm=1_000_000,
        project_rpm=1000,
        project_tpm=1_000_000,
        endpoint_rpm=1000,
        endpoint_tpm=1_000_000,
    )
    base.update(caps)
    return Limits(key_id="k1", project_id="p1", endpoint_id="ep-1", **base)


# Admission refuses a model without a price hash: "m" is priced at zero unless a test says.
FREE_PRICE = {"in": 0, "out": 0, "req": 0, "ms": 0}


async def admit(limiter: RateLimiter, lim: Limits, tokens: int) -> Admission:
    return await limiter.admit(
        lim,
        pool=POOL,
        organization_id="org_limits",
        model_name="m",
        prompt_tokens=tokens,
        max_tokens=0,
    )


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _limiter_with_live_pool() -> tuple[RateLimiter, aredis.Redis]:
    client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True, max_connections=512)
    await client.zadd(pool_live_key(POOL), {"node-a": time.time()})
    await client.hset("mantle:price:org_limits:m", mapping=FREE_PRICE)
    return RateLimiter(client), client


def test_requests_per_minute_enforced_and_refusal_consumes_nothing() -> None:
    async def scenario() -> list[tuple[bool, str, int]]:
        limiter, client = await _limiter_with_live_pool()
        out = []
        for _ in range(4):
            a = await admit(limiter, limits(key_rpm=3), 10)
            out.append((a.allowed, a.refused_scope, a.remaining_requests))
        level = await client.hget("mantle:rl:endpoint:ep-1:req", "l")
        await client.aclose()
        out.append((True, "endpoint-level", round(float(level or 0))))
        return out

    results = run(scenario())
    assert results[:4] == [(True, "", 2), (True, "", 1), (True, "", 0), (False, "key", 0)]
    # The refused 4th request took nothing from the endpoint's bucket.
    assert results[4] == (True, "endpoint-level", 997)


def test_tokens_per_minute_enforced_with_retry_after() -> None:
    async def scenario() -> tuple[bool, bool, str, str, int]:
        limiter, client = await _limiter_with_live_pool()
        first = await admit(limiter, limits(project_tpm=600), 500)
        second = await admit(limiter, limits(project_tpm=600), 500)
        await client.aclose()
        return (
            first.allowed,
            second.allowed,
            second.refused_scope,
            second.refused_kind,
            second.retry_after_ms,
        )

    first, second, scope, kind, retry_ms = run(scenario())
    assert (first, second, scope, kind) == (True, False, "project", "tokens")
    # 400 more tokens at 10 tokens/s: about 40 s.
    assert 39_000 <= retry_ms <= 40_100


def test_request_larger_than_the_whole_limit_never_passes() -> None:
    async def scenario() -> int:
        limiter, client = await _limiter_with_live_pool()
        a = await admit(limiter, limits(endpoint_tpm=100), 101)
        await client.aclose()
        return a.retry_after_ms

    assert run(scenario()) == -1


def test_refund_gives_back_unused_reservation() -> None:
    async def scenario() -> tuple[bool, bool]:
        limiter, client = await _limiter_with_live_pool()
        lim = limits(key_tpm=1000)
        assert (await admit(limiter, lim, 900)).allowed
        before = (await admit(limiter, lim, 500)).allowed
        await limiter.refund(lim, tokens=800)
        after = (await admit(limiter, lim, 500)).allowed
        await client.aclose()
        return before, after

    assert run(scenario()) == (False, True)


def test_dead_pool_refuses_without_consuming() -> None:
    async def scenario() -> tuple[bool, bool, str | None]:
        client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        await client.zadd(pool_live_key(POOL), {"node-a": time.time() - 60})  # stale heartbeat
        await client.hset("mantle:price:org_limits:m", mapping=FREE_PRICE)
        a = await admit(RateLimiter(client), limits(), 10)
        level = await client.hget("mantle:rl:key:k1:req", "l")
        await client.aclose()
        return a.allowed, a.no_worker, level

    assert run(scenario()) == (False, True, None)


def test_concurrent_admissions_never_exceed_the_limit() -> None:
    async def scenario() -> int:
        limiter, client = await _limiter_with_live_pool()
        results = await asyncio.gather(
            *(admit(limiter, limits(endpoint_rpm=25), 1) for _ in range(100))
        )
        await client.aclose()
        return sum(r.allowed for r in results)

    assert run(scenario()) == 25


@pytest.mark.parametrize(
    ("ms", "text"), [(0, "0ms"), (20, "20ms"), (1500, "1.5s"), (59_000, "59s"), (360_000, "6m0s")]
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text


# --- money: reservations against the wallet ---------------------------------------------------


async def _wallet(client: aredis.Redis, cap: int, price_in: int = 1, price_out: int = 2) -> None:
    await client.hset("mantle:wallet:org_limits", mapping={"mode": "prepaid", "cap_nanos": cap})
    await client.hset("mantle:price:org_limits:m", mapping={"in": price_in, "out": price_out})


async def admit_money(limiter: RateLimiter, prompt: int, max_tokens: int) -> Admission:
    return await limiter.admit(
        limits(),
        pool=POOL,
        organization_id="org_limits",
        model_name="m",
        prompt_tokens=prompt,
        max_tokens=max_tokens,
    )


def test_worst_case_cost_is_reserved_and_refused_beyond_the_cap() -> None:
    async def scenario() -> tuple[list[tuple[bool, bool, int]], dict[str, str], str | None]:
        limiter, client = await _limiter_with_live_pool()
        await _wallet(client, cap=1000)
        out = []
        for _ in range(3):  # worst case 100*1 + 200*2 = 500 nanos each
            a = await admit_money(limiter, 100, 200)
            out.append((a.allowed, a.insufficient_quota, a.reserved_nanos))
        wallet = await client.hgetall("mantle:wallet:org_limits")
        key_level = await client.hget("mantle:rl:key:k1:req", "l")
        await client.aclose()
        return out, wallet, key_level

    results, wallet, key_level = run(scenario())
    assert results == [(True, False, 500), (True, False, 500), (False, True, 500)]
    assert wallet["reserved_nanos"] == "1000"
    assert round(float(key_level or 0)) == 998  # the refused request took no rate allowance


def test_settle_then_count_and_count_then_settle_count_once() -> None:
    import redis as sync_redis

    from billing import spend

    async def scenario() -> dict[str, str]:
        limiter, client = await _limiter_with_live_pool()
        await _wallet(client, cap=10_000)
        first = await admit_money(limiter, 100, 200)
        second = await admit_money(limiter, 100, 200)
        # first: the gateway settles before the drain counts it
        await spend.settle(
            client,
            organization_id="org_limits",
            request_id="r1",
            reserved=first.reserved_nanos,
            cost=300,
        )
        mid = await client.hgetall("mantle:wallet:org_limits")
        assert (mid["reserved_nanos"], mid["pending_nanos"]) == ("500", "300")
        sync = sync_redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        spend.count_usage(
            sync,
            organization_id="org_limits",
            request_id="r1",
            model_name="m",
            input_tokens=100,
            output_tokens=100,
        )
        # second: the drain counts it before the gateway settles
        spend.count_usage(
            sync,
            organization_id="org_limits",
            request_id="r2",
            model_name="m",
            input_tokens=100,
            output_tokens=50,
        )
        await spend.settle(
            client,
            organization_id="org_limits",
            request_id="r2",
            reserved=second.reserved_nanos,
            cost=200,
        )
        wallet = await client.hgetall("mantle:wallet:org_limits")
        sync.close()
        await client.aclose()
        return wallet

    wallet = run(scenario())
    assert wallet["reserved_nanos"] == "0"
    assert wallet["pending_nanos"] == "0"
    assert wallet["spent_nanos"] == str(300 + 200)


def test_two_hundred_concurrent_requests_against_a_balance_for_fifty() -> None:
    async def scenario() -> tuple[int, dict[str, str]]:
        limiter, client = await _limiter_with_live_pool()
        await _wallet(client, cap=50 * 500)
        results = await asyncio.gather(*(admit_money(limiter, 100, 200) for _ in range(200)))
        wallet = await client.hgetall("mantle:wallet:org_limits")
        await client.aclose()
        return sum(r.allowed for r in results), wallet

    admitted, wallet = run(scenario())
    assert admitted == 50
    assert int(wallet["reserved_nanos"]) == 50 * 500 <= int(wallet["cap_nanos"])


def test_admission_carries_the_cached_input_price_when_the_hash_has_one() -> None:
    # A hash without it (an earlier release's, or a test's) is admitted as before, and the
    # settle then prices cached tokens as input tokens ("").
    async def scenario() -> tuple[Admission, Admission]:
        limiter, client = await _limiter_with_live_pool()
        await _wallet(client, cap=10**6, price_in=4, price_out=8)
        old = await admit_money(limiter, 100, 10)
        await client.hset("mantle:price:org_limits:m", "cin", "1.5")
        new = await admit_money(limiter, 100, 10)
        await client.aclose()
        return old, new

    old, new = run(scenario())

    assert (old.allowed, old.price_in, old.price_cached_input) == (True, "4", "")
    assert (new.allowed, new.price_in, new.price_cached_input) == (True, "4", "1.5")
    # The worst case takes every prompt token as uncached: 100 * 4 + 10 * 8, both times.
    assert old.reserved_nanos == new.reserved_nanos == 480


def test_unlimited_or_missing_wallet_only_reserves() -> None:
    async def scenario() -> tuple[bool, str | None]:
        limiter, client = await _limiter_with_live_pool()
        await client.hset("mantle:price:org_limits:m", mapping={"in": 10**6, "out": 10**6})
        a = await admit_money(limiter, 1000, 1000)
        reserved = await client.hget("mantle:wallet:org_limits", "reserved_nanos")
        await client.aclose()
        return a.allowed, reserved

    assert run(scenario()) == (True, str(2 * 10**9))


@pytest.mark.parametrize("cap", ["key_rpm", "project_rpm", "endpoint_rpm"])
def test_a_cap_of_zero_admits_nothing(cap: str) -> None:
    # Only the organization's share may be absent (0 there: no share of its own); a
    # key, project or endpoint capped at 0 is closed, never unlimited.
    async def scenario() -> Admission:
        limiter, client = await _limiter_with_live_pool()
        admission = await admit(limiter, limits(**{cap: 0}), 10)
        await client.aclose()
        return admission

    admission = run(scenario())
    assert (admission.allowed, admission.refused_scope) == (False, cap.removesuffix("_rpm"))
