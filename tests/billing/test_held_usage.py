"""Tensor usage on invoices, and unpriced usage held for the operator instead of blocking."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest

from accounts.models import AuditLog, Organization
from accounts.principal import Principal
from billing.backoffice.selectors import UsageFilter, dashboard, usage_csv, usage_totals
from billing.held_usage import held_usage_release, held_usage_write_off
from billing.invoicing import invoice_finalize, invoice_refresh_draft
from billing.models import HeldUsage, Invoice
from catalog.models import Model
from console.selectors import usage_report
from core.errors import Conflict
from tests.billing.factories import (
    CHAT,
    EMBED,
    CatalogModelFactory,
    PriceFactory,
    at,
    price_book,
    staff_principal,
    usage,
)
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

RANKER = "ranker-t"


@pytest.fixture
def org() -> Organization:
    price_book(CHAT, input_price="1", output_price="2")
    return OrganizationFactory()


@pytest.fixture
def staff() -> Principal:
    return staff_principal()


def lines_of(invoice: Invoice) -> list[tuple[str, str, int, Decimal | None, Decimal]]:
    return [
        (line.kind, line.label, line.quantity, line.unit_price, line.amount)
        for line in invoice.lines.order_by("position")
    ]


def held_of(invoice: Invoice) -> list[tuple[str, str, str, int, str]]:
    return [
        (str(h.usage_month), h.model_name, h.token_kind, h.quantity, h.status)
        for h in invoice.held_usage.order_by("model_name", "token_kind")
    ]


def test_tensor_usage_is_invoiced_per_request_and_compute_millisecond(org: Organization) -> None:
    CatalogModelFactory(name=RANKER, kind=Model.Kind.TENSOR)
    PriceFactory(model_name=RANKER, token_kind="request", unit_price=Decimal("100"))
    PriceFactory(model_name=RANKER, token_kind="compute_ms", unit_price=Decimal("3"))
    # Tensor rollups have no tokens; a text model's compute time is not billed on its own.
    usage(org, at(10, 3), model=RANKER, requests=20_000, compute_ms=1_500_000)
    usage(org, at(10, 4), input_tokens=1_000_000, requests=7, compute_ms=99_999)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == [
        ("usage", f"{CHAT} input tokens", 1_000_000, Decimal("1"), Decimal("1.00")),
        ("usage", f"{RANKER} compute milliseconds", 1_500_000, Decimal("3"), Decimal("4.50")),
        ("usage", f"{RANKER} requests", 20_000, Decimal("100"), Decimal("2.00")),
    ]
    assert invoice.subtotal == Decimal("7.50")
    assert held_of(invoice) == []


def test_a_tensor_model_priced_per_request_only_holds_its_compute(org: Organization) -> None:
    CatalogModelFactory(name=RANKER, kind=Model.Kind.TENSOR)
    PriceFactory(model_name=RANKER, token_kind="request", unit_price=Decimal("100"))
    usage(org, at(10, 3), model=RANKER, requests=10_000, compute_ms=40_000)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert [line[1] for line in lines_of(invoice)] == [f"{RANKER} requests"]
    assert held_of(invoice) == [("2026-10-01", RANKER, "compute_ms", 40_000, "held")]


def test_an_unpriced_line_is_held_and_the_rest_drafts_and_finalizes(
    org: Organization, staff: Principal
) -> None:
    usage(org, at(10, 3), input_tokens=2_000_000)
    usage(org, at(10, 5), model=EMBED, input_tokens=10, output_tokens=3)

    draft = invoice_refresh_draft(org=org, month=at(10))
    assert draft is not None
    # Refreshing a draft recomputes its held usage, never duplicates it.
    draft = invoice_refresh_draft(org=org, month=at(10))
    assert draft is not None
    finalized = invoice_finalize(principal=staff, invoice=draft)

    assert finalized.status == Invoice.Status.FINALIZED
    assert finalized.number
    assert lines_of(finalized) == [
        ("usage", f"{CHAT} input tokens", 2_000_000, Decimal("1"), Decimal("2.00"))
    ]
    assert finalized.total == Decimal("2.00")
    assert held_of(finalized) == [
        ("2026-10-01", EMBED, "input", 10, "held"),
        ("2026-10-01", EMBED, "output", 3, "held"),
    ]
    # The next month's invoice neither bills nor holds October's unpriced usage again.
    usage(org, at(11, 2), input_tokens=1_000_000)
    november = invoice_refresh_draft(org=org, month=at(11))
    assert november is not None
    assert [line[0] for line in lines_of(november)] == ["usage"]
    assert held_of(november) == []
    assert HeldUsage.objects.filter(organization=org).count() == 2


def test_late_unpriced_usage_of_an_issued_month_is_held_once_more(
    org: Organization, staff: Principal
) -> None:
    usage(org, at(10, 3), input_tokens=1_000_000)
    usage(org, at(10, 4), model=EMBED, input_tokens=5)
    october = invoice_refresh_draft(org=org, month=at(10))
    assert october is not None
    invoice_finalize(principal=staff, invoice=october)
    # Late usage of October (also unpriced) arrives after its invoice was issued.
    usage(org, at(10, 6), model=EMBED, input_tokens=4)

    november = invoice_refresh_draft(org=org, month=at(11))

    assert november is not None
    assert held_of(november) == [("2026-10-01", EMBED, "input", 4, "held")]


def test_released_held_usage_is_billed_once_on_the_next_invoice(
    org: Organization, staff: Principal
) -> None:
    usage(org, at(10, 3), input_tokens=1_000_000)
    usage(org, at(10, 5), model=EMBED, input_tokens=30_000)
    october = invoice_refresh_draft(org=org, month=at(10))
    assert october is not None
    october = invoice_finalize(principal=staff, invoice=october)
    [held] = october.held_usage.all()

    held_usage_release(principal=staff, held=held, unit_price="0.5", reason="priced late")
    usage(org, at(11, 2), input_tokens=1_000_000)
    november = invoice_refresh_draft(org=org, month=at(11))
    assert november is not None
    november = invoice_finalize(principal=staff, invoice=november)

    assert lines_of(november) == [
        ("usage", f"{CHAT} input tokens", 1_000_000, Decimal("1"), Decimal("1.00")),
        (
            "released",
            f"held usage released for 2026-10: {EMBED} input tokens",
            30_000,
            Decimal("0.5"),
            Decimal("0.02"),
        ),
    ]
    held.refresh_from_db()
    assert (held.status, held.billed_invoice_id) == ("billed", november.id)
    assert AuditLog.objects.filter(action="billing.held_usage_released").count() == 1
    usage(org, at(12, 2), input_tokens=1_000_000)
    december = invoice_refresh_draft(org=org, month=at(12))
    assert december is not None
    assert [line[0] for line in lines_of(december)] == ["usage"]


def test_written_off_usage_is_never_billed_and_is_decided_once(
    org: Organization, staff: Principal
) -> None:
    usage(org, at(10, 5), model=EMBED, input_tokens=30_000)
    october = invoice_refresh_draft(org=org, month=at(10))
    assert october is not None
    october = invoice_finalize(principal=staff, invoice=october)
    [held] = october.held_usage.all()

    held_usage_write_off(principal=staff, held=held, reason="model was a trial")

    with pytest.raises(Conflict):
        held_usage_release(principal=staff, held=held, unit_price="1", reason="too late")
    held.refresh_from_db()
    assert (held.status, held.unit_price) == ("written_off", None)
    usage(org, at(11, 2), input_tokens=1_000_000)
    november = invoice_refresh_draft(org=org, month=at(11))
    assert november is not None
    assert [line[0] for line in lines_of(november)] == ["usage"]


def test_held_usage_of_a_draft_cannot_be_decided_yet(org: Organization, staff: Principal) -> None:
    usage(org, at(10, 5), model=EMBED, input_tokens=30_000)
    draft = invoice_refresh_draft(org=org, month=at(10))
    assert draft is not None
    [held] = draft.held_usage.all()

    with pytest.raises(Conflict):
        held_usage_write_off(principal=staff, held=held, reason="too early")

    held.refresh_from_db()
    assert held.status == "held"
    assert not AuditLog.objects.filter(action="billing.held_usage_written_off").exists()


def test_every_rater_charges_tensor_usage_in_the_units_the_invoice_bills(
    org: Organization,
) -> None:
    """Invoice, back-office charges, CSV and dashboard, console usage: one rating path
    (billing.pricing.billed_quantities). A text model's compute time is in its token
    price, so a (mistaken) compute price on it is charged nowhere."""
    CatalogModelFactory(name=RANKER, kind=Model.Kind.TENSOR)
    PriceFactory(model_name=RANKER, token_kind="request", unit_price=Decimal("100"))
    PriceFactory(model_name=RANKER, token_kind="compute_ms", unit_price=Decimal("3"))
    PriceFactory(model_name=CHAT, token_kind="compute_ms", unit_price=Decimal("1000"))
    usage(org, at(10, 3), model=RANKER, requests=20_000, compute_ms=1_500_000)
    usage(org, at(10, 4), input_tokens=1_000_000, requests=7, compute_ms=99_999)
    expected = Decimal("7.50")  # 1.00 input tokens + 4.50 compute + 2.00 requests

    invoice = invoice_refresh_draft(org=org, month=at(10))
    assert invoice is not None and invoice.subtotal == expected

    f = UsageFilter(start=at(10), end=at(11), organization_id=org.id)
    assert usage_totals(f).charges == expected
    table = list(csv.DictReader(io.StringIO("".join(usage_csv(f)))))
    assert sum(Decimal(row["amount"]) for row in table) == expected
    assert "compute_ms" not in table[0]  # read for the amount, not a column of the export
    board = dashboard(now=at(10, 20), days=30)
    assert {m.model_name: m.revenue for m in board.models} == {
        CHAT: Decimal("1"),
        RANKER: Decimal("6.5"),
    }
    report = usage_report(org, start=at(10).date(), end=at(10, 30).date(), dimension="model")
    assert report.total.cost == expected
    assert report.notes == []
