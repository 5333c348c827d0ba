"""The wallet as billing writes it, read by the gateway's real admission script."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest
import redis.asyncio as aredis
from django.conf import settings
from django.utils import timezone

from accounts.models import Organization
from billing import spend, wallet_keys
from billing.models import BillingAccount, Budget
from billing.periods import hour_start
from billing.wallet import Usage, price_fill, wallet_read, wallet_record_batch, wallet_sync
from catalog.models import Model
from core.redis import get_redis
from gateway.limits import Admission, Limits, RateLimiter
from tests.billing.factories import (
    CHAT,
    CatalogModelFactory,
    GrantFactory,
    PriceFactory,
    price_book,
    usage,
)
from tests.factories import OrganizationFactory, default_project
from workers.contract import pool_live_key

pytestmark = pytest.mark.django_db

POOL = "billing-admission-test"
WORST = 1_000_000  # nanos: 200 prompt tokens x 1000 + 400 max_tokens x 2000


@pytest.fixture
def prepaid() -> Organization:
    price_book(CHAT, input_price="1", output_price="2")  # 1000 and 2000 nanos per token
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, mode="prepaid")
    GrantFactory(organization=org, amount=Decimal("0.05"))  # 50 worst cases
    wallet_sync(org)
    return org


def _limits(org: Organization) -> Limits:
    big = 10**9
    return Limits(
        key_id="key_adm",
        project_id=default_project(org).id,
        endpoint_id="ep-adm",
        key_rpm=big,
        key_tpm=big,
        project_rpm=big,
        project_tpm=big,
        endpoint_rpm=big,
        endpoint_tpm=big,
    )


def _admit_many(org: Organization, n: int) -> list[Admission]:
    return asyncio.run(_admit(org.id, _limits(org), n))


async def _admit(
    organization_id: str,
    lim: Limits,
    n: int,
    *,
    model_name: str = CHAT,
    prompt_tokens: int = 200,
    max_tokens: int = 400,
    **units: int,
) -> list[Admission]:
    """`n` concurrent admissions through the real Lua; `units`: requests, compute_ms."""
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
                    model_name=model_name,
                    prompt_tokens=prompt_tokens,
                    max_tokens=max_tokens,
                    **units,
                )
                for _ in range(n)
            )
        )
    finally:
        await client.aclose()


async def _settle(organization_id: str, admitted: list[Admission], cost: int) -> None:
    client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    try:
        for i, a in enumerate(admitted):
            await spend.settle(
                client,
                organization_id=organization_id,
                request_id=f"req_{i}",
                reserved=a.reserved_nanos,
                cost=cost,
                reserved_project_id=a.reserved_project_id,
            )
    finally:
        await client.aclose()


def test_two_hundred_concurrent_requests_against_credit_for_fifty(prepaid: Organization) -> None:
    results = _admit_many(prepaid, 200)

    admitted = [r for r in results if r.allowed]
    assert len(admitted) == 50
    assert sum(r.insufficient_quota for r in results) == 150
    assert wallet_read(prepaid.id)["reserved_nanos"] == str(50 * WORST)


def test_settled_drained_and_synced_usage_is_counted_once(prepaid: Organization) -> None:
    admitted = [r for r in _admit_many(prepaid, 60) if r.allowed]
    assert len(admitted) == 50
    # Each request really used 200 + 100 tokens: 200k + 200k = 400k nanos.
    asyncio.run(_settle(prepaid.id, admitted, 400_000))
    # The drain commits the rollups, then counts the events.
    usage(prepaid, hour_start(timezone.now()), input_tokens=50 * 200, output_tokens=50 * 100)
    wallet_record_batch(
        [Usage(prepaid.id, CHAT, 200, 100, request_id=f"req_{i}") for i in range(50)]
    )
    drained = wallet_read(prepaid.id)
    assert (drained["reserved_nanos"], drained["pending_nanos"]) == ("0", "0")
    assert drained["spent_nanos"] == str(50 * 400_000)

    wallet_sync(prepaid)

    synced = wallet_read(prepaid.id)
    assert (synced["cap_nanos"], synced["spent_nanos"]) == (str(50 * WORST), str(50 * 400_000))
    # 30,000,000 nanos left: 30 more worst cases, not one more.
    assert sum(r.allowed for r in _admit_many(prepaid, 40)) == 30


@pytest.fixture
def project_capped() -> Organization:
    """Postpaid, no organization cap; its default project has a hard budget of 50 worst cases."""
    price_book(CHAT, input_price="1", output_price="2")
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, mode="postpaid")
    Budget.objects.create(
        organization=org,
        project=default_project(org),
        monthly_amount=Decimal("0.05"),
        hard_limit=True,
    )
    wallet_sync(org)
    return org


def test_two_hundred_concurrent_requests_against_a_project_budget_for_fifty(
    project_capped: Organization,
) -> None:
    project_id = default_project(project_capped).id

    results = _admit_many(project_capped, 200)

    admitted = [r for r in results if r.allowed]
    assert len(admitted) == 50
    refused = [r for r in results if not r.allowed]
    assert {(r.insufficient_quota, r.quota_scope) for r in refused} == {(True, "project")}
    assert {r.reserved_project_id for r in admitted} == {project_id}
    wallet = wallet_read(project_capped.id)
    assert wallet[f"p:{project_id}:reserved_nanos"] == str(50 * WORST)


def test_a_project_budget_counts_settled_and_drained_usage_once(
    project_capped: Organization,
) -> None:
    org = project_capped
    project_id = default_project(org).id
    admitted = [r for r in _admit_many(org, 60) if r.allowed]
    assert len(admitted) == 50
    # A sync while the requests are in flight keeps their project reservation.
    wallet_sync(org)
    assert wallet_read(org.id)[f"p:{project_id}:reserved_nanos"] == str(50 * WORST)

    # Half are drained before their gateway settles, half after: both orders count once.
    first = [
        Usage(org.id, CHAT, 200, 100, project_id=project_id, request_id=f"req_{i}")
        for i in range(25)
    ]
    wallet_record_batch(first)
    asyncio.run(_settle(org.id, admitted, 400_000))
    settled = wallet_read(org.id)
    assert settled[f"p:{project_id}:pending_nanos"] == str(25 * 400_000)
    usage(
        org,
        hour_start(timezone.now()),
        input_tokens=50 * 200,
        output_tokens=50 * 100,
        project_id=project_id,
    )
    wallet_record_batch(
        [
            Usage(org.id, CHAT, 200, 100, project_id=project_id, request_id=f"req_{i}")
            for i in range(25, 50)
        ]
    )

    drained = wallet_read(org.id)
    assert drained[f"p:{project_id}:reserved_nanos"] == "0"
    assert drained[f"p:{project_id}:pending_nanos"] == "0"
    assert drained[f"p:{project_id}:spent_nanos"] == str(50 * 400_000)
    assert (drained["reserved_nanos"], drained["pending_nanos"]) == ("0", "0")
    wallet_sync(org)
    assert wallet_read(org.id)[f"p:{project_id}:spent_nanos"] == str(50 * 400_000)
    # 30,000,000 nanos left in the project: 30 more worst cases, not one more.
    assert sum(r.allowed for r in _admit_many(org, 40)) == 30


async def _admit_held(
    organization_id: str, lim: Limits, request_ids: list[str], hold_s: float
) -> list[Admission]:
    client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    await client.zadd(pool_live_key(POOL), {"node-a": time.time()})
    limiter = RateLimiter(client)
    try:
        return [
            await limiter.admit(
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
        ]
    finally:
        await client.aclose()


async def _settle_held(organization_id: str, rid: str, admission: Admission, cost: int) -> None:
    client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    try:
        await spend.settle(
            client,
            organization_id=organization_id,
            request_id=rid,
            reserved=admission.reserved_nanos,
            cost=cost,
            reserved_project_id=admission.reserved_project_id,
            held=admission.held,
        )
    finally:
        await client.aclose()


def test_a_settled_reservation_is_released_once_and_unheld(prepaid: Organization) -> None:
    from core.redis import get_redis

    [admitted] = asyncio.run(_admit_held(prepaid.id, _limits(prepaid), ["req_ok"], hold_s=180))
    assert admitted.held
    assert get_redis().hexists(wallet_keys.held_key(prepaid.id), "req_ok")

    asyncio.run(_settle_held(prepaid.id, "req_ok", admitted, 400_000))
    wallet_sync(prepaid)

    wallet = wallet_read(prepaid.id)
    assert (wallet["reserved_nanos"], wallet["pending_nanos"]) == ("0", "400000")
    assert not get_redis().exists(wallet_keys.held_key(prepaid.id))


def test_reservations_no_gateway_settled_are_released_by_the_sync(
    project_capped: Organization,
) -> None:
    # The gateway died mid-request: nobody settles. Its money must not stay reserved.
    org = project_capped
    project_id = default_project(org).id
    lost = asyncio.run(_admit_held(org.id, _limits(org), ["req_lost1", "req_lost2"], hold_s=0.05))
    [kept] = asyncio.run(_admit_held(org.id, _limits(org), ["req_live"], hold_s=180))
    assert all(a.held for a in [*lost, kept])
    time.sleep(0.1)  # past the lost ones' release-by time (Redis's clock decides)

    wallet_sync(org)

    wallet = wallet_read(org.id)
    assert wallet["reserved_nanos"] == str(WORST)
    assert wallet[f"p:{project_id}:reserved_nanos"] == str(WORST)
    # A late settle of a released reservation parks its cost but releases nothing again.
    asyncio.run(_settle_held(org.id, "req_lost1", lost[0], 400_000))
    late = wallet_read(org.id)
    assert late["reserved_nanos"] == str(WORST)
    assert late[f"p:{project_id}:reserved_nanos"] == str(WORST)
    assert late["pending_nanos"] == "400000"
    # The live request settles normally.
    asyncio.run(_settle_held(org.id, "req_live", kept, 400_000))
    done = wallet_read(org.id)
    assert (done["reserved_nanos"], done[f"p:{project_id}:reserved_nanos"]) == ("0", "0")


# --- tensor requests (/v2): priced per request and compute millisecond ---------------------

RANKER = "ranker-adm"
# 1 USD per million requests = 1000 nanos each; 0.01 USD per million compute ms = 10 nanos
# per ms. A request allowed 99,900 ms of compute may cost 1000 + 999,000 = 1,000,000 nanos.
TENSOR_DEADLINE_MS = 99_900


@pytest.fixture
def tensor_prepaid() -> Organization:
    CatalogModelFactory(name=RANKER, kind=Model.Kind.TENSOR)
    PriceFactory(model_name=RANKER, token_kind="request", unit_price=Decimal("1"))
    PriceFactory(model_name=RANKER, token_kind="compute_ms", unit_price=Decimal("0.01"))
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, mode="prepaid")
    GrantFactory(organization=org, amount=Decimal("0.05"))  # 50 worst cases
    wallet_sync(org)
    return org


async def _admit_tensor(organization_id: str, lim: Limits, n: int, model: str) -> list[Admission]:
    """One request allowed its whole compute deadline, as /v2 admits it."""
    return await _admit(
        organization_id,
        lim,
        n,
        model_name=model,
        prompt_tokens=0,
        max_tokens=0,
        requests=1,
        compute_ms=TENSOR_DEADLINE_MS,
    )


def test_two_hundred_concurrent_tensor_requests_against_credit_for_fifty(
    tensor_prepaid: Organization,
) -> None:
    org = tensor_prepaid
    assert get_redis().hgetall(wallet_keys.price_key(org.id, RANKER)) == {
        "in": "0",
        "out": "0",
        "req": "1000",
        "ms": "10",
        "cin": "0",
        # no batch prices: batch lines cost the online ones
        **{"bin": "0", "bout": "0", "breq": "1000", "bms": "10", "bcin": "0"},
        # priority at twice the online prices, flex at half (the default multipliers)
        **{"pin": "0", "pout": "0", "preq": "2000", "pms": "20", "pcin": "0"},
        **{"fin": "0", "fout": "0", "freq": "500", "fms": "5", "fcin": "0"},
    }

    results = asyncio.run(_admit_tensor(org.id, _limits(org), 200, RANKER))

    admitted = [r for r in results if r.allowed]
    assert len(admitted) == 50
    assert {r.reserved_nanos for r in admitted} == {WORST}
    assert sum(r.insufficient_quota for r in results) == 150
    assert wallet_read(org.id)["reserved_nanos"] == str(50 * WORST)


def test_a_hard_budget_stops_tensor_requests_too() -> None:
    CatalogModelFactory(name=RANKER, kind=Model.Kind.TENSOR)
    PriceFactory(model_name=RANKER, token_kind="request", unit_price=Decimal("1"))
    PriceFactory(model_name=RANKER, token_kind="compute_ms", unit_price=Decimal("0.01"))
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, mode="postpaid")
    Budget.objects.create(organization=org, monthly_amount=Decimal("0.01"), hard_limit=True)
    wallet_sync(org)

    results = asyncio.run(_admit_tensor(org.id, _limits(org), 30, RANKER))

    assert sum(r.allowed for r in results) == 10
    assert {r.quota_scope for r in results if not r.allowed} == {"organization"}


def test_an_unpriced_model_is_refused_before_anything_is_taken() -> None:
    CatalogModelFactory(name="unpriced-ranker", kind=Model.Kind.TENSOR)
    org = OrganizationFactory()  # postpaid, no wallet hash: money alone would not refuse it
    lim = _limits(org)

    [unknown] = asyncio.run(_admit_tensor(org.id, lim, 1, "unpriced-ranker"))
    # The gateway then fills the price hash from the database, and asks again.
    assert price_fill(org.id, "unpriced-ranker") is None
    [refused] = asyncio.run(_admit_tensor(org.id, lim, 1, "unpriced-ranker"))

    assert (unknown.allowed, unknown.price_unknown) == (False, True)
    assert (refused.allowed, refused.unpriced) == (False, True)
    redis = get_redis()
    assert redis.hgetall(wallet_keys.price_key(org.id, "unpriced-ranker")) == {"unpriced": "1"}
    assert 0 < redis.ttl(wallet_keys.price_key(org.id, "unpriced-ranker")) <= spend.UNPRICED_TTL_S
    # Nothing was taken: no request from any bucket, no reservation.
    assert not redis.exists(*lim.bucket_keys())
    assert not redis.hexists(wallet_keys.wallet_key(org.id), "reserved_nanos")
