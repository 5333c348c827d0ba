"""Rating rollups into invoice lines; drafts, finalization, numbering, the state machine."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.models import AuditLog, Organization
from accounts.principal import Principal
from billing import invoicing
from billing.credits import credit_balance
from billing.invoicing import (
    invoice_finalize,
    invoice_mark_paid,
    invoice_refresh_draft,
    invoice_void,
)
from billing.models import CreditLedgerEntry, Invoice, InvoiceLine, InvoiceNumberSequence
from billing.money import line_amount
from billing.pricing import Unpriced
from core.errors import Conflict, PermissionDenied
from tests.billing.factories import (
    CHAT,
    EMBED,
    GrantFactory,
    OverrideFactory,
    PriceFactory,
    at,
    price_book,
    staff_principal,
    usage,
)
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

Status = Invoice.Status


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


# --- rating -------------------------------------------------------------------------------


def test_price_change_mid_month_splits_the_quantity_at_the_effective_hour(
    org: Organization,
) -> None:
    PriceFactory(
        model_name=CHAT, token_kind="input", unit_price=Decimal("3"), effective_from=at(10, 15)
    )
    usage(org, at(10, 14, 23), input_tokens=1_000_000, output_tokens=500_000)
    usage(org, at(10, 15, 0), input_tokens=2_000_000)
    usage(org, at(10, 20, 5), input_tokens=1_000_000)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == [
        (
            "usage",
            "chat-small input tokens from 2026-10-14 23:00 UTC",
            1_000_000,
            Decimal("1"),
            Decimal("1.00"),
        ),
        (
            "usage",
            "chat-small input tokens from 2026-10-15 00:00 UTC",
            3_000_000,
            Decimal("3"),
            Decimal("9.00"),
        ),
        ("usage", "chat-small output tokens", 500_000, Decimal("2"), Decimal("1.00")),
    ]
    assert (invoice.subtotal, invoice.total, invoice.status) == (
        Decimal("11.00"),
        Decimal("11.00"),
        "draft",
    )


def test_price_change_at_a_month_boundary_belongs_to_the_new_month(org: Organization) -> None:
    PriceFactory(
        model_name=CHAT, token_kind="input", unit_price=Decimal("5"), effective_from=at(10)
    )
    usage(org, at(9, 30, 23), input_tokens=1_000_000)
    usage(org, at(10, 1, 0), input_tokens=1_000_000)

    september = invoice_refresh_draft(org=org, month=at(9))
    october = invoice_refresh_draft(org=org, month=at(10))

    assert september is not None and october is not None
    assert lines_of(september) == [
        ("usage", "chat-small input tokens", 1_000_000, Decimal("1"), Decimal("1.00"))
    ]
    assert lines_of(october) == [
        ("usage", "chat-small input tokens", 1_000_000, Decimal("5"), Decimal("5.00"))
    ]


@pytest.mark.parametrize(
    ("quantity", "unit_price", "expected"),
    [
        (5_000, "1", "0.00"),  # 0.005: an exact half rounds to the even cent
        (15_000, "1", "0.02"),  # 0.015 -> 0.02 (even)
        (25_000, "1", "0.02"),  # 0.025 -> 0.02 (even)
        (35_000, "1", "0.04"),  # 0.035 -> 0.04 (even)
        (5_001, "1", "0.01"),  # above the half: up
        (1, "0.000000001", "0.00"),
        (123_456_789, "0.15", "18.52"),  # 18.518518...
        (9_223_372_036_854_775_807, "60", "553402322211286.55"),  # the largest 64-bit count
    ],
)
def test_line_amount_rounds_once_half_even(quantity: int, unit_price: str, expected: str) -> None:
    assert line_amount(quantity, Decimal(unit_price)) == Decimal(expected)


def test_totals_are_sums_of_rounded_lines(org: Organization) -> None:
    # Each line is exactly half a cent: each rounds to 0.00, though together they are 0.01.
    usage(org, at(10, 3), input_tokens=5_000, output_tokens=2_500)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert [line.amount for line in invoice.lines.all()] == [Decimal("0.00"), Decimal("0.00")]
    assert invoice.subtotal == Decimal("0.00")


def test_organization_rate_and_discount_apply_on_the_invoice(org: Organization) -> None:
    OverrideFactory(
        organization=org,
        kind="rate",
        model_name=CHAT,
        token_kind="input",
        unit_price=Decimal("0.5"),
    )
    OverrideFactory(organization=org, kind="discount", discount_percent=Decimal("25"))
    usage(org, at(10, 3), input_tokens=2_000_000, output_tokens=2_000_000)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert [(line.unit_price, line.amount) for line in invoice.lines.all()] == [
        (Decimal("0.5"), Decimal("1.00")),  # the negotiated rate, no discount on top
        (Decimal("1.5"), Decimal("3.00")),  # 25% off the list price of 2
    ]


def test_commit_tiers_discount_the_spend_above_each_threshold(org: Organization) -> None:
    OverrideFactory(
        organization=org,
        kind="commit_tier",
        threshold=Decimal("100"),
        discount_percent=Decimal("10"),
    )
    OverrideFactory(
        organization=org,
        kind="commit_tier",
        threshold=Decimal("1000"),
        discount_percent=Decimal("20"),
    )
    usage(org, at(10, 3), input_tokens=1_500_000_000)  # 1500.00 at 1 per million

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    discount = invoice.lines.get(kind="discount")
    # 10% of (1000 - 100) + 20% of (1500 - 1000)
    assert discount.amount == Decimal("-190.00")
    assert discount.label == "committed-spend discount (10.00% above 100.00, 20.00% above 1000.00)"
    assert invoice.subtotal == Decimal("1310.00")


def test_usage_of_an_unpriced_model_alone_makes_a_draft_that_only_holds_it(
    org: Organization,
) -> None:
    # Formerly refused (Unpriced) with no invoice at all; now held for the operator,
    # billed at nothing (tests/billing/test_held_usage.py has the whole story).
    usage(org, at(10, 3), model=EMBED, input_tokens=10)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert lines_of(invoice) == []
    assert invoice.subtotal == Decimal("0.00")
    assert list(
        invoice.held_usage.values_list("model_name", "token_kind", "quantity", "status")
    ) == [(EMBED, "input", 10, "held")]


def test_usage_of_other_organizations_is_not_billed(org: Organization) -> None:
    other = OrganizationFactory()
    usage(other, at(10, 3), input_tokens=1_000_000)
    usage(org, at(10, 3), input_tokens=2_000_000)

    invoice = invoice_refresh_draft(org=org, month=at(10))

    assert invoice is not None
    assert invoice.subtotal == Decimal("2.00")


# --- drafts -------------------------------------------------------------------------------


def test_draft_is_recomputed_as_usage_arrives(org: Organization) -> None:
    assert invoice_refresh_draft(org=org, month=at(10)) is None  # nothing to bill yet
    usage(org, at(10, 3), input_tokens=1_000_000)
    first = invoice_refresh_draft(org=org, month=at(10))
    usage(org, at(10, 4), input_tokens=1_000_000, output_tokens=1_000_000)

    second = invoice_refresh_draft(org=org, month=at(10))

    assert first is not None and second is not None
    assert second.id == first.id
    assert (second.subtotal, second.lines.count()) == (Decimal("4.00"), 2)
    assert Invoice.objects.filter(organization=org).count() == 1


# --- finalization ---------------------------------------------------------------------------


def test_finalize_freezes_applies_credits_and_numbers(org: Organization, staff: Principal) -> None:
    GrantFactory(organization=org, amount=Decimal("3.00"))
    usage(org, at(9, 3), input_tokens=5_000_000)
    draft = invoice_refresh_draft(org=org, month=at(9))
    assert draft is not None

    invoice = invoice_finalize(principal=staff, invoice=draft)

    year = timezone.now().year
    assert invoice.number == f"MAN-{year}-000001"
    assert (invoice.status, invoice.subtotal, invoice.credits_applied, invoice.total) == (
        "finalized",
        Decimal("5.00"),
        Decimal("3.00"),
        Decimal("2.00"),
    )
    assert credit_balance(org) == Decimal("0")
    consumption = CreditLedgerEntry.objects.get(organization=org, kind="consumption")
    assert (consumption.amount, consumption.reference) == (Decimal("-3.00"), invoice.id)
    audit = AuditLog.objects.get(action="billing.invoice_finalized", target_id=invoice.id)
    assert audit.metadata["total"] == "2.00"
    assert audit.actor_user == staff.user


def test_fully_covered_invoice_is_settled_at_finalization(
    org: Organization, staff: Principal
) -> None:
    GrantFactory(organization=org, amount=Decimal("50.00"))
    usage(org, at(9, 3), input_tokens=5_000_000)
    draft = invoice_refresh_draft(org=org, month=at(9))
    assert draft is not None

    invoice = invoice_finalize(principal=staff, invoice=draft)

    assert (invoice.status, invoice.total, invoice.credits_applied) == (
        "paid",
        Decimal("0.00"),
        Decimal("5.00"),
    )
    assert credit_balance(org) == Decimal("45.00")


def test_invoice_numbers_are_a_gap_free_sequence_per_year(
    staff: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    price_book(CHAT)
    orgs = [OrganizationFactory() for _ in range(3)]
    for org in orgs:
        usage(org, at(9, 3), input_tokens=1_000_000)
    drafts = [invoice_refresh_draft(org=org, month=at(9)) for org in orgs]
    # A finalization that fails after taking its number (here: applying credits crashes)
    # takes no number. (Unpriced usage no longer fails one: it is held.)
    apply_credits = invoicing.credits_apply_to_invoice

    def crash_for_second(*, org: Organization, **kwargs: object) -> Decimal:
        if org.id == orgs[1].id:
            raise Unpriced("simulated failure after numbering")
        return apply_credits(org=org, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(invoicing, "credits_apply_to_invoice", crash_for_second)

    numbers = []
    for draft in drafts:
        assert draft is not None
        try:
            numbers.append(invoice_finalize(principal=staff, invoice=draft).number)
        except Unpriced:
            numbers.append(None)

    year = timezone.now().year
    assert numbers == [f"MAN-{year}-000001", None, f"MAN-{year}-000002"]
    assert InvoiceNumberSequence.objects.get(year=year).last_number == 2
    assert Invoice.objects.get(id=drafts[1].id).status == "draft"  # type: ignore[union-attr]
    assert not CreditLedgerEntry.objects.filter(kind="consumption").exists()


def test_a_month_that_has_not_ended_cannot_be_finalized(
    org: Organization, staff: Principal
) -> None:
    now = timezone.now()
    usage(org, now.replace(minute=0, second=0, microsecond=0), input_tokens=1_000)
    draft = invoice_refresh_draft(org=org, month=now)
    assert draft is not None

    with pytest.raises(Conflict):
        invoice_finalize(principal=staff, invoice=draft)

    draft.refresh_from_db()
    assert (draft.status, draft.number) == ("draft", None)


def test_customers_and_keys_cannot_finalize(org: Organization) -> None:
    from tests.factories import UserFactory

    usage(org, at(9, 3), input_tokens=1_000_000)
    draft = invoice_refresh_draft(org=org, month=at(9))
    assert draft is not None

    with pytest.raises(PermissionDenied):
        invoice_finalize(principal=Principal(user=UserFactory()), invoice=draft)

    draft.refresh_from_db()
    assert draft.status == "draft"
    assert not AuditLog.objects.filter(action="billing.invoice_finalized").exists()


# --- the state machine ------------------------------------------------------------------------


def _in_state(org: Organization, staff: Principal, state: str) -> Invoice:
    usage(org, at(9, 3), input_tokens=1_000_000)
    invoice = invoice_refresh_draft(org=org, month=at(9))
    assert invoice is not None
    if state == Status.DRAFT:
        return invoice
    invoice = invoice_finalize(principal=staff, invoice=invoice)
    if state == Status.PAID:
        invoice = invoice_mark_paid(
            principal=staff, invoice=invoice, payment_reference="wire 42", reason="bank statement"
        )
    elif state == Status.VOID:
        invoice = invoice_void(principal=staff, invoice=invoice, reason="duplicate")
    assert invoice.status == state
    return invoice


ACTIONS: dict[str, Callable[[Invoice, Principal], object]] = {
    "refresh": lambda inv, p: invoice_refresh_draft(org=inv.organization, month=inv.period_start),
    "finalize": lambda inv, p: invoice_finalize(principal=p, invoice=inv),
    "mark_paid": lambda inv, p: invoice_mark_paid(
        principal=p, invoice=inv, payment_reference="wire 43", reason="statement"
    ),
    "void": lambda inv, p: invoice_void(principal=p, invoice=inv, reason="write off"),
}

# state -> action -> the state after it, or None: refused with the state unchanged.
TRANSITIONS = {
    "draft": {"refresh": "draft", "finalize": "finalized", "mark_paid": None, "void": None},
    "finalized": {"refresh": None, "finalize": None, "mark_paid": "paid", "void": "void"},
    "paid": {"refresh": None, "finalize": None, "mark_paid": None, "void": None},
    "void": {"refresh": None, "finalize": None, "mark_paid": None, "void": None},
}


@pytest.mark.parametrize(
    ("state", "action", "after"),
    [(s, a, after) for s, row in TRANSITIONS.items() for a, after in row.items()],
)
def test_each_action_in_each_state(
    org: Organization, staff: Principal, state: str, action: str, after: str | None
) -> None:
    invoice = _in_state(org, staff, state)
    before = (
        Invoice.objects.filter(pk=invoice.pk).values().get(),
        lines_of(invoice),
        AuditLog.objects.count(),
        list(CreditLedgerEntry.objects.values_list("id", flat=True)),
    )

    if after is None:
        with pytest.raises(Conflict) as raised:
            ACTIONS[action](invoice, staff)
        assert state in raised.value.message
        after_refused = (
            Invoice.objects.filter(pk=invoice.pk).values().get(),
            lines_of(invoice),
            AuditLog.objects.count(),
            list(CreditLedgerEntry.objects.values_list("id", flat=True)),
        )
        assert after_refused == before
    else:
        ACTIONS[action](invoice, staff)
        invoice.refresh_from_db()
        assert invoice.status == after


def test_finalized_invoice_is_immutable(org: Organization, staff: Principal) -> None:
    invoice = _in_state(org, staff, Status.FINALIZED)
    frozen = (lines_of(invoice), invoice.subtotal, invoice.total, invoice.number)
    # More usage for its month, and a new price, arrive afterwards.
    usage(org, at(9, 20), input_tokens=7_000_000)
    PriceFactory(
        model_name=CHAT, token_kind="input", unit_price=Decimal("9"), effective_from=at(9, 10)
    )

    with pytest.raises(Conflict):
        invoice_refresh_draft(org=org, month=at(9))

    invoice.refresh_from_db()
    assert (lines_of(invoice), invoice.subtotal, invoice.total, invoice.number) == frozen


def test_void_gives_the_consumed_credits_back(org: Organization, staff: Principal) -> None:
    grant = GrantFactory(organization=org, amount=Decimal("0.40"))
    invoice = _in_state(org, staff, Status.FINALIZED)
    assert credit_balance(org) == Decimal("0")

    invoice_void(principal=staff, invoice=invoice, reason="billing error")

    assert credit_balance(org) == Decimal("0.40")
    back = CreditLedgerEntry.objects.get(kind="adjustment")
    assert (back.amount, back.grant_id, back.reference) == (Decimal("0.40"), grant.id, invoice.id)


# --- late usage ---------------------------------------------------------------------------------


def test_late_usage_lands_on_the_next_invoice_as_a_labelled_adjustment(
    org: Organization, staff: Principal
) -> None:
    PriceFactory(
        model_name=CHAT, token_kind="input", unit_price=Decimal("4"), effective_from=at(8, 16)
    )
    usage(org, at(8, 3), input_tokens=1_000_000)
    august = invoice_refresh_draft(org=org, month=at(8))
    assert august is not None
    august = invoice_finalize(principal=staff, invoice=august)
    # After finalization the drain brings more August usage, on both sides of the price change,
    # and some September usage.
    usage(org, at(8, 3), input_tokens=500_000, api_key_id="key_late")
    usage(org, at(8, 30), input_tokens=250_000)
    usage(org, at(9, 2), input_tokens=2_000_000)

    september = invoice_refresh_draft(org=org, month=at(9))

    assert september is not None
    assert lines_of(september) == [
        ("usage", "chat-small input tokens", 2_000_000, Decimal("4"), Decimal("8.00")),
        (
            "adjustment",
            "adjustment: late usage for 2026-08: chat-small input tokens from 2026-08-03 00:00 UTC",
            500_000,
            Decimal("1"),
            Decimal("0.50"),
        ),
        (
            "adjustment",
            "adjustment: late usage for 2026-08: chat-small input tokens from 2026-08-30 00:00 UTC",
            250_000,
            Decimal("4"),
            Decimal("1.00"),
        ),
    ]
    august.refresh_from_db()
    assert august.subtotal == Decimal("1.00")


def test_late_usage_is_billed_once(org: Organization, staff: Principal) -> None:
    usage(org, at(8, 3), input_tokens=1_000_000)
    august = invoice_refresh_draft(org=org, month=at(8))
    assert august is not None
    invoice_finalize(principal=staff, invoice=august)
    usage(org, at(8, 4), input_tokens=3_000_000)
    usage(org, at(9, 4), input_tokens=1_000_000)
    september = invoice_refresh_draft(org=org, month=at(9))
    assert september is not None
    invoice_finalize(principal=staff, invoice=september)
    usage(org, at(10, 4), input_tokens=1_000_000)

    october = invoice_refresh_draft(org=org, month=at(10))

    assert october is not None
    assert [line.kind for line in october.lines.all()] == ["usage"]
    billed = sum(
        InvoiceLine.objects.filter(
            invoice__organization=org, kind__in=["usage", "adjustment"]
        ).values_list("quantity", flat=True)
    )
    assert billed == 6_000_000


def test_late_usage_of_a_month_that_still_has_a_draft_stays_on_that_draft(
    org: Organization,
) -> None:
    usage(org, at(8, 3), input_tokens=1_000_000)
    invoice_refresh_draft(org=org, month=at(8))
    usage(org, at(8, 4), input_tokens=1_000_000)
    usage(org, at(9, 4), input_tokens=1_000_000)

    september = invoice_refresh_draft(org=org, month=at(9))
    august = invoice_refresh_draft(org=org, month=at(8))

    assert september is not None and august is not None
    assert [line.kind for line in september.lines.all()] == ["usage"]
    assert august.subtotal == Decimal("2.00")


def test_finalize_due_drafts_and_finalizes_ended_months(org: Organization) -> None:
    usage(org, at(9, 3), input_tokens=1_000_000)
    now = datetime(2026, 10, 1, 7, tzinfo=UTC)  # past the 6-hour grace after September

    finalized = invoicing.invoices_finalize_due(now=now)

    assert [(inv.organization_id, inv.status, inv.total) for inv in finalized] == [
        (org.id, "finalized", Decimal("1.00"))
    ]
    assert invoicing.invoices_finalize_due(now=now) == []  # idempotent
