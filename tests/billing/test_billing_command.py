"""`manage.py billing`: staff money actions through their services, refused cleanly."""

from __future__ import annotations

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from accounts.models import AuditLog, Organization
from billing.credits import credit_balance
from billing.invoicing import invoice_refresh_draft
from billing.models import BillingAccount, CreditLedgerEntry
from billing.wallet import wallet_read
from tests.billing.factories import CHAT, at, price_book, staff_principal, usage
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def org() -> Organization:
    price_book(CHAT)
    return OrganizationFactory()


def run(*args: str) -> str:
    out = StringIO()
    call_command("billing", *args, stdout=out)
    return out.getvalue()


def test_grant_credit_and_set_prepaid(org: Organization) -> None:
    staff = staff_principal().user
    assert staff is not None

    said = run(
        "credit-grant",
        "--actor",
        staff.email,
        "--org",
        org.id,
        "--kind",
        "prepaid_purchase",
        "--amount",
        "250.00",
        "--reference",
        "wire 2026-118",
        "--reason",
        "PO 4471",
    )
    run(
        "mode-set",
        "--actor",
        staff.email,
        "--org",
        org.id,
        "--mode",
        "prepaid",
        "--reason",
        "new contract",
    )
    run("wallet-sync")

    assert "250.00 USD" in said
    assert credit_balance(org) == Decimal("250.00")
    assert BillingAccount.objects.get(organization=org).mode == "prepaid"
    assert wallet_read(org.id)["cap_nanos"] == str(250 * 10**9)
    actions = set(AuditLog.objects.filter(actor_user=staff).values_list("action", flat=True))
    assert actions == {"billing.credit_granted", "billing.mode_set"}


def test_a_customer_is_not_staff(org: Organization) -> None:
    customer = UserFactory()

    with pytest.raises(CommandError, match="not a staff user"):
        run(
            "credit-grant",
            "--actor",
            customer.email,
            "--org",
            org.id,
            "--kind",
            "promotional",
            "--amount",
            "5",
            "--reason",
            "x",
        )

    assert not CreditLedgerEntry.objects.exists()


def test_bad_input_names_the_field_and_writes_nothing(org: Organization) -> None:
    staff = staff_principal().user
    assert staff is not None

    with pytest.raises(CommandError, match=r"amount must be positive \(amount\)"):
        run(
            "credit-grant",
            "--actor",
            staff.email,
            "--org",
            org.id,
            "--kind",
            "promotional",
            "--amount",
            "-5",
            "--reason",
            "x",
        )

    assert not CreditLedgerEntry.objects.exists()


def test_invoice_finalize_and_mark_paid(org: Organization) -> None:
    staff = staff_principal().user
    assert staff is not None
    usage(org, at(9, 3), input_tokens=2_000_000)
    draft = invoice_refresh_draft(org=org, month=at(9))
    assert draft is not None

    finalized = run("invoice-finalize", "--actor", staff.email, "--invoice", draft.id)
    paid = run(
        "invoice-mark-paid",
        "--actor",
        staff.email,
        "--invoice",
        draft.id,
        "--payment-reference",
        "SEPA 991",
        "--reason",
        "bank statement 2026-10-04",
    )

    assert "finalized, total 2.00" in finalized
    assert "paid, total 2.00" in paid
    with pytest.raises(CommandError, match="cannot void an invoice that is paid"):
        run("invoice-void", "--actor", staff.email, "--invoice", draft.id, "--reason", "oops")
