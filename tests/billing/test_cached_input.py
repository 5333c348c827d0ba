"""The cached_input unit: prompt tokens the prefix cache served, rated, invoiced and counted.

A text model with a `cached_input` price bills a rollup's input tokens in two parts (the
uncached ones at `input`, the cached ones at `cached_input`); without one, or with one above
the input price in effect, the cached tokens are input tokens, exactly as before the unit.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from accounts.models import Organization
from accounts.principal import Principal
from billing import spend, wallet_keys
from billing.invoicing import invoice_finalize, invoice_refresh_draft, month_spend
from billing.models import Invoice, InvoiceLine
from billing.pricing import PriceBook, billed_quantities
from billing.wallet import prices_compute, wallet_record_usage
from console.selectors import usage_report
from core.redis import get_redis
from tests.billing.factories import (
    CHAT,
    NO_TIER_TENSOR_UNITS,
    NO_TIER_TOKENS,
    OverrideFactory,
    PriceFactory,
    at,
    price_book,
    staff_principal,
    usage,
)
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def org() -> Organization:
    """CHAT lists at 1 (input) and 2 (output) per million; no cached price unless a test
    gives one."""
    price_book(CHAT, input_price="1", output_price="2")
    return OrganizationFactory()


@pytest.fixture
def staff() -> Principal:
    return staff_principal()


def cached_price(unit_price: str, **kwargs: object) -> None:
    PriceFactory(
        model_name=CHAT, token_kind="cached_input", unit_price=Decimal(unit_price), **kwargs
    )


def lines_of(invoice: Invoice) -> list[tuple[str, str, int, Decimal | None, Decimal]]:
    return [
        (line.kind, line.label, line.quantity, line.unit_price, line.amount)
        for line in invoice.lines.order_by("position")
    ]


# --- rating ---------------------------------------------------------------------------------


def test_a_rollups_input_is_split_into_uncached_and_cached_tokens() -> None:
    row = {"i": 1_000, "ci": 600, "o": 50, "r": 3, "c": 9}
    row |= {"bi": 0, "bci": 0, "bo": 0, "br": 0, "bc": 0}  # nothing of batch lines

    assert billed_quantities(row, "chat") == [
        ("input", 400),
        ("cached_input", 600),
        ("output", 50),
        *[("batch_input", 0), ("batch_cached_input", 0), ("batch_output", 0)],
        *NO_TIER_TOKENS,
    ]
    # A tensor model has no tokens: its units only.
    assert billed_quantities(row, "tensor") == [
        ("request", 3),
        ("compute_ms", 9),
        *[("batch_request", 0), ("batch_compute_ms", 0)],
        *NO_TIER_TENSOR_UNITS,
    ]


def test_cached_tokens_are_charged_at_the_cached_price(org: Organization) -> None:
    cached_price("0.25")
    book = PriceBook.load(org.id)

    rating = book.rate(CHAT, at(10, 5), [("input", 400), ("cached_input", 600), ("output", 50)])

    assert [(c.unit, c.quantity, c.price and c.price.unit_price) for c in rating.charges] == [
        ("input", 400, Decimal("1")),
        ("cached_input", 600, Decimal("0.25")),
        ("output", 50, Decimal("2")),
    ]
    assert rating.amount == Decimal("0.00065")  # (400 * 1 + 600 * 0.25 + 50 * 2) / 1M


@pytest.mark.parametrize(
    "terms",
    [
        "no cached price",
        "a cached price above the input price",
        "a contract rate on input below the cached list price",
        "a discount on input alone that takes it below the cached price",
    ],
)
def test_without_a_cached_price_that_applies_cached_tokens_are_input_tokens(
    org: Organization, terms: str
) -> None:
    if terms == "a cached price above the input price":
        cached_price("1.5")
    elif terms == "a contract rate on input below the cached list price":
        cached_price("0.5")
        OverrideFactory(
            organization=org, kind="rate", model_name=CHAT, token_kind="input",
            unit_price=Decimal("0.4"),
        )  # fmt: skip
    elif terms == "a discount on input alone that takes it below the cached price":
        cached_price("0.5")
        OverrideFactory(
            organization=org, kind="discount", model_name=CHAT, token_kind="input",
            discount_percent=Decimal("60"),
        )  # fmt: skip
    book = PriceBook.load(org.id)
    input_price = book.effective(CHAT, "input", at(10, 5))
    assert input_price is not None

    rating = book.rate(CHAT, at(10, 5), [("input", 400), ("cached_input", 600), ("output", 50)])

    # One input charge of every prompt token: a cached token never costs more than another.
    assert book.cached_input_price(CHAT, at(10, 5)) is None
    assert [(c.unit, c.quantity, c.price) for c in rating.charges] == [
        ("input", 1_000, input_price),
        ("output", 50, book.effective(CHAT, "output", at(10, 5))),
    ]


def test_an_old_price_book_invoices_exactly_as_if_nothing_was_cached(
    org: Organization,
) -> None:
    twin = OrganizationFactory()
    usage(org, at(10, 3), input_tokens=1_234_567, cached_input_tokens=1_000_000, output_tokens=7)
    usage(twin, at(10, 3), input_tokens=1_234_567, output_tokens=7)

    mine = invoice_refresh_draft(org=org, month=at(10))
    theirs = invoice_refresh_draft(org=twin, month=at(10))

    assert mine is not None and theirs is not None
    assert (
        lines_of(mine)
        == lines_of(theirs)
        == [
            ("usage", "chat-small input tokens", 1_234_567, Decimal("1"), Decimal("1.23")),
            ("usage", "chat-small output tokens", 7, Decimal("2"), Decimal("0.00")),
        ]
    )


def test_the_invoice_has_a_line_per_kind_each_rounded_once(org: Organization) -> None:
    cached_price("0.5")
    # 3,005,000 input tokens, 2,010,000 of them cached; 5,000 output tokens.
    usage(org, at(10, 3), input_tokens=2_000_000, cached_input_tokens=1_005_000)
    usage(
        org, at(10, 9), input_tokens=1_005_000, cached_input_tokens=1_005_000, output_tokens=5_000
    )

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == [
        # 995,000 at 1/M = 0.995 -> 1.00 (half-even, once, at the line)
        ("usage", "chat-small cached input tokens", 2_010_000, Decimal("0.5"), Decimal("1.00")),
        ("usage", "chat-small input tokens", 995_000, Decimal("1"), Decimal("1.00")),
        # 5,000 at 2/M = 0.01
        ("usage", "chat-small output tokens", 5_000, Decimal("2"), Decimal("0.01")),
    ]
    assert invoice.subtotal == Decimal("2.01")
    assert list(invoice.lines.values_list("token_kind", flat=True).order_by("position")) == [
        "cached_input",
        "input",
        "output",
    ]


def test_a_cached_price_from_mid_month_splits_the_input_at_its_hour(org: Organization) -> None:
    cached_price("0.25", effective_from=at(10, 15))
    usage(org, at(10, 14, 23), input_tokens=1_000_000, cached_input_tokens=600_000)
    usage(org, at(10, 15, 0), input_tokens=1_000_000, cached_input_tokens=600_000)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == [
        ("usage", "chat-small cached input tokens", 600_000, Decimal("0.25"), Decimal("0.15")),
        # before the 15th every input token at 1, after it the 400,000 uncached ones
        ("usage", "chat-small input tokens", 1_400_000, Decimal("1"), Decimal("1.40")),
    ]


def test_contract_terms_apply_to_cached_tokens(org: Organization) -> None:
    cached_price("0.5")
    other = OrganizationFactory()
    # A negotiated cached rate for one organization, 10% off everything for another.
    OverrideFactory(
        organization=org, kind="rate", model_name=CHAT, token_kind="cached_input",
        unit_price=Decimal("0.2"),
    )  # fmt: skip
    OverrideFactory(organization=other, kind="discount", discount_percent=Decimal("10"))
    for o in (org, other):
        usage(o, at(10, 3), input_tokens=2_000_000, cached_input_tokens=2_000_000)

    mine = invoice_refresh_draft(org=org, month=at(10))
    theirs = invoice_refresh_draft(org=other, month=at(10))

    assert mine is not None and theirs is not None
    assert lines_of(mine) == [
        ("usage", "chat-small cached input tokens", 2_000_000, Decimal("0.2"), Decimal("0.40"))
    ]
    assert lines_of(theirs) == [
        ("usage", "chat-small cached input tokens", 2_000_000, Decimal("0.45"), Decimal("0.90"))
    ]


def test_the_consoles_money_for_a_month_is_the_invoices_subtotal(org: Organization) -> None:
    cached_price("0.5", effective_from=at(10, 10))
    usage(org, at(10, 5), input_tokens=3_000_000, cached_input_tokens=2_000_000)
    usage(org, at(10, 12), input_tokens=3_000_000, cached_input_tokens=2_000_000, output_tokens=9)

    invoice = invoice_refresh_draft(org=org, month=at(10))
    report = usage_report(org, start=date(2026, 10, 1), end=date(2026, 10, 31), dimension="day")

    assert invoice is not None
    # 3M at 1 before the cached price, then 1M at 1 + 2M at 0.5, and 9 output tokens at 2
    assert invoice.subtotal == Decimal("5.00")
    assert report.total.cost == Decimal("5.000018")
    assert (report.total.input_tokens, report.total.cached_input_tokens) == (6_000_000, 4_000_000)
    assert month_spend(org, at(10), exact=True) == report.total.cost


# --- late usage and held usage ----------------------------------------------------------------


@pytest.mark.parametrize("with_cached_price", [True, False])
def test_late_usage_with_cached_tokens_is_billed_once(
    org: Organization, staff: Principal, with_cached_price: bool
) -> None:
    if with_cached_price:
        cached_price("0.5")
    usage(org, at(8, 3), input_tokens=1_000_000, cached_input_tokens=400_000)
    august = invoice_refresh_draft(org=org, month=at(8))
    assert august is not None
    invoice_finalize(principal=staff, invoice=august)
    usage(org, at(8, 4), input_tokens=1_000_000, cached_input_tokens=1_000_000, api_key_id="late")
    usage(org, at(9, 4), input_tokens=1_000_000)

    september = invoice_refresh_draft(org=org, month=at(9))
    assert september is not None
    invoice_finalize(principal=staff, invoice=september)
    october = invoice_refresh_draft(org=org, month=at(10))

    late = [(kind, label, qty) for kind, label, qty, _, _ in lines_of(september)[1:]]
    if with_cached_price:
        assert late == [
            ("adjustment", "adjustment: late usage for 2026-08: chat-small cached input tokens",
             1_000_000),
        ]  # fmt: skip
    else:
        assert late == [
            ("adjustment", "adjustment: late usage for 2026-08: chat-small input tokens",
             1_000_000),
        ]  # fmt: skip
    assert october is None  # nothing left to bill, nothing billed twice
    billed = InvoiceLine.objects.filter(invoice__organization=org).values_list(
        "quantity", flat=True
    )
    assert sum(billed) == 3_000_000  # every input token once, cached or not


def test_usage_nothing_prices_is_held_as_input_tokens() -> None:
    org = OrganizationFactory()
    usage(org, at(10, 3), model="no-price", input_tokens=1_000, cached_input_tokens=700)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == []
    assert list(invoice.held_usage.values_list("model_name", "token_kind", "quantity")) == [
        ("no-price", "input", 1_000)
    ]


# --- the wallet ---------------------------------------------------------------------------------


def test_the_price_hash_carries_the_cached_price_or_else_the_input_price(
    org: Organization,
) -> None:
    cached_price("0.25")
    other = OrganizationFactory()
    OverrideFactory(
        organization=other, kind="rate", model_name=CHAT, token_kind="input",
        unit_price=Decimal("0.2"),
    )  # fmt: skip

    # (No batch prices: batch lines cost the online ones.)
    # Priority at twice the online prices, flex at half (the default multipliers).
    assert prices_compute(org.id)[CHAT] == spend.Prices(
        "1000", "2000", "0", "0", "250", "1000", "2000", "0", "0", "250",
        "2000", "4000", "0", "0", "500", "500", "1000", "0", "0", "125",
    )  # fmt: skip
    # The contract's input rate is below the cached list price: cached tokens cost it too.
    assert prices_compute(other.id)[CHAT] == spend.Prices(
        "200", "2000", "0", "0", "200", "200", "2000", "0", "0", "200",
        "400", "4000", "0", "0", "400", "100", "1000", "0", "0", "100",
    )  # fmt: skip


def test_the_drain_counts_cached_tokens_at_the_cached_price(org: Organization) -> None:
    cached_price("0.25")

    cost = wallet_record_usage(
        organization_id=org.id,
        model_name=CHAT,
        input_tokens=1_000,
        cached_input_tokens=600,
        output_tokens=10,
        request_id="req_cached",
    )

    assert cost == 400 * 1000 + 600 * 250 + 10 * 2000
    assert get_redis().hget(wallet_keys.price_key(org.id, CHAT), "cin") == "250"


def test_prices_cost_takes_cached_tokens_as_part_of_the_input() -> None:
    prices = spend.Prices(input="150", output="600", cached_input="37.5")

    # 100 uncached * 150 + 3 cached * 37.5 = 15112.5 -> 15113 (up to a whole nano)
    assert prices.cost(input_tokens=103, cached_input_tokens=3) == 15_113
    assert prices.cost(input_tokens=103) == 103 * 150  # a caller that passes none
    # No cached price given (an older caller, or a hash without it): the input price.
    assert spend.Prices("150", "600").cost(input_tokens=103, cached_input_tokens=3) == 103 * 150
