"""The credit ledger: balance as its sum, priority of application, expiry, refused bad input."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import AuditLog, Organization
from accounts.principal import Principal
from billing.credits import (
    application_order,
    credit_adjust,
    credit_available,
    credit_balance,
    credit_grant,
    credits_expire,
)
from billing.invoicing import invoice_finalize, invoice_refresh_draft
from billing.models import CreditLedgerEntry
from core.errors import InvalidInput, PermissionDenied
from tests.billing.factories import CHAT, GrantFactory, at, price_book, staff_principal, usage
from tests.factories import OrganizationFactory, UserFactory, make_api_key

pytestmark = pytest.mark.django_db

PROMO = CreditLedgerEntry.Kind.PROMOTIONAL
PREPAID = CreditLedgerEntry.Kind.PREPAID_PURCHASE


@pytest.fixture
def org() -> Organization:
    price_book(CHAT, input_price="1", output_price="2")
    return OrganizationFactory()


@pytest.fixture
def staff() -> Principal:
    return staff_principal()


def ledger_state() -> tuple[int, int]:
    return CreditLedgerEntry.objects.count(), AuditLog.objects.count()


def test_grant_records_the_entry_and_the_audit(org: Organization, staff: Principal) -> None:
    expires = timezone.now() + timedelta(days=30)

    entry = credit_grant(
        principal=staff,
        org=org,
        kind=PROMO,
        amount="25.50",
        expires_at=expires,
        reason="launch promotion",
        reference="PROMO-7",
    )

    assert (entry.kind, entry.amount, entry.expires_at, entry.created_by) == (
        "promotional",
        Decimal("25.50"),
        expires,
        staff.user,
    )
    audit = AuditLog.objects.get(action="billing.credit_granted")
    assert audit.metadata["amount"] == "25.50"
    assert audit.metadata["reason"] == "launch promotion"
    assert audit.ip_address == "10.0.0.1"
    assert credit_balance(org) == Decimal("25.50")


def test_balance_is_the_sum_of_the_ledger(org: Organization, staff: Principal) -> None:
    a = credit_grant(principal=staff, org=org, kind=PREPAID, amount="100", reason="PO 1")
    credit_grant(principal=staff, org=org, kind=PROMO, amount="10.25", reason="promo")
    credit_adjust(principal=staff, grant=a, amount="-0.25", reason="fee")
    OrganizationFactory()  # another organization's ledger is not ours
    entries = CreditLedgerEntry.objects.filter(organization=org)

    assert credit_balance(org) == sum(e.amount for e in entries) == Decimal("110.00")


BAD_GRANTS: list[tuple[dict[str, Any], str]] = [
    ({"amount": "-5"}, "amount"),
    ({"amount": "0"}, "amount"),
    ({"amount": "1.001"}, "amount"),
    ({"amount": "abc"}, "amount"),
    ({"amount": "NaN"}, "amount"),
    ({"amount": 1.5}, "amount"),  # a float: refused, not rounded
    ({"amount": "1000000001"}, "amount"),
    ({"kind": "consumption"}, "kind"),
    ({"expires_at": "past"}, "expires_at"),
    ({"reason": "  "}, "reason"),
    ({"currency": "EUR"}, "currency"),
    ({"reference": "x" * 101}, "reference"),
]


@pytest.mark.parametrize(("change", "param"), BAD_GRANTS)
def test_bad_grant_is_refused_naming_the_field_and_nothing_is_written(
    org: Organization, staff: Principal, change: dict[str, Any], param: str
) -> None:
    kwargs: dict[str, Any] = {"kind": PROMO, "amount": "10", "reason": "promo"}
    kwargs.update(change)
    if kwargs.get("expires_at") == "past":
        kwargs["expires_at"] = timezone.now() - timedelta(seconds=1)
    before = ledger_state()

    with pytest.raises(InvalidInput) as raised:
        credit_grant(principal=staff, org=org, **kwargs)

    assert raised.value.param == param
    assert param in raised.value.message
    assert ledger_state() == before


@pytest.mark.parametrize("who", ["customer", "api-key"])
def test_only_staff_grant_credit(org: Organization, who: str) -> None:
    if who == "customer":
        principal = Principal(user=UserFactory())
    else:
        key, _ = make_api_key(org, scopes=["admin"])
        principal = Principal(api_key=key)
    before = ledger_state()

    with pytest.raises(PermissionDenied):
        credit_grant(principal=principal, org=org, kind=PREPAID, amount="10", reason="free money")

    assert ledger_state() == before


def test_adjustment_cannot_take_a_grant_below_zero(org: Organization, staff: Principal) -> None:
    grant = credit_grant(principal=staff, org=org, kind=PREPAID, amount="10", reason="PO")
    before = ledger_state()

    with pytest.raises(InvalidInput) as raised:
        credit_adjust(principal=staff, grant=grant, amount="-10.01", reason="clawback")

    assert raised.value.param == "amount"
    assert ledger_state() == before


def test_application_order_promotional_first_then_earliest_expiry(org: Organization) -> None:
    now = timezone.now()
    prepaid_old = GrantFactory(organization=org, kind=PREPAID, created_at=now - timedelta(days=9))
    prepaid_expiring = GrantFactory(
        organization=org, kind=PREPAID, expires_at=now + timedelta(days=5)
    )
    promo_late = GrantFactory(organization=org, kind=PROMO, expires_at=now + timedelta(days=60))
    promo_soon = GrantFactory(organization=org, kind=PROMO, expires_at=now + timedelta(days=2))
    promo_forever = GrantFactory(organization=org, kind=PROMO)
    GrantFactory(organization=org, kind=PROMO, expires_at=now - timedelta(hours=1))  # expired

    order = [r.grant.id for r in application_order(org, now)]

    assert order == [
        promo_soon.id,
        promo_late.id,
        promo_forever.id,
        prepaid_expiring.id,
        prepaid_old.id,
    ]


def test_finalization_draws_credits_in_priority_order(org: Organization, staff: Principal) -> None:
    now = timezone.now()
    prepaid = GrantFactory(organization=org, kind=PREPAID, amount=Decimal("100.00"))
    promo = GrantFactory(
        organization=org, kind=PROMO, amount=Decimal("3.00"), expires_at=now + timedelta(days=3)
    )
    usage(org, at(9, 3), input_tokens=5_000_000)  # 5.00
    draft = invoice_refresh_draft(org=org, month=at(9))
    assert draft is not None

    invoice = invoice_finalize(principal=staff, invoice=draft)

    drawn = dict(
        CreditLedgerEntry.objects.filter(kind="consumption").values_list("grant_id", "amount")
    )
    assert drawn == {promo.id: Decimal("-3.00"), prepaid.id: Decimal("-2.00")}
    assert (invoice.credits_applied, invoice.total) == (Decimal("5.00"), Decimal("0.00"))


def test_an_expired_promotion_does_not_apply(org: Organization, staff: Principal) -> None:
    expired = GrantFactory(
        organization=org,
        kind=PROMO,
        amount=Decimal("50.00"),
        expires_at=timezone.now() - timedelta(minutes=1),
    )
    usage(org, at(9, 3), input_tokens=5_000_000)
    draft = invoice_refresh_draft(org=org, month=at(9))
    assert draft is not None

    invoice = invoice_finalize(principal=staff, invoice=draft)

    assert (invoice.credits_applied, invoice.total) == (Decimal("0.00"), Decimal("5.00"))
    assert not CreditLedgerEntry.objects.filter(grant=expired).exists()
    assert credit_available(org) == Decimal("0")
    assert credit_balance(org) == Decimal("50.00")  # until the expiry entry is written


def test_expiry_writes_off_what_is_left_once(org: Organization, staff: Principal) -> None:
    now = timezone.now()
    grant = GrantFactory(
        organization=org, kind=PROMO, amount=Decimal("20.00"), expires_at=now - timedelta(hours=1)
    )
    CreditLedgerEntry.objects.create(
        organization=org, kind="consumption", amount=Decimal("-7.50"), grant=grant, reason="inv"
    )
    keep = GrantFactory(organization=org, kind=PREPAID, amount=Decimal("5.00"))

    written = credits_expire(now=now)
    again = credits_expire(now=now)

    assert [(e.grant_id, e.amount, e.kind) for e in written] == [
        (grant.id, Decimal("-12.50"), "expiry")
    ]
    assert again == []
    assert credit_balance(org) == Decimal("5.00") == keep.amount
    assert AuditLog.objects.filter(action="billing.credit_expired").count() == 1
