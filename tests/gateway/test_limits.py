"""The Redis rate limiter: token buckets per key, project and endpoint, and pool liveness."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aredis
from django.conf import settings

from gateway.limits import Limits, RateLimiter, format_duration
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


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _limiter_with_live_pool() -> tuple[RateLimiter, aredis.Redis]:
    client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    await client.zadd(pool_live_key(POOL), {"node-a": time.time()})
    return RateLimiter(client), client


def test_requests_per_minute_enforced_and_refusal_consumes_nothing() -> None:
    async def scenario() -> list[tuple[bool, str, int]]:
        limiter, client = await _limiter_with_live_pool()
        out = []
        for _ in range(4):
            a = await limiter.admit(limits(key_rpm=3), tokens=10, pool=POOL)
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
        first = await limiter.admit(limits(project_tpm=600), tokens=500, pool=POOL)
        second = await limiter.admit(limits(project_tpm=600), tokens=500, pool=POOL)
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
        a = await limiter.admit(limits(endpoint_tpm=100), tokens=101, pool=POOL)
        await client.aclose()
        return a.retry_after_ms

    assert run(scenario()) == -1


def test_refund_gives_back_unused_reservation() -> None:
    async def scenario() -> tuple[bool, bool]:
        limiter, client = await _limiter_with_live_pool()
        lim = limits(key_tpm=1000)
        assert (await limiter.admit(lim, tokens=900, pool=POOL)).allowed
        before = (await limiter.admit(lim, tokens=500, pool=POOL)).allowed
        await limiter.refund(lim, tokens=800)
        after = (await limiter.admit(lim, tokens=500, pool=POOL)).allowed
        await client.aclose()
        return before, after

    assert run(scenario()) == (False, True)


def test_dead_pool_refuses_without_consuming() -> None:
    async def scenario() -> tuple[bool, bool, str | None]:
        client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        await client.zadd(pool_live_key(POOL), {"node-a": time.time() - 60})  # stale heartbeat
        a = await RateLimiter(client).admit(limits(), tokens=10, pool=POOL)
        level = await client.hget("mantle:rl:key:k1:req", "l")
        await client.aclose()
        return a.allowed, a.no_worker, level

    assert run(scenario()) == (False, True, None)


def test_concurrent_admissions_never_exceed_the_limit() -> None:
    async def scenario() -> int:
        limiter, client = await _limiter_with_live_pool()
        results = await asyncio.gather(
            *(limiter.admit(limits(endpoint_rpm=25), tokens=1, pool=POOL) for _ in range(100))
        )
        await client.aclose()
        return sum(r.allowed for r in results)

    assert run(scenario()) == 25


@pytest.mark.parametrize(
    ("ms", "text"), [(0, "0ms"), (20, "20ms"), (1500, "1.5s"), (59_000, "59s"), (360_000, "6m0s")]
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text
