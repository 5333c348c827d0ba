"""Service tier prices: priority at a premium, flex at a discount, end to end in billing.

A priority or flex request's usage is billed by its tier's twin of each unit
(`priority_input`, `flex_output`...) at the organization's online price of that unit times
the tier's multiplier (TierMultiplier: the model's own row, else every model's, else
priority 2 and flex 0.5). The drain keeps each tier's part of every rollup sum; admission
reserves, the gateway settles and the drain counts at the tier's prices; invoices show
each tier's usage on its own lines.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import AuditLog, Organization
from accounts.principal import Principal
from billing import wallet_keys
from billing.invoicing import invoice_refresh_draft
from billing.metering import partitions
from billing.metering.drain import DrainTotals, usage_drain
from billing.models import Invoice, TierMultiplier, UsageRollup
from billing.periods import hour_start
from billing.pricing import PriceBook, billed_quantities, price_set, tier_multiplier_set
from billing.wallet import prices_compute, wallet_record_usage
from core.errors import InvalidInput
from core.redis import get_redis
from tests.billing.factories import (
    CHAT,
    OverrideFactory,
    PriceFactory,
    at,
    price_book,
    staff_principal,
    usage,
)
from tests.billing.metering_support import UsageEventFactory, emit
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

TIER_PARTS = ("requests", "input_tokens", "output_tokens", "compute_ms", "cached_input_tokens")


@pytest.fixture
def org() -> Organization:
    """CHAT lists at 1 (input) and 2 (output) per million."""
    price_book(CHAT, input_price="1", output_price="2")
    return OrganizationFactory()


@pytest.fixture
def staff() -> Principal:
    return staff_principal()


def multiplier(tier: str, value: str, *, model_name: str = "", **kwargs: Any) -> None:
    kwargs.setdefault("effective_from", at(1))
    TierMultiplier.objects.create(
        model_name=model_name, service_tier=tier, multiplier=Decimal(value), **kwargs
    )


def charges(book: PriceBook, quantities: list[tuple[str, int]], when: Any = None) -> list[Any]:
    rating = book.rate(CHAT, when or at(10, 5), quantities)
    return [(c.unit, c.quantity, c.price and c.price.unit_price) for c in rating.charges]


def lines_of(invoice: Invoice) -> list[tuple[str, int, Decimal | None, Decimal]]:
    return [
        (line.label, line.quantity, line.unit_price, line.amount)
        for line in invoice.lines.order_by("position")
    ]


# --- the price book ------------------------------------------------------------------------


def test_a_rollups_tier_parts_are_split_from_its_online_usage() -> None:
    # 1,000 input tokens: 300 priority (100 cached), 200 flex, 100 batch; 400 cached in all.
    row = {"i": 1_000, "ci": 400, "o": 90, "r": 9, "c": 0}
    row |= {"bi": 100, "bci": 0, "bo": 10, "br": 1, "bc": 0}
    row |= {"s_priority_input": 300, "s_priority_cached_input": 100, "s_priority_output": 30}
    row |= {"s_priority_request": 3, "s_flex_input": 200, "s_flex_output": 20}
    row |= {"s_flex_request": 2, "s_flex_cached_input": 0}

    billed = dict(billed_quantities(row, "chat"))

    assert billed == {
        "input": 1_000 - 400 - 100 - 200 - 200,  # online uncached: 100
        "cached_input": 300,
        "output": 30,
        "batch_input": 100,
        "batch_cached_input": 0,
        "batch_output": 10,
        "priority_input": 200,
        "priority_cached_input": 100,
        "priority_output": 30,
        "flex_input": 200,
        "flex_cached_input": 0,
        "flex_output": 20,
        **{"provisioned_input": 0, "provisioned_cached_input": 0, "provisioned_output": 0},
    }
    assert sum(q for u, q in billed.items() if "input" in u) == row["i"]
    assert sum(q for u, q in billed.items() if "output" in u) == row["o"]


def test_tier_units_cost_the_online_price_times_the_default_multipliers(
    org: Organization,
) -> None:
    book = PriceBook.load(org.id)

    assert charges(book, [("priority_input", 10), ("priority_output", 5)]) == [
        ("priority_input", 10, Decimal("2")),
        ("priority_output", 5, Decimal("4")),
    ]
    assert charges(book, [("flex_input", 10), ("flex_output", 5)]) == [
        ("flex_input", 10, Decimal("0.5")),
        ("flex_output", 5, Decimal("1")),
    ]
    # No cached price: a tier's cached tokens are its input tokens, on its input line.
    assert charges(book, [("priority_input", 10), ("priority_cached_input", 4)]) == [
        ("priority_input", 14, Decimal("2")),
    ]


def test_a_models_own_multiplier_beats_every_models_which_beats_the_default(
    org: Organization,
) -> None:
    PriceFactory(model_name="other-model", token_kind="input", unit_price=Decimal("3"))
    multiplier("priority", "1.5")  # every model
    multiplier("priority", "3", model_name=CHAT)
    multiplier("flex", "0.2", model_name=CHAT, effective_from=at(10, 15))  # mid-month
    book = PriceBook.load(org.id)

    assert charges(book, [("priority_input", 1)]) == [("priority_input", 1, Decimal("3"))]
    other = book.rate("other-model", at(10, 5), [("priority_input", 1)]).charges
    assert [c.price and c.price.unit_price for c in other] == [Decimal("4.5")]
    # Flex: the default until the 15th, the model's row from then.
    assert charges(book, [("flex_input", 1)], at(10, 14, 23)) == [("flex_input", 1, Decimal("0.5"))]
    assert charges(book, [("flex_input", 1)], at(10, 15)) == [("flex_input", 1, Decimal("0.2"))]


def test_contract_terms_apply_before_the_tiers_multiplier(org: Organization) -> None:
    OverrideFactory(organization=org, kind="discount", discount_percent=Decimal("10"))
    OverrideFactory(
        organization=org, kind="rate", model_name=CHAT, token_kind="output",
        unit_price=Decimal("1.234567891"),
    )  # fmt: skip
    book = PriceBook.load(org.id)

    assert charges(book, [("priority_input", 1), ("flex_output", 1)]) == [
        ("priority_input", 1, Decimal("1.8")),  # 0.9 x 2
        ("flex_output", 1, Decimal("0.617283946")),  # half, rounded half up to the nano/M
    ]


def test_operators_set_multipliers_within_their_meaning_and_audited(
    org: Organization, staff: Principal
) -> None:
    next_hour = hour_start(timezone.now()) + timedelta(hours=1)

    row = tier_multiplier_set(
        principal=staff, service_tier="priority", multiplier="1.75", model_name=CHAT,
        effective_from=next_hour, reason="priority launch",
    )  # fmt: skip

    assert (row.model_name, row.multiplier) == (CHAT, Decimal("1.75"))
    entry = AuditLog.objects.get(action="billing.tier_multiplier_set")
    assert entry.metadata["multiplier"] == "1.75"
    refused = {
        ("priority", "0.9"): "a priority multiplier is a premium",
        ("priority", "101"): "a priority multiplier is a premium",
        ("flex", "0"): "a flex multiplier is a discount",
        ("flex", "1.2"): "a flex multiplier is a discount",
        ("scale", "1"): "service_tier must be one of",
        ("flex", "0.12345"): "multiplier",
    }
    for (tier, value), message in refused.items():
        with pytest.raises(InvalidInput) as error:
            tier_multiplier_set(
                principal=staff, service_tier=tier, multiplier=value,
                effective_from=next_hour + timedelta(hours=1), reason="test",
            )  # fmt: skip
        assert message in error.value.message, (tier, value)
    with pytest.raises(InvalidInput) as past:
        tier_multiplier_set(
            principal=staff, service_tier="flex", multiplier="0.4",
            effective_from=hour_start(timezone.now()) - timedelta(hours=1), reason="test",
        )  # fmt: skip
    assert "must not be in the past" in past.value.message
    # A tier's unit has no price of its own: it is the online price times the multiplier.
    with pytest.raises(InvalidInput) as own:
        price_set(
            principal=staff, model_name=CHAT, token_kind="priority_input", unit_price="5",
            effective_from=next_hour, reason="test",
        )  # fmt: skip
    assert "multiplier" in own.value.message
    assert TierMultiplier.objects.count() == 1


# --- wallet, admission's prices, the drain -------------------------------------------------


def test_the_price_hash_carries_each_tiers_prices(org: Organization) -> None:
    multiplier("priority", "1.5", model_name=CHAT)

    prices = prices_compute(org.id)[CHAT]

    assert (prices.priority_input, prices.priority_output) == ("1500", "3000")
    assert (prices.flex_input, prices.flex_output) == ("500", "1000")
    assert prices.for_class("priority").input == "1500"
    assert prices.for_class("flex").output == "1000"
    assert prices.for_class("online").input == "1000"


def test_the_drain_counts_each_tier_at_its_prices(org: Organization) -> None:
    costs = {
        tier: wallet_record_usage(
            organization_id=org.id,
            model_name=CHAT,
            input_tokens=1_000,
            output_tokens=10,
            request_id=f"req_{tier}",
            service_class=tier,
        )
        for tier in ("online", "priority", "flex")
    }

    assert costs == {
        "online": 1_000 * 1000 + 10 * 2000,
        "priority": 1_000 * 2000 + 10 * 4000,
        "flex": 1_000 * 500 + 10 * 1000,
    }
    assert get_redis().hget(wallet_keys.price_key(org.id, CHAT), "pin") == "2000"


def drain() -> DrainTotals:
    return usage_drain(consumer="test", client=get_redis(), once=True, hooks=())


@pytest.mark.parametrize("portable", [False, True], ids=["postgresql", "row-by-row"])
def test_the_drain_keeps_each_tiers_part_of_every_rollup_sum(
    monkeypatch: pytest.MonkeyPatch, portable: bool
) -> None:
    if portable:
        monkeypatch.setattr(partitions, "is_partitioned", lambda: False)
    client = get_redis()
    events = [
        UsageEventFactory(service_class="priority", input_tokens=40, output_tokens=7),
        UsageEventFactory(service_class="priority", input_tokens=10, cached_input_tokens=4),
        UsageEventFactory(service_class="flex", input_tokens=64, output_tokens=2),
        UsageEventFactory(input_tokens=9, output_tokens=3),
    ]
    emit(client, events)

    assert drain().inserted == 4
    emit(client, events[:2])  # redelivered: counted once
    assert drain().duplicates == 2

    def part(tier: str) -> tuple[int, ...]:
        rows = UsageRollup.objects.values_list(*(f"{tier}_{name}" for name in TIER_PARTS))
        return tuple(sum(r[i] for r in rows) for i in range(len(TIER_PARTS)))

    mine = [e for e in events if e.service_class == "priority"]
    assert part("priority") == (
        2,
        50,
        sum(e.output_tokens for e in mine),
        sum(e.compute_ms for e in mine),
        sum(e.cached_input_tokens for e in mine),
    )
    assert part("flex")[:2] == (1, 64)
    assert part("batch") == (0, 0, 0, 0, 0)
    totals = UsageRollup.objects.values_list("requests", "input_tokens")
    assert (sum(r[0] for r in totals), sum(r[1] for r in totals)) == (4, 123)


# --- invoices and the console --------------------------------------------------------------


def test_each_tier_has_its_own_invoice_lines(org: Organization) -> None:
    usage(
        org, at(10, 3), input_tokens=4_000_000, output_tokens=3_000_000, requests=6,
        priority_requests=2, priority_input_tokens=1_000_000, priority_output_tokens=1_000_000,
        flex_requests=3, flex_input_tokens=2_000_000, flex_output_tokens=1_000_000,
    )  # fmt: skip

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert sorted(lines_of(invoice)) == sorted(
        [
            ("chat-small input tokens", 1_000_000, Decimal("1"), Decimal("1.00")),
            ("chat-small output tokens", 1_000_000, Decimal("2"), Decimal("2.00")),
            ("chat-small priority input tokens", 1_000_000, Decimal("2"), Decimal("2.00")),
            ("chat-small priority output tokens", 1_000_000, Decimal("4"), Decimal("4.00")),
            ("chat-small flex input tokens", 2_000_000, Decimal("0.5"), Decimal("1.00")),
            ("chat-small flex output tokens", 1_000_000, Decimal("1"), Decimal("1.00")),
        ]
    )
    assert invoice.subtotal == Decimal("11.00")


def test_the_consoles_usage_shows_each_tiers_tokens_and_cost(org: Organization) -> None:
    from datetime import date

    from console.selectors import usage_report

    usage(
        org, at(10, 3), input_tokens=3_000_000, output_tokens=0, requests=3,
        priority_requests=1, priority_input_tokens=1_000_000,
        flex_requests=1, flex_input_tokens=1_000_000,
    )  # fmt: skip

    report = usage_report(org, start=date(2026, 10, 1), end=date(2026, 10, 31), dimension="day")

    total = report.total
    assert (total.priority_requests, total.priority_tokens) == (1, 1_000_000)
    assert (total.flex_requests, total.flex_tokens) == (1, 1_000_000)
    assert (total.priority_cost, total.flex_cost) == (Decimal("2"), Decimal("0.5"))
    assert total.cost == Decimal("3.5")  # 1 online + 2 priority + 0.5 flex
