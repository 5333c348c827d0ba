"""Invoice actions in the back office: each action in each state, idempotency, credit notes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from accounts.models import AuditLog
from billing.credit_notes import credit_note_issue
from billing.models import CreditLedgerEntry, CreditNote, Invoice
from core.errors import Conflict, InvalidInput
from tests.backoffice.support import Staff, client_for, invoice_in
from tests.billing.factories import staff_principal

pytestmark = pytest.mark.django_db

PARAMS: dict[str, dict[str, str]] = {
    "finalize": {"reason": "month closed early for the audit"},
    "mark-paid": {"payment_reference": "BANK-77", "reason": "transfer on statement 12"},
    "void": {"reason": "billed the wrong entity"},
    "credit-note": {"amount": "1.25", "reason": "two hours of outage"},
}
AUDIT_ACTION = {
    "finalize": "billing.invoice_finalized",
    "mark-paid": "billing.invoice_paid",
    "void": "billing.invoice_voided",
    "credit-note": "billing.credit_note_issued",
}

# (action, state the invoice is in, HTTP status, state after, whether anything was written)
MATRIX = [
    ("finalize", "draft", 302, "finalized", True),
    ("finalize", "finalized", 302, "finalized", False),
    ("finalize", "paid", 409, "paid", False),
    ("finalize", "void", 409, "void", False),
    ("mark-paid", "draft", 409, "draft", False),
    ("mark-paid", "finalized", 302, "paid", True),
    ("mark-paid", "paid", 409, "paid", False),  # paid as TRF-1: BANK-77 is not a repeat
    ("mark-paid", "void", 409, "void", False),
    ("void", "draft", 409, "draft", False),
    ("void", "finalized", 302, "void", True),
    ("void", "paid", 409, "paid", False),
    ("void", "void", 302, "void", False),
    ("credit-note", "draft", 409, "draft", False),
    ("credit-note", "finalized", 302, "finalized", True),
    ("credit-note", "paid", 302, "paid", True),
    ("credit-note", "void", 409, "void", False),
]


def action_url(inv: Invoice, action: str) -> str:
    return reverse("admin:backoffice-invoice-action", args=[inv.id, action])


def post(client: Client, inv: Invoice, action: str, key: str = "tok-00000001", **extra: str) -> Any:
    return client.post(action_url(inv, action), {**PARAMS[action], "form_token": key, **extra})


def snapshot(inv: Invoice) -> tuple[Any, ...]:
    row = Invoice.objects.get(pk=inv.pk)
    return (
        row.status,
        row.number,
        row.total,
        row.credits_applied,
        row.payment_reference,
        row.paid_at,
        row.voided_at,
        list(row.lines.values_list("label", "quantity", "amount")),
        AuditLog.objects.count(),
        CreditLedgerEntry.objects.count(),
        CreditNote.objects.count(),
    )


def flash(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


@pytest.mark.parametrize(("action", "state", "status", "after", "writes"), MATRIX)
def test_each_invoice_action_in_each_state(
    staff: Staff, action: str, state: str, status: int, after: str, writes: bool
) -> None:
    inv = invoice_in(state)
    before = snapshot(inv)
    last_audit = AuditLog.objects.order_by("-id").values_list("id", flat=True).first() or 0

    response = post(client_for(staff.billing_admin), inv, action)

    assert response.status_code == status
    assert Invoice.objects.get(pk=inv.pk).status == after
    if not writes:
        assert snapshot(inv) == before
        if status == 409:
            assert "cannot" in response.content.decode()
        return
    entry = AuditLog.objects.get(action=AUDIT_ACTION[action], id__gt=last_audit)
    assert entry.actor_user_id == staff.billing_admin.id
    assert entry.actor_label == staff.billing_admin.email
    assert entry.metadata["reason"] == PARAMS[action]["reason"]
    assert entry.organization_id == inv.organization_id


def test_finalize_numbers_the_invoice_and_says_so(staff: Staff) -> None:
    inv = invoice_in("draft")

    response = post(client_for(staff.billing_admin), inv, "finalize")

    row = Invoice.objects.get(pk=inv.pk)
    assert row.number is not None and row.number.startswith("MAN-")
    assert row.total == Decimal("3.00")
    assert flash(response) == [f"invoice finalized as {row.number}, total 3.00"]


def test_mark_paid_records_the_reference(staff: Staff) -> None:
    inv = invoice_in("finalized")

    post(client_for(staff.billing_admin), inv, "mark-paid")

    row = Invoice.objects.get(pk=inv.pk)
    assert (row.status, row.payment_reference) == ("paid", "BANK-77")
    entry = AuditLog.objects.get(action="billing.invoice_paid")
    assert entry.metadata["payment_reference"] == "BANK-77"


def test_resubmitting_the_same_form_acts_once(staff: Staff) -> None:
    inv = invoice_in("finalized")
    client = client_for(staff.billing_admin)

    first = post(client, inv, "mark-paid", key="same-token-1")
    second = post(client, inv, "mark-paid", key="same-token-1")

    assert (first.status_code, second.status_code) == (302, 302)
    # Messages pile up until a page shows them: the first action's, then the repeat's.
    assert flash(second) == [
        f"invoice {inv.number} marked paid (BANK-77)",
        "This form was already submitted; nothing was repeated.",
    ]
    assert AuditLog.objects.filter(action="billing.invoice_paid").count() == 1


def test_marking_paid_again_with_the_same_reference_is_a_no_op(staff: Staff) -> None:
    inv = invoice_in("finalized")
    client = client_for(staff.billing_admin)
    post(client, inv, "mark-paid", key="first-token")
    before = snapshot(inv)

    again = post(client, inv, "mark-paid", key="second-token")

    assert again.status_code == 302
    assert flash(again)[-1] == f"invoice {inv.number} was already paid (BANK-77)"
    assert snapshot(inv) == before


def test_finalizing_again_is_a_no_op(staff: Staff) -> None:
    inv = invoice_in("finalized")
    before = snapshot(inv)

    again = post(client_for(staff.billing_admin), inv, "finalize")

    assert flash(again) == [f"invoice {inv.number} was already finalized"]
    assert snapshot(inv) == before


def test_an_empty_reason_is_refused_and_nothing_changes(staff: Staff) -> None:
    inv = invoice_in("finalized")
    before = snapshot(inv)

    response = post(client_for(staff.billing_admin), inv, "void", reason="   ")

    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    assert snapshot(inv) == before


def test_an_empty_payment_reference_is_refused(staff: Staff) -> None:
    inv = invoice_in("finalized")
    before = snapshot(inv)

    response = post(client_for(staff.billing_admin), inv, "mark-paid", payment_reference="")

    assert response.status_code == 400
    assert snapshot(inv) == before


# --- Credit notes ---------------------------------------------------------------------------


def test_a_credit_note_is_numbered_and_becomes_credit(staff: Staff) -> None:
    inv = invoice_in("paid")

    response = post(client_for(staff.billing_admin), inv, "credit-note")

    note = CreditNote.objects.get(invoice=inv)
    assert note.number.startswith("CN-") and note.number.endswith("-000001")
    assert (note.amount, note.created_by_id, note.reason) == (
        Decimal("1.25"),
        staff.billing_admin.id,
        "two hours of outage",
    )
    entry = note.ledger_entry
    assert (entry.kind, entry.amount, entry.reference, entry.grant_id) == (
        "credit_note",
        Decimal("1.25"),
        inv.id,
        None,
    )
    assert flash(response) == [f"credit note {note.number} issued: 1.25 USD"]
    audit = AuditLog.objects.get(action="billing.credit_note_issued")
    assert audit.metadata["invoice_number"] == inv.number
    assert audit.metadata["amount"] == "1.25"


def test_a_double_submitted_credit_note_is_issued_once(staff: Staff) -> None:
    inv = invoice_in("finalized")
    client = client_for(staff.billing_admin)

    post(client, inv, "credit-note", key="note-token-1")
    post(client, inv, "credit-note", key="note-token-1")

    assert CreditNote.objects.filter(invoice=inv).count() == 1


def test_credit_note_service_is_idempotent_on_its_key(staff: Staff) -> None:
    inv = invoice_in("paid")
    actor = staff_principal()

    first = credit_note_issue(
        principal=actor, invoice=inv, amount="2.00", reason="outage", idempotency_key="key-abcdefgh"
    )
    again = credit_note_issue(
        principal=actor, invoice=inv, amount="2.00", reason="outage", idempotency_key="key-abcdefgh"
    )

    assert again.pk == first.pk
    assert CreditNote.objects.count() == 1
    assert CreditLedgerEntry.objects.filter(kind="credit_note").count() == 1
    with pytest.raises(Conflict, match="already used for credit note"):
        credit_note_issue(
            principal=actor, invoice=inv, amount="1.00", reason="x", idempotency_key="key-abcdefgh"
        )


def test_credit_notes_cannot_give_back_more_than_was_billed(staff: Staff) -> None:
    inv = invoice_in("paid")  # subtotal 3.00
    client = client_for(staff.billing_admin)
    post(client, inv, "credit-note", key="note-token-a", amount="2.50")
    before = snapshot(inv)

    response = post(client, inv, "credit-note", key="note-token-b", amount="0.51")

    assert response.status_code == 400
    assert "amount must be at most 0.50" in response.content.decode()
    assert snapshot(inv) == before


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("0", "amount must be positive"),
        ("-1", "amount must be positive"),
        ("1.001", "amount may have at most 2 decimal places"),
        ("lots", "amount must be a decimal number"),
    ],
)
def test_bad_credit_note_amounts_are_refused(staff: Staff, amount: str, message: str) -> None:
    inv = invoice_in("paid")
    before = snapshot(inv)

    response = post(client_for(staff.billing_admin), inv, "credit-note", amount=amount)

    assert response.status_code == 400
    assert message in response.content.decode()
    assert snapshot(inv) == before


def test_an_invoice_with_a_credit_note_cannot_be_voided(staff: Staff) -> None:
    inv = invoice_in("finalized")
    client = client_for(staff.billing_admin)
    post(client, inv, "credit-note", key="note-token-c")
    before = snapshot(inv)

    response = post(client, inv, "void", key="void-token-1")

    assert response.status_code == 409
    assert "cannot void an invoice that has credit notes" in response.content.decode()
    assert snapshot(inv) == before


def test_a_credit_note_needs_a_key_of_a_sane_shape(staff: Staff) -> None:
    inv = invoice_in("paid")
    with pytest.raises(InvalidInput, match="idempotency_key"):
        credit_note_issue(
            principal=staff_principal(),
            invoice=inv,
            amount="1",
            reason="x",
            idempotency_key="short",
        )
    assert CreditNote.objects.count() == 0


def test_the_next_invoice_consumes_a_credit_note(staff: Staff) -> None:
    inv = invoice_in("paid")
    credit_note_issue(
        principal=staff_principal(),
        invoice=inv,
        amount="1.25",
        reason="outage",
        idempotency_key="key-consume1",
    )
    from billing.credits import credit_available

    assert credit_available(inv.organization) == Decimal("1.25")


# --- Pages and ids ----------------------------------------------------------------------------


def test_the_invoice_page_lists_lines_and_allowed_actions(staff: Staff) -> None:
    inv = invoice_in("finalized")

    body = (
        client_for(staff.billing_admin)
        .get(reverse("admin:backoffice-invoice", args=[inv.id]))
        .content.decode()
    )

    assert "chat-small input tokens" in body and "chat-small output tokens" in body
    for action in ("mark-paid", "void", "credit-note"):
        assert action_url(inv, action) in body
    assert action_url(inv, "finalize") not in body


def test_support_sees_the_invoice_but_no_actions(staff: Staff) -> None:
    inv = invoice_in("finalized")

    body = (
        client_for(staff.support)
        .get(reverse("admin:backoffice-invoice", args=[inv.id]))
        .content.decode()
    )

    assert inv.number in body
    assert action_url(inv, "void") not in body


@pytest.mark.parametrize(
    "url",
    [
        reverse("admin:backoffice-invoice", args=["inv_doesnotexist"]),
        reverse("admin:backoffice-invoice-action", args=["inv_doesnotexist", "void"]),
    ],
)
def test_unknown_invoices_are_404(staff: Staff, url: str) -> None:
    assert client_for(staff.billing_admin).get(url).status_code == 404


def test_an_unknown_action_is_404(staff: Staff) -> None:
    inv = invoice_in("finalized")
    response = client_for(staff.billing_admin).post(
        action_url(inv, "refund"), {"form_token": "t" * 10}
    )
    assert response.status_code == 404


def test_the_invoice_list_filters_by_status(staff: Staff) -> None:
    paid = invoice_in("paid")
    draft = invoice_in("draft")
    url = reverse("admin:billing_invoice_changelist")

    body = client_for(staff.support).get(url, {"status__exact": "paid"}).content.decode()

    assert paid.number in body
    assert draft.id not in body
