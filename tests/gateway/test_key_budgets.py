"""Per-key monthly budgets through the real admission script and Redis.

A key with a hard budget is checked in the same Lua step as the rate limits and the
organization's money, with its own reservation (`k:<key>:reserved_nanos`), so concurrent
requests cannot pass it; the settle parks its cost as pending for the key too, and the
drain moves it to the key's spent, once. A soft budget never refuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from decimal import Decimal

import pytest
import redis.asyncio as aredis
from django.conf import settings
from django.utils import timezone

from accounts.models import ApiKey, AuditLog, Organization
from accounts.principal import SYSTEM
from billing import key_budgets, spend, wallet_keys
from billing.models import AlertEvent
from billing.periods import hour_start, month_label, month_start
from billing.wallet import (
    Usage,
    wallet_read,
    wallet_record_batch,
    wallet_record_events,
    wallet_sync,
)
from core.redis import get_redis
from gateway import pipeline
from gateway.errors import OpenAIError
from gateway.limits import Admission, Limits, RateLimiter
from tests.billing.factories import CHAT, price_book, usage
from tests.factories import OrganizationFactory, default_project, make_api_key
from tests.gateway.test_relay import SPEC
from workers.contract import UsageEvent, pool_live_key

pytestmark = pytest.mark.django_db

POOL = "key-budget-test"
WORST = 1_000_000  # nanos: 200 prompt tokens x 1000 + 400 max_tokens x 2000
BIG = 10**9


@pytest.fixture
def org() -> Organization:
    price_book(CHAT, input_price="1", output_price="2")  # 1000 and 2000 nanos per token
    return OrganizationFactory()  # postpaid, no organization budget: only the key caps


def capped_key(org: Organization, budget: str = "0.05", mode: str = "hard") -> ApiKey:
    """A key whose budget covers 50 worst cases (0.05 USD), synced into the wallet."""
    key, _ = make_api_key(org)
    key = key_budgets.key_controls_set(
        principal=SYSTEM, key=key, monthly_budget=budget, budget_mode=mode
    )
    wallet_sync(org)
    return key


def limits_of(key: ApiKey) -> Limits:
    return Limits(
        key_id=key.id,
        project_id=key.project_id,
        endpoint_id="ep-keybudget",
        key_rpm=BIG,
        key_tpm=BIG,
        project_rpm=BIG,
        project_tpm=BIG,
        endpoint_rpm=BIG,
        endpoint_tpm=BIG,
    )


async def _admit(
    organization_id: str, lim: Limits, request_ids: list[str], hold_s: float = 180
) -> list[Admission]:
    """Concurrent admissions through the real Lua, each held under its request id."""
    client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True, max_connections=256)
    await client.zadd(pool_live_key(POOL), {"node-a": time.time()})
    limiter = RateLimiter(client)
    try:
        return await asyncio.gather(
            *(
                limiter.admit(
                    lim,
                    pool=POOL,
                    organization_id=organization_id,
                    model_name=CHAT,
                    prompt_tokens=200,
                    max_tokens=400,
                    request_id=rid,
                    hold_s=hold_s,
                )
                for rid in request_ids
            )
        )
    finally:
        await client.aclose()


def admit(key: ApiKey, n: int, prefix: str = "req", hold_s: float = 180) -> list[Admission]:
    ids = [f"{prefix}_{i}" for i in range(n)]
    return asyncio.run(_admit(key.organization_id, limits_of(key), ids, hold_s))


async def _settle(organization_id: str, admitted: dict[str, Admission], cost: int) -> None:
    client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    try:
        for rid, a in admitted.items():
            await spend.settle(
                client,
                organization_id=organization_id,
                request_id=rid,
                reserved=a.reserved_nanos,
                cost=cost,
                reserved_project_id=a.reserved_project_id,
                reserved_key_id=a.reserved_key_id,
                held=a.held,
            )
    finally:
        await client.aclose()


def field(key: ApiKey, name: str) -> str | None:
    value = wallet_read(key.organization_id).get(wallet_keys.key_field(key.id, name))
    return None if value is None else str(value)


def test_the_sync_writes_a_hard_key_budget_and_clears_it(org: Organization) -> None:
    key = capped_key(org)
    assert field(key, wallet_keys.CAP) == str(50 * WORST)
    assert field(key, wallet_keys.SPENT) == "0"

    key_budgets.key_controls_set(principal=SYSTEM, key=key, monthly_budget=None)
    wallet_sync(org)
    assert field(key, wallet_keys.CAP) is None
    assert field(key, wallet_keys.SPENT) is None


def test_two_hundred_concurrent_requests_against_a_key_budget_for_fifty(
    org: Organization,
) -> None:
    key = capped_key(org)

    results = admit(key, 200)

    admitted = [r for r in results if r.allowed]
    assert len(admitted) == 50
    refused = [r for r in results if not r.allowed]
    assert {(r.insufficient_quota, r.quota_scope) for r in refused} == {(True, "key")}
    assert {r.reserved_key_id for r in admitted} == {key.id}
    assert field(key, wallet_keys.RESERVED) == str(50 * WORST)
    # Another key of the same organization is not held back by this key's budget.
    other, _ = make_api_key(org)
    assert all(r.allowed for r in admit(other, 10, prefix="other"))


def test_the_request_that_would_pass_the_budget_is_refused_with_its_figures(
    org: Organization,
) -> None:
    key = capped_key(org, budget="0.01")  # ten worst cases
    assert all(a.allowed for a in admit(key, 9, prefix="a"))
    [tenth] = admit(key, 1, prefix="b")  # exactly fits: admitted
    [eleventh] = admit(key, 1, prefix="c")
    assert tenth.allowed
    assert not eleventh.allowed
    assert (eleventh.quota_scope, eleventh.reserved_nanos, eleventh.available_nanos) == (
        "key",
        WORST,
        0,
    )
    # The refusal reserved nothing.
    assert field(key, wallet_keys.RESERVED) == str(10 * WORST)


def test_a_key_budget_counts_settled_and_drained_usage_once(org: Organization) -> None:
    key = capped_key(org)
    ids = [f"req_{i}" for i in range(60)]
    results = asyncio.run(_admit(org.id, limits_of(key), ids))
    admitted = {rid: a for rid, a in zip(ids, results, strict=True) if a.allowed}
    assert len(admitted) == 50
    # A sync while they are in flight keeps the key's reservation.
    wallet_sync(org)
    assert field(key, wallet_keys.RESERVED) == str(50 * WORST)

    # Half are drained before their gateway settles, half after: both orders count once.
    done = sorted(admitted)
    first = [Usage(org.id, CHAT, 200, 100, request_id=rid, api_key_id=key.id) for rid in done[:25]]
    wallet_record_batch(first)
    asyncio.run(_settle(org.id, admitted, 400_000))
    assert field(key, wallet_keys.PENDING) == str(25 * 400_000)
    usage(
        org,
        hour_start(timezone.now()),
        input_tokens=50 * 200,
        output_tokens=50 * 100,
        api_key_id=key.id,
    )
    wallet_record_batch(
        [Usage(org.id, CHAT, 200, 100, request_id=rid, api_key_id=key.id) for rid in done[25:]]
    )

    assert field(key, wallet_keys.RESERVED) == "0"
    assert field(key, wallet_keys.PENDING) == "0"
    assert field(key, wallet_keys.SPENT) == str(50 * 400_000)
    wallet_sync(org)  # the database's month spend of the key: the same
    assert field(key, wallet_keys.SPENT) == str(50 * 400_000)
    # 30,000,000 nanos left in the key's budget: 30 more worst cases, not one more.
    assert sum(r.allowed for r in admit(key, 40, prefix="more")) == 30
    # The console's figure is the same spend, to the cent.
    assert key_budgets.key_month_spend(org, [key.id]) == {key.id: Decimal("0.02")}


def test_a_reservation_no_gateway_settled_is_released_for_the_key_too(
    org: Organization,
) -> None:
    key = capped_key(org)
    lost = admit(key, 2, prefix="lost", hold_s=0.05)
    assert all(a.held and a.reserved_key_id == key.id for a in lost)
    time.sleep(0.1)
    wallet_sync(org)
    assert field(key, wallet_keys.RESERVED) == "0"
    held = get_redis().hlen(wallet_keys.held_key(org.id))
    assert held == 0


def test_a_soft_budget_never_refuses_and_is_recorded_once_when_reached(
    org: Organization,
) -> None:
    key = capped_key(org, budget="0.01", mode="soft")  # ten worst cases
    assert field(key, wallet_keys.CAP) is None  # nothing for admission to check
    assert all(a.allowed for a in admit(key, 20))

    usage(org, hour_start(timezone.now()), input_tokens=9000, api_key_id=key.id)
    assert key_budgets.key_budgets_evaluate(org=org) == []  # 0.009 of 0.01
    usage(org, hour_start(timezone.now()), input_tokens=1000, model="other", api_key_id=key.id)
    price_book("other", input_price="1", output_price="2")
    assert key_budgets.key_budgets_evaluate(org=org) == [key.id]
    assert key_budgets.key_budgets_evaluate(org=org) == []  # once per key and month
    entry = AuditLog.objects.get(action=key_budgets.BUDGET_REACHED, target_id=key.id)
    assert entry.metadata["budget"] == "0.01"
    assert entry.metadata["budget_mode"] == "soft"
    assert entry.metadata["spend"] == "0.01"
    alert = AlertEvent.objects.get(
        organization=org,
        dedupe_key=f"key_budget:{key.id}:{month_label(month_start(timezone.now()))}",
    )
    assert alert.kind == AlertEvent.Kind.BUDGET_THRESHOLD
    assert alert.payload["api_key_id"] == key.id


def test_the_pipeline_refuses_with_the_keys_budget_named(org: Organization) -> None:
    key = capped_key(org, budget="0")
    spec = dataclasses.replace(SPEC, model_name=CHAT, name=CHAT)

    async def run() -> OpenAIError:
        try:
            await pipeline.admit_relayed(limits_of(key), spec, org.id, 200, 400, "req_pipe")
        except OpenAIError as exc:
            return exc
        raise AssertionError("admitted past a budget of 0")

    error = asyncio.run(run())
    assert (error.status, error.code) == (429, "insufficient_quota")
    assert "API key's monthly budget" in error.message
    assert default_project(org).id  # the project itself is not capped


def test_the_drains_hook_counts_the_keys_spend_once_even_when_replayed(
    org: Organization,
) -> None:
    key = capped_key(org)
    now = time.time()
    events = [
        UsageEvent(
            request_id=f"req_drain_{i}",
            organization_id=org.id,
            project_id=key.project_id,
            api_key_id=key.id,
            endpoint_id="ep-keybudget",
            model_version_id="mv_x",
            model_name=CHAT,
            input_tokens=200,
            output_tokens=100,
            status="stop",
            started_at=now - 1,
            finished_at=now,
            queue_ms=0,
            compute_ms=10,
        )
        for i in range(3)
    ]
    wallet_record_events(events)
    wallet_record_events(events)  # the outbox replayed after a crash: counted once

    assert field(key, wallet_keys.SPENT) == str(3 * 400_000)
