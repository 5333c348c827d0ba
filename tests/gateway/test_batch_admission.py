"""Admission of batch lines: outside the online rate limits, inside the money, at batch prices.

The real admission script against the wallet and price hash billing writes. A batch line
(`service_class="batch"`, as the batch runner's `serving_class(ServiceClass.BATCH)` makes
`pipeline.admit` pass) takes nothing from the RPM/TPM buckets, but is checked for price,
a live worker, credit and budgets, and reserved and settled at the batch prices, which
the drain then counts, so pending and spent agree.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aredis
from django.conf import settings
from django.utils import timezone

from accounts.models import Organization
from billing import spend, wallet_keys
from billing.invoicing import month_spend
from billing.models import BillingAccount, Budget
from billing.periods import hour_start, month_start
from billing.wallet import price_fill, wallet_read, wallet_record_events, wallet_sync
from core.redis import get_redis
from gateway import pipeline
from gateway.limits import Admission, Limits, RateLimiter
from tests.billing.factories import CHAT, GrantFactory, PriceFactory, price_book, usage
from tests.factories import OrganizationFactory, default_project
from workers.contract import ServiceClass, UsageEvent, pool_live_key

pytestmark = pytest.mark.django_db

POOL = "batch-admission-test"
BIG = 10**9
PROMPT, MAX_TOKENS = 200, 400
# Online 1 and 2 USD per million tokens (1000 and 2000 nanos each); batch half of each, and
# batch cached input tokens at 0.25 (250 nanos).
ONLINE_WORST = PROMPT * 1000 + MAX_TOKENS * 2000  # 1,000,000 nanos
BATCH_WORST = PROMPT * 500 + MAX_TOKENS * 1000  # 500,000 nanos


def batch_prices() -> None:
    for kind, price in (
        ("batch_input", "0.5"),
        ("batch_output", "1"),
        ("batch_cached_input", "0.25"),
    ):
        PriceFactory(model_name=CHAT, token_kind=kind, unit_price=Decimal(price))


@pytest.fixture
def prepaid() -> Organization:
    """Prepaid with credit for 10 batch lines' worst cases (5 online ones)."""
    price_book(CHAT, input_price="1", output_price="2")
    batch_prices()
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, mode="prepaid")
    GrantFactory(organization=org, amount=Decimal("0.005"))
    wallet_sync(org)
    return org


def limits(org: Organization, **caps: Any) -> Limits:
    values: dict[str, Any] = dict.fromkeys(
        ("key_rpm", "key_tpm", "project_rpm", "project_tpm", "endpoint_rpm", "endpoint_tpm"),
        BIG,
    )
    values.update(caps)
    return Limits(
        key_id="key_batch", project_id=default_project(org).id, endpoint_id="ep-batch", **values
    )


async def _admit(
    organization_id: str,
    lim: Limits,
    classes: list[str],
    *,
    model_name: str = CHAT,
    pool: str = POOL,
    request_ids: list[str] | None = None,
) -> list[Admission]:
    """One admission per entry of `classes`, one after another, through the real Lua, under
    `request_ids` (default `req_<index>`); POOL has a live worker."""
    ids = request_ids or [f"req_{i}" for i in range(len(classes))]
    client = aredis.Redis.from_url(settings.REDIS_URL, decode_responses=True, max_connections=64)
    await client.zadd(pool_live_key(POOL), {"node-a": time.time()})
    limiter = RateLimiter(client)
    try:
        return [
            await limiter.admit(
                lim,
                pool=pool,
                organization_id=organization_id,
                model_name=model_name,
                prompt_tokens=PROMPT,
                max_tokens=MAX_TOKENS,
                request_id=request_id,
                hold_s=60,
                service_class=service_class,
            )
            for request_id, service_class in zip(ids, classes, strict=True)
        ]
    finally:
        await client.aclose()


def admit(org: Organization, lim: Limits, classes: list[str], **kwargs: Any) -> list[Admission]:
    return asyncio.run(_admit(org.id, lim, classes, **kwargs))


def bucket_levels() -> dict[str, str | None]:
    client = get_redis()
    return {key: client.hget(key, "l") for key in client.keys("mantle:rl:*")}


# --- the online limits --------------------------------------------------------------------


@pytest.mark.parametrize(
    "caps",
    [
        {"key_rpm": 1},
        {"project_tpm": PROMPT + MAX_TOKENS + 100},
        {"endpoint_rpm": 1},
        {"organization_share": 1},
    ],
    ids=["key requests", "project tokens", "endpoint requests", "organization share"],
)
def test_a_batch_line_ignores_an_exhausted_rate_limit(
    prepaid: Organization, caps: dict[str, int]
) -> None:
    if "organization_share" in caps:  # a shared endpoint: the organization's share of it
        lim = replace(
            limits(prepaid),
            organization_id=prepaid.id,
            organization_rpm=caps["organization_share"],
            organization_tpm=BIG,
        )
    else:
        lim = limits(prepaid, **caps)
    first, second = admit(prepaid, lim, ["online", "online"])
    assert (first.allowed, second.allowed) == (True, False)  # the limit is spent
    levels = bucket_levels()

    (line,) = admit(prepaid, lim, ["batch"])

    assert line.allowed
    assert not line.rate_limited and line.headers() == {}
    assert bucket_levels() == levels  # it took nothing from any bucket
    assert line.reserved_nanos == BATCH_WORST
    # Online traffic is still refused.
    assert not admit(prepaid, lim, ["online"])[0].allowed


def test_a_batch_line_is_reserved_and_priced_at_the_batch_prices(prepaid: Organization) -> None:
    online, batch = admit(prepaid, limits(prepaid), ["online", "batch"])

    assert (online.reserved_nanos, online.price_in, online.price_out) == (
        ONLINE_WORST,
        "1000",
        "2000",
    )
    assert online.price_cached_input == "1000"  # no online cached price: the input price
    assert (batch.reserved_nanos, batch.price_in, batch.price_out) == (BATCH_WORST, "500", "1000")
    assert batch.price_cached_input == "250"
    assert wallet_read(prepaid.id)["reserved_nanos"] == str(ONLINE_WORST + BATCH_WORST)


# --- money ----------------------------------------------------------------------------------


def test_a_batch_line_is_refused_on_insufficient_quota(prepaid: Organization) -> None:
    # Credit for 10 batch worst cases; the rate limits would admit one request a minute.
    results = admit(prepaid, limits(prepaid, key_rpm=1), ["batch"] * 12)

    assert [r.allowed for r in results] == [True] * 10 + [False] * 2
    refused = results[-1]
    assert (refused.insufficient_quota, refused.quota_scope) == (True, "organization")
    assert refused.reserved_nanos == BATCH_WORST  # what it would have cost
    # The refusals reserved nothing.
    wallet = wallet_read(prepaid.id)
    assert wallet["reserved_nanos"] == str(10 * BATCH_WORST)
    held = get_redis().hkeys(wallet_keys.held_key(prepaid.id))
    assert sorted(held) == sorted(f"req_{i}" for i in range(10))


def test_a_project_budget_caps_batch_lines_too() -> None:
    price_book(CHAT, input_price="1", output_price="2")
    batch_prices()
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, mode="postpaid")
    Budget.objects.create(
        organization=org,
        project=default_project(org),
        monthly_amount=Decimal("0.01"),  # 20 batch worst cases
        hard_limit=True,
    )
    wallet_sync(org)

    results = admit(org, limits(org), ["batch"] * 22)

    assert [r.allowed for r in results] == [True] * 20 + [False] * 2
    assert (results[-1].insufficient_quota, results[-1].quota_scope) == (True, "project")
    assert {r.reserved_project_id for r in results[:20]} == {default_project(org).id}


def test_a_batch_line_still_needs_a_price_and_a_live_worker(prepaid: Organization) -> None:
    price_fill(prepaid.id, "nothing-prices-it")  # as the gateway does on a miss: a marker
    (unpriced,) = admit(prepaid, limits(prepaid), ["batch"], model_name="nothing-prices-it")
    (dead,) = admit(prepaid, limits(prepaid), ["batch"], pool="a-pool-with-no-worker")

    assert unpriced.unpriced and not unpriced.allowed
    assert dead.no_worker and not dead.allowed
    assert wallet_read(prepaid.id).get("reserved_nanos", "0") == "0"  # nothing reserved


# --- which prices ---------------------------------------------------------------------------


def test_without_batch_prices_a_batch_line_costs_the_online_prices() -> None:
    price_book(CHAT, input_price="1", output_price="2")
    org = OrganizationFactory()
    wallet_sync(org)

    (line,) = admit(org, limits(org), ["batch"])

    assert (line.reserved_nanos, line.price_in, line.price_out) == (ONLINE_WORST, "1000", "2000")


def test_a_price_hash_of_an_earlier_release_prices_batch_lines_as_online(
    prepaid: Organization,
) -> None:
    key = wallet_keys.price_key(prepaid.id, CHAT)
    get_redis().hdel(key, *wallet_keys.PRICE_FIELDS[5:])  # written before batch prices

    (line,) = admit(prepaid, limits(prepaid), ["batch"])

    # Never below the book: a batch price is never above the online one.
    assert (line.reserved_nanos, line.price_in, line.price_out) == (ONLINE_WORST, "1000", "2000")
    assert line.price_cached_input == "1000"


# --- settle, then the drain -----------------------------------------------------------------


def test_a_settled_batch_line_is_drained_at_the_same_cost(prepaid: Organization) -> None:
    (line,) = admit(prepaid, limits(prepaid), ["batch"])
    # It used 200 prompt tokens, 50 of them cached, and 100 output tokens.
    cost = 150 * 500 + 50 * 250 + 100 * 1000

    asyncio.run(pipeline.settle(prepaid.id, "req_0", line, 200, 100, cached_input_tokens=50))
    settled = wallet_read(prepaid.id)
    assert (settled["reserved_nanos"], settled["pending_nanos"]) == ("0", str(cost))

    # The drain commits the rollup, then counts the worker's event at the batch prices.
    usage(
        prepaid, hour_start(timezone.now()), input_tokens=200, output_tokens=100,
        cached_input_tokens=50, requests=1, batch_requests=1, batch_input_tokens=200,
        batch_output_tokens=100, batch_cached_input_tokens=50,
    )  # fmt: skip
    wallet_record_events([worker_event(prepaid, "req_0", 200, 100, 50)])

    drained = wallet_read(prepaid.id)
    assert (drained["reserved_nanos"], drained["pending_nanos"]) == ("0", "0")
    assert drained["spent_nanos"] == str(cost)
    # And the invoice's rating of the rollup is the same money.
    assert month_spend(prepaid, month_start(timezone.now()), exact=True) == Decimal(cost) / 10**9


def worker_event(
    org: Organization,
    request_id: str,
    prompt: int,
    completion: int,
    cached: int,
    service_class: ServiceClass = ServiceClass.BATCH,
) -> UsageEvent:
    now = time.time()
    return UsageEvent(
        request_id=request_id,
        organization_id=org.id,
        project_id=default_project(org).id,
        api_key_id="key_batch",
        endpoint_id="ep-batch",
        model_version_id="mv",
        model_name=CHAT,
        input_tokens=prompt,
        output_tokens=completion,
        status="stop",
        started_at=now - 1,
        finished_at=now,
        queue_ms=0,
        compute_ms=10,
        cached_input_tokens=cached,
        service_class=service_class.value,
    )


# --- one request id admitted and settled again --------------------------------------------
# A runner died mid-batch; the next runner runs the line again under the same request id.
# The worker's claim makes the second dispatch a duplicate and the answer is read again, so
# the same id is admitted, and perhaps settled, a second time. The wallet must count it once.

LINE = "req_b1_7_1"  # the batch runner's id of line 7's first attempt
# 200 prompt tokens, 50 of them cached, and 100 output tokens at the batch prices.
COST = 150 * 500 + 50 * 250 + 100 * 1000


@pytest.fixture
def project_capped() -> Organization:
    """Postpaid; its default project's hard budget covers 20 batch worst cases."""
    price_book(CHAT, input_price="1", output_price="2")
    batch_prices()
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, mode="postpaid")
    Budget.objects.create(
        organization=org,
        project=default_project(org),
        monthly_amount=Decimal("0.01"),
        hard_limit=True,
    )
    wallet_sync(org)
    return org


def settle_line(org: Organization, admission: Admission, request_id: str = LINE) -> None:
    """The gateway's settle of a batch line, as the runner's `serving_class` makes it."""
    with pipeline.serving_class(ServiceClass.BATCH):
        asyncio.run(
            pipeline.settle(org.id, request_id, admission, 200, 100, cached_input_tokens=50)
        )


def drain(org: Organization, request_id: str = LINE, how: str = "events") -> None:
    """The metering drain counts the worker's one event of the line: its batch hook, or the
    one-request path."""
    if how == "events":
        wallet_record_events([worker_event(org, request_id, 200, 100, 50)])
    else:
        spend.count_usage(
            get_redis(),
            organization_id=org.id,
            request_id=request_id,
            model_name=CHAT,
            input_tokens=200,
            output_tokens=100,
            cached_input_tokens=50,
            service_class=ServiceClass.BATCH,
        )


def money(org: Organization) -> tuple[str, str, str]:
    """(reserved, pending, spent) of the organization's wallet, and of its capped project's
    when it has one, as the wallet hash holds them."""
    wallet = wallet_read(org.id)
    fields = ("reserved_nanos", "pending_nanos", "spent_nanos")
    prefix = f"p:{default_project(org).id}:"
    if prefix + "cap_nanos" in wallet:  # the project's reservation and pending move alike
        assert [wallet.get(prefix + f, "0") for f in fields[:2]] == [
            wallet.get(f, "0") for f in fields[:2]
        ]
    reserved, pending, spent = (wallet.get(f, "0") for f in fields)
    return reserved, pending, spent


@pytest.mark.parametrize("wallet", ["prepaid", "project_capped"])
def test_an_id_admitted_again_holds_one_reservation(
    wallet: str, request: pytest.FixtureRequest
) -> None:
    org = request.getfixturevalue(wallet)
    first, again = admit(org, limits(org), ["batch", "batch"], request_ids=[LINE, LINE])
    assert first.allowed and again.allowed and again.held
    assert money(org)[0] == str(BATCH_WORST)  # not two reservations
    held = get_redis().hgetall(wallet_keys.held_key(org.id))
    assert list(held) == [LINE]

    settle_line(org, again)

    assert money(org)[:2] == ("0", str(COST))
    assert not get_redis().exists(wallet_keys.held_key(org.id))


def test_an_id_admitted_again_counts_its_own_reservation_as_available(
    prepaid: Organization,
) -> None:
    # Credit for 10 batch worst cases, all reserved: req_9 again still fits (it replaces its
    # own reservation), a new line does not.
    ids = [*(f"req_{i}" for i in range(10)), "req_9", "req_10"]

    results = admit(prepaid, limits(prepaid), ["batch"] * 12, request_ids=ids)

    assert [r.allowed for r in results] == [True] * 11 + [False]
    assert money(prepaid)[0] == str(10 * BATCH_WORST)


@pytest.mark.parametrize(
    "steps",
    [
        # The first runner's request had only lost its lease: both requests settle.
        "admit admit settle settle drain",
        "admit admit drain settle settle",
        # The first runner settled, then died before storing the line.
        "admit settle admit settle drain",
        "admit settle drain admit settle",
        "admit drain settle admit settle",
    ],
)
@pytest.mark.parametrize("how", ["events", "one request"])
@pytest.mark.parametrize("wallet", ["prepaid", "project_capped"])
def test_an_id_run_twice_is_counted_once(
    wallet: str, how: str, steps: str, request: pytest.FixtureRequest
) -> None:
    org = request.getfixturevalue(wallet)
    admitted: list[Admission] = []
    held = settled = drained = False
    for step in steps.split():
        if step == "admit":
            (line,) = admit(org, limits(org), ["batch"], request_ids=[LINE])
            assert line.allowed
            admitted.append(line)
            held = True
        elif step == "settle":
            settle_line(org, admitted.pop(0))
            held, settled = False, True  # whichever request settles, the id's hold goes
        else:
            drain(org, how=how)
            drained = True

        assert money(org) == (
            str(BATCH_WORST if held else 0),
            str(COST if settled and not drained else 0),  # parked once, unparked once
            str(COST if drained else 0),
        ), step
    assert not get_redis().exists(wallet_keys.held_key(org.id), wallet_keys.pending_key(org.id))


def test_a_drained_batch_line_keeps_its_counted_marker(prepaid: Organization) -> None:
    (line,) = admit(prepaid, limits(prepaid), ["batch"], request_ids=[LINE])
    settle_line(prepaid, line)

    drain(prepaid)

    ttl = get_redis().ttl(wallet_keys.counted_key(LINE))
    assert 0 < ttl <= spend.COUNTED_TTL_S


@pytest.mark.parametrize("drain_first", [False, True], ids=["settle first", "drain first"])
def test_online_requests_leave_no_counted_marker(prepaid: Organization, drain_first: bool) -> None:
    # Online traffic is settled once per id: no key per request outlives its settle.
    (online,) = admit(prepaid, limits(prepaid), ["online"], request_ids=["req_online"])
    event = worker_event(prepaid, "req_online", 200, 100, 0, ServiceClass.ONLINE)
    if drain_first:
        wallet_record_events([event])
    asyncio.run(pipeline.settle(prepaid.id, "req_online", online, 200, 100))
    if not drain_first:
        wallet_record_events([event])

    assert money(prepaid) == ("0", "0", str(200 * 1000 + 100 * 2000))
    assert not get_redis().exists(wallet_keys.counted_key("req_online"))
