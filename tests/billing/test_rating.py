"""One rating path: what the console shows a month costs is what the invoice bills for it."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from accounts.models import Organization
from billing.backoffice.selectors import UsageFilter, usage_totals
from billing.invoicing import invoice_refresh_draft
from billing.pricing import PriceBook
from console.selectors import DIMENSIONS, usage_report
from tests.billing.factories import (
    CHAT,
    EMBED,
    OverrideFactory,
    PriceFactory,
    at,
    price_book,
    usage,
)
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

MILLION = Decimal(1_000_000)


@pytest.fixture
def org() -> Organization:
    """October 2026 under changing terms: CHAT lists at 1 (input) and 2 (output) per million
    and EMBED at 0.1; CHAT's input list price rises to 3 from the 15th; the organization
    pays a negotiated 1.5 for CHAT's output from the 10th and 20% off list prices from the
    20th (the rate wins over the discount)."""
    price_book(CHAT, input_price="1", output_price="2")
    price_book(EMBED, input_price="0.1", output_price="0")
    PriceFactory(
        model_name=CHAT, token_kind="input", unit_price=Decimal("3"), effective_from=at(10, 15)
    )
    org: Organization = OrganizationFactory()
    OverrideFactory(
        organization=org,
        kind="rate",
        model_name=CHAT,
        token_kind="output",
        unit_price=Decimal("1.5"),
        effective_from=at(10, 10),
    )
    OverrideFactory(
        organization=org, kind="discount", discount_percent=Decimal("20"), effective_from=at(10, 20)
    )
    return org


def october_usage(org: Organization) -> Decimal:
    """Usage on both sides of every change and at the month's end; returns October's money,
    each hour's tokens at the price in effect in it."""
    hours = [
        # (when, model, input tokens, input price, output tokens, output price)
        (at(10, 5, 9), CHAT, 1_000_000, Decimal("1"), 1_000_000, Decimal("2")),
        (at(10, 12, 9), CHAT, 1_000_000, Decimal("1"), 1_000_000, Decimal("1.5")),
        (at(10, 16, 9), CHAT, 1_000_000, Decimal("3"), 2_000_000, Decimal("1.5")),
        (at(10, 25, 9), CHAT, 1_000_000, Decimal("2.4"), 1_000_000, Decimal("1.5")),
        (at(10, 22, 9), EMBED, 10_000_000, Decimal("0.08"), 0, Decimal("0")),
        (at(10, 31, 23), CHAT, 3_000_000, Decimal("2.4"), 0, Decimal("1.5")),
    ]
    for when, model, tokens_in, _, tokens_out, _ in hours:
        usage(org, when, model=model, input_tokens=tokens_in, output_tokens=tokens_out)
    usage(org, at(11, 1, 0), input_tokens=5_000_000)  # November's: on neither
    return sum((i * pi / MILLION + o * po / MILLION for _, _, i, pi, o, po in hours), Decimal(0))


@pytest.mark.parametrize("dimension", DIMENSIONS)
def test_the_consoles_money_for_a_month_is_the_invoices_subtotal(
    org: Organization, dimension: str
) -> None:
    expected = october_usage(org)

    invoice = invoice_refresh_draft(org=org, month=at(10))
    report = usage_report(org, start=date(2026, 10, 1), end=date(2026, 10, 31), dimension=dimension)

    assert invoice is not None
    assert invoice.subtotal == expected == Decimal("23.40")
    assert report.total.cost == invoice.subtotal
    assert sum((row.cost for row in report.rows), Decimal(0)) == invoice.subtotal
    assert report.notes == []


def test_the_back_office_explorer_charges_the_invoices_subtotal(org: Organization) -> None:
    expected = october_usage(org)

    invoice = invoice_refresh_draft(org=org, month=at(10))
    totals = usage_totals(UsageFilter(start=at(10), end=at(11), organization_id=org.id))

    assert invoice is not None and invoice.subtotal == expected
    assert totals.charges == invoice.subtotal


def test_a_rating_charges_each_unit_at_the_price_of_its_hour(org: Organization) -> None:
    book = PriceBook.load(org.id)

    before, after = (
        book.rate(CHAT, at(10, day), [("input", 1_000_000), ("output", 0)]) for day in (14, 15)
    )
    unpriced = book.rate("nobody-prices-this", at(10, 15), [("input", 5), ("output", 7)])

    assert [(c.unit, c.quantity, c.amount) for c in before.charges] == [
        ("input", 1_000_000, Decimal("1"))
    ]
    assert after.amount == Decimal("3")
    assert unpriced.amount is None
    assert [(c.unit, c.quantity) for c in unpriced.unpriced] == [("input", 5), ("output", 7)]
