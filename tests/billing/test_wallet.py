"""The wallet in Redis: the layout wallet_sync writes, rebasing, and the drain's counting."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import Principal
from billing import wallet, wallet_keys
from billing.invoicing import invoice_finalize, invoice_refresh_draft
from billing.models import BillingAccount, Budget
from billing.periods import hour_start, month_label
from billing.wallet import Usage, wallet_read, wallet_record_batch, wallet_record_usage, wallet_sync
from core.redis import get_redis
from tests.billing.factories import (
    CHAT,
    GrantFactory,
    OverrideFactory,
    PriceFactory,
    at,
    price_book,
    staff_principal,
    usage,
)
from tests.factories import OrganizationFactory, default_project

pytestmark = pytest.mark.django_db

USD = 1_000_000_000  # nanos


@pytest.fixture
def org() -> Organization:
    price_book(CHAT, input_price="1", output_price="2")
    return OrganizationFactory()


@pytest.fixture
def staff() -> Principal:
    return staff_principal()


@pytest.fixture
def this_hour() -> Iterator[Any]:
    yield hour_start(timezone.now())


def set_mode(org: Organization, mode: str) -> None:
    BillingAccount.objects.update_or_create(organization=org, defaults={"mode": mode})


def layout(org: Organization) -> dict[str, str]:
    found = wallet_read(org.id)
    assert float(found.pop("synced_at")) > 0
    assert int(found.pop("sync_gen")) >= 1
    return found


def test_postpaid_without_hard_budget_is_not_checked(org: Organization, this_hour: Any) -> None:
    usage(org, this_hour, input_tokens=1_000_000, output_tokens=500_000)  # 1.00 + 1.00

    wallet_sync(org)

    assert layout(org) == {
        "mode": "unlimited",  # postpaid without a hard budget: never refused for money
        "month": month_label(this_hour),
        "spent_nanos": str(2 * USD),
    }
    assert get_redis().hgetall(wallet_keys.price_key(org.id, CHAT)) == {
        "in": "1000",
        "out": "2000",
        "req": "0",
        "ms": "0",
        "cin": "1000",  # no cached input price: cached tokens cost the input price
        # no batch prices: batch lines cost the online prices
        **{"bin": "1000", "bout": "2000", "breq": "0", "bms": "0", "bcin": "1000"},
        **{"pin": "2000", "pout": "4000", "preq": "0", "pms": "0", "pcin": "2000"},
        **{"fin": "500", "fout": "1000", "freq": "0", "fms": "0", "fcin": "500"},
    }


def test_prepaid_cap_is_the_credit_and_spent_the_unbilled_usage(
    org: Organization, staff: Principal, this_hour: Any
) -> None:
    set_mode(org, "prepaid")
    GrantFactory(organization=org, amount=Decimal("10.00"))
    usage(org, at(9, 3), input_tokens=2_000_000)  # 2.00, to be invoiced and paid from credit
    usage(org, at(10, 3), input_tokens=500_000)  # 0.50, still a draft
    usage(org, this_hour, input_tokens=1_000_000)  # 1.00
    september = invoice_refresh_draft(org=org, month=at(9))
    assert september is not None
    invoice_finalize(principal=staff, invoice=september)
    invoice_refresh_draft(org=org, month=at(10))

    wallet_sync(org)

    assert layout(org) == {
        "mode": "prepaid",
        "month": month_label(this_hour),
        "cap_nanos": str(8 * USD),  # 10.00 granted - 2.00 consumed by September
        "spent_nanos": str(USD + USD // 2),  # October's draft and this month
    }


def test_prepaid_with_a_hard_budget_takes_the_smaller_headroom(
    org: Organization, this_hour: Any
) -> None:
    set_mode(org, "prepaid")
    GrantFactory(organization=org, amount=Decimal("10.00"))
    Budget.objects.create(organization=org, monthly_amount=Decimal("5.00"), hard_limit=True)
    usage(org, this_hour, input_tokens=1_000_000)

    wallet_sync(org)

    found = layout(org)
    assert (found["cap_nanos"], found["spent_nanos"]) == (str(5 * USD), str(USD))


def test_postpaid_hard_budgets_cap_the_organization_and_its_projects(
    org: Organization, this_hour: Any
) -> None:
    project = default_project(org)
    Budget.objects.create(organization=org, monthly_amount=Decimal("50.00"), hard_limit=True)
    Budget.objects.create(
        organization=org, project=project, monthly_amount=Decimal("7.25"), hard_limit=True
    )
    Budget.objects.create(
        organization=org,
        project=org.projects.create(name="soft"),
        monthly_amount=Decimal("1"),
        hard_limit=False,
    )
    usage(org, this_hour, input_tokens=3_000_000, project_id=project.id)
    usage(org, this_hour, input_tokens=1_000_000, project_id="proj_other")

    wallet_sync(org)

    assert layout(org) == {
        "mode": "postpaid",
        "month": month_label(this_hour),
        "cap_nanos": str(50 * USD),
        "spent_nanos": str(4 * USD),
        f"p:{project.id}:cap_nanos": str(7_250_000_000),
        f"p:{project.id}:spent_nanos": str(3 * USD),
    }


def test_unlimited_has_no_caps_at_all(org: Organization, this_hour: Any) -> None:
    set_mode(org, "unlimited")
    Budget.objects.create(
        organization=org, project=default_project(org), monthly_amount=Decimal("1"), hard_limit=True
    )

    wallet_sync(org)

    assert layout(org) == {"mode": "unlimited", "month": month_label(this_hour), "spent_nanos": "0"}


def test_sync_removes_caps_that_no_longer_apply(org: Organization) -> None:
    project = default_project(org)
    budget = Budget.objects.create(
        organization=org, project=project, monthly_amount=Decimal("1"), hard_limit=True
    )
    wallet_sync(org)
    assert f"p:{project.id}:cap_nanos" in wallet_read(org.id)
    budget.delete()

    wallet_sync(org)

    assert not [f for f in wallet_read(org.id) if f.startswith("p:")]


def test_prices_are_the_organizations_effective_prices_in_exact_nanos(org: Organization) -> None:
    PriceFactory(model_name="tiny", token_kind="input", unit_price=Decimal("0.0375"))
    PriceFactory(model_name="tiny", token_kind="output", unit_price=Decimal("0.15"))
    PriceFactory(model_name="half-priced", token_kind="input", unit_price=Decimal("1"))
    OverrideFactory(
        organization=org, kind="discount", model_name=CHAT, discount_percent=Decimal("10")
    )

    wallet_sync(org)

    redis = get_redis()
    assert redis.hgetall(wallet_keys.price_key(org.id, "tiny")) == {
        "in": "37.5",
        "out": "150",
        "req": "0",
        "ms": "0",
        "cin": "37.5",
        **{"bin": "37.5", "bout": "150", "breq": "0", "bms": "0", "bcin": "37.5"},
        **{"pin": "75", "pout": "300", "preq": "0", "pms": "0", "pcin": "75"},
        **{"fin": "18.75", "fout": "75", "freq": "0", "fms": "0", "fcin": "18.75"},
    }
    assert redis.hgetall(wallet_keys.price_key(org.id, CHAT)) == {
        "in": "900",
        "out": "1800",
        "req": "0",
        "ms": "0",
        "cin": "900",
        **{"bin": "900", "bout": "1800", "breq": "0", "bms": "0", "bcin": "900"},
        **{"pin": "1800", "pout": "3600", "preq": "0", "pms": "0", "pcin": "1800"},
        **{"fin": "450", "fout": "900", "freq": "0", "fms": "0", "fcin": "450"},
    }
    # One kind only: not admitted.
    assert not redis.exists(wallet_keys.price_key(org.id, "half-priced"))


def test_sync_keeps_what_the_gateway_and_a_racing_drain_added(
    org: Organization, this_hour: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_mode(org, "prepaid")
    GrantFactory(organization=org, amount=Decimal("10.00"))
    usage(org, this_hour, input_tokens=1_000_000)
    wallet_sync(org)
    redis = get_redis()
    key = wallet_keys.wallet_key(org.id)
    redis.hset(key, mapping={"reserved_nanos": 777, "pending_nanos": 55})
    real_compute = wallet.wallet_compute

    def compute_while_the_drain_counts(org: Organization, **kwargs: Any) -> Any:
        state = real_compute(org, **kwargs)
        # A batch committed after the database was read is counted meanwhile.
        redis.hincrby(key, "spent_nanos", 123)
        return state

    monkeypatch.setattr(wallet, "wallet_compute", compute_while_the_drain_counts)

    wallet_sync(org)

    found = wallet_read(org.id)
    assert found["spent_nanos"] == str(USD + 123)
    assert (found["reserved_nanos"], found["pending_nanos"]) == ("777", "55")


def test_two_syncs_at_once_rebase_once(
    org: Organization, this_hour: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage(org, this_hour, input_tokens=3_000_000)
    get_redis().hset(wallet_keys.wallet_key(org.id), "spent_nanos", 10 * USD)  # last month's
    real_compute = wallet.wallet_compute
    nested: list[bool] = []

    def compute_while_another_sync_runs(org: Organization, **kwargs: Any) -> Any:
        state = real_compute(org, **kwargs)
        if not nested:
            nested.append(True)
            wallet_sync(org)  # the beat's sync, between this one's reads and its write
        return state

    monkeypatch.setattr(wallet, "wallet_compute", compute_while_another_sync_runs)

    wallet_sync(org)

    found = wallet_read(org.id)
    assert found["spent_nanos"] == str(3 * USD)  # not 3 + 3 - 10: rebased once
    assert found["sync_gen"] == "2"


def test_sync_replaces_what_the_database_now_reflects(
    org: Organization, staff: Principal, this_hour: Any
) -> None:
    set_mode(org, "prepaid")
    GrantFactory(organization=org, amount=Decimal("10.00"))
    wallet_sync(org)
    # The drain commits usage and counts it; then the same usage is read from the database.
    usage(org, this_hour, input_tokens=2_000_000)
    wallet_record_usage(
        organization_id=org.id, model_name=CHAT, input_tokens=2_000_000, output_tokens=0
    )
    assert wallet_read(org.id)["spent_nanos"] == str(2 * USD)

    wallet_sync(org)

    assert wallet_read(org.id)["spent_nanos"] == str(2 * USD)  # not 4: counted once


# --- the drain side ---------------------------------------------------------------------------


def test_record_counts_at_current_prices_and_a_replayed_batch_once(org: Organization) -> None:
    wallet_sync(org)
    batch = [
        Usage(org.id, CHAT, 1000, 10, request_id="req_1"),
        Usage(org.id, CHAT, 3, 0, request_id="req_2"),
    ]

    costs = wallet_record_batch(batch)
    wallet_record_batch(list(reversed(batch)))  # the drain replays it after a crash

    assert costs == [1_020_000, 3000]
    assert wallet_read(org.id)["spent_nanos"] == str(1_023_000)


def test_record_moves_a_parked_cost_from_pending_to_spent(org: Organization) -> None:
    redis = get_redis()
    key = wallet_keys.wallet_key(org.id)
    wallet_sync(org)
    # The gateway settled req_a first (parked as pending); req_b is counted before its settle.
    redis.hset(wallet_keys.pending_key(org.id), "req_a", 5000)
    redis.hincrby(key, "pending_nanos", 5000)

    wallet_record_batch(
        [
            Usage(org.id, CHAT, 5, 0, request_id="req_a"),
            Usage(org.id, CHAT, 1, 0, request_id="req_b"),
        ]
    )

    found = wallet_read(org.id)
    assert (found["pending_nanos"], found["spent_nanos"]) == ("0", "6000")
    assert not redis.hexists(wallet_keys.pending_key(org.id), "req_a")
    assert redis.exists(wallet_keys.counted_key("req_b")) == 1


def test_record_counts_a_projects_spend_only_when_it_has_a_cap(org: Organization) -> None:
    capped = default_project(org)
    Budget.objects.create(
        organization=org, project=capped, monthly_amount=Decimal("1"), hard_limit=True
    )
    wallet_sync(org)

    wallet_record_batch(
        [
            Usage(org.id, CHAT, 10, 0, project_id=capped.id, request_id="r1"),
            Usage(org.id, CHAT, 20, 0, project_id="proj_free", request_id="r2"),
        ]
    )

    found = wallet_read(org.id)
    assert found[f"p:{capped.id}:spent_nanos"] == "10000"
    assert "p:proj_free:spent_nanos" not in found
    assert found["spent_nanos"] == "30000"


def test_record_with_no_price_hash_loads_the_price_from_the_database(org: Organization) -> None:
    OverrideFactory(
        organization=org,
        kind="rate",
        model_name=CHAT,
        token_kind="input",
        unit_price=Decimal("0.5"),
    )

    cost = wallet_record_usage(
        organization_id=org.id, model_name=CHAT, input_tokens=4, output_tokens=0, request_id="r"
    )

    assert cost == 2000
    assert get_redis().hgetall(wallet_keys.price_key(org.id, CHAT)) == {
        "in": "500",
        "out": "2000",
        "req": "0",
        "ms": "0",
        "cin": "500",
        **{"bin": "500", "bout": "2000", "breq": "0", "bms": "0", "bcin": "500"},
        **{"pin": "1000", "pout": "4000", "preq": "0", "pms": "0", "pcin": "1000"},
        **{"fin": "250", "fout": "1000", "freq": "0", "fms": "0", "fcin": "250"},
    }


def test_record_rounds_each_request_up_to_a_whole_nano(org: Organization) -> None:
    PriceFactory(model_name="tiny", token_kind="input", unit_price=Decimal("0.0375"))
    PriceFactory(model_name="tiny", token_kind="output", unit_price=Decimal("0.0375"))

    cost = wallet_record_usage(
        organization_id=org.id, model_name="tiny", input_tokens=3, output_tokens=0, request_id="r"
    )

    assert cost == 113  # 112.5 nanos, rounded up


def test_a_grant_rewrites_the_wallet_after_commit(
    org: Organization, staff: Principal, django_capture_on_commit_callbacks: Any
) -> None:
    from billing.credits import credit_grant

    set_mode(org, "prepaid")
    wallet_sync(org)
    assert wallet_read(org.id)["cap_nanos"] == "0"

    with django_capture_on_commit_callbacks(execute=True):
        credit_grant(principal=staff, org=org, kind="prepaid_purchase", amount="20", reason="PO 9")

    assert wallet_read(org.id)["cap_nanos"] == str(20 * USD)


def test_the_drain_hook_counts_contract_events(org: Organization) -> None:
    from billing.wallet import wallet_record_events
    from workers.contract import UsageEvent as ContractEvent

    wallet_sync(org)
    events = [
        ContractEvent(
            request_id=f"req_hook{i}",
            organization_id=org.id,
            project_id=default_project(org).id,
            api_key_id="key_x",
            endpoint_id="ep-x",
            model_version_id="mv_x",
            model_name=CHAT,
            input_tokens=100,
            output_tokens=50,
            status="stop",
            started_at=0.0,
            finished_at=1.0,
            queue_ms=0,
            compute_ms=1,
        )
        for i in range(3)
    ]

    wallet_record_events(events)
    wallet_record_events(events)  # the outbox replays the batch

    assert wallet_read(org.id)["spent_nanos"] == str(3 * (100 * 1000 + 50 * 2000))


def test_the_drain_runs_the_wallet_hook_by_default() -> None:
    # A drain started as `manage.py drain_usage` does (no hooks given) must move settled
    # costs from pending to spent; without the hook registered, pending only ever grows.
    from billing.metering import drain, outbox
    from billing.wallet import wallet_record_events

    assert wallet_record_events in outbox.registered_hooks()
    assert wallet_record_events in drain.Drain(consumer="hook-check", client=get_redis()).hooks


def test_a_batch_leaves_the_wallets_as_counting_each_event_alone_would() -> None:
    """The batch script sums spent per wallet and per (wallet, project) before it runs:
    the result must equal one event at a time, across organizations, capped and uncapped
    projects, costs the gateway parked (with and without a project) and ones it did not."""
    redis = get_redis()
    price_book(CHAT, input_price="1", output_price="4")  # 1000 and 4000 nanos a token
    orgs = [OrganizationFactory(), OrganizationFactory()]
    capped = {}
    for o in orgs:
        capped[o.id] = default_project(o)
        Budget.objects.create(
            organization=o, project=capped[o.id], monthly_amount=Decimal("5"), hard_limit=True
        )
    events = []
    for i in range(40):
        o = orgs[i % 2]
        project = (capped[o.id].id, "proj_uncapped", "")[i % 3]
        events.append(Usage(o.id, CHAT, 7 * i + 1, i % 5, project_id=project, request_id=f"r{i}"))

    def run(record: Any) -> dict[str, dict[str, str]]:
        for key in redis.scan_iter("mantle:*"):
            redis.delete(key)
        for o in orgs:
            wallet_sync(o)
            for i, e in enumerate(events):
                if e.organization_id == o.id and i % 4 == 0:  # settled first by the gateway
                    parked = f"{i + 3}:{e.project_id}" if e.project_id else str(i + 3)
                    redis.hset(wallet_keys.pending_key(o.id), e.request_id, parked)
                    redis.hincrby(wallet_keys.wallet_key(o.id), "pending_nanos", i + 3)
                    if e.project_id:
                        field = f"p:{e.project_id}:pending_nanos"
                        redis.hincrby(wallet_keys.wallet_key(o.id), field, i + 3)
        record()
        state = {}
        for o in orgs:
            state[o.id] = dict(redis.hgetall(wallet_keys.wallet_key(o.id)))
            state[o.id].pop("synced_at")  # when each run synchronised, nothing counted
            state[o.id + ":pending"] = dict(redis.hgetall(wallet_keys.pending_key(o.id)))
        state["counted"] = {
            e.request_id: str(redis.exists(wallet_keys.counted_key(e.request_id))) for e in events
        }
        return state

    alone = run(lambda: [wallet_record_batch([e]) for e in events])
    batched = run(lambda: wallet_record_batch(events))
    assert batched == alone
    for o in orgs:  # and the figures are the expected ones, not merely equal
        mine = [e for e in events if e.organization_id == o.id]
        assert int(alone[o.id]["spent_nanos"]) == sum(1000 * e.input_tokens for e in mine) + sum(
            4000 * e.output_tokens for e in mine
        )
        assert alone[o.id + ":pending"] == {}
        assert int(alone[o.id][f"p:{capped[o.id].id}:spent_nanos"]) > 0
        assert "p:proj_uncapped:spent_nanos" not in alone[o.id]
