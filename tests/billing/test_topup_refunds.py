"""Refunds and disputes of a top-up's charge, against the fake Stripe through the real
signed webhook endpoint: the credit is taken back once per refund or dispute, whatever is
delivered twice or at the same time, given back once if the platform wins the dispute,
and a debt lowers what the organization can spend when the credit was already used."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import AuditLog
from accounts.permissions import Role
from accounts.principal import Principal
from billing.credits import credit_available, credit_balance, credit_grant
from billing.models import (
    AlertEvent,
    AutoRecharge,
    BillingAccount,
    CreditLedgerEntry,
    TopUp,
    TopUpReversal,
)
from billing.payments import topups
from billing.payments.stripe_fake import FakeStripe
from billing.payments.stripe_types import TopUpCharge
from billing.wallet import billing_mode_set, wallet_compute
from tests.billing.factories import staff_principal
from tests.billing.stripe_support import deliver, deliver_at_once, last_event, use_fake_stripe
from tests.conftest import OrgWorld

pytestmark = pytest.mark.django_db

OK = "https://console.mantle.test/o/x/billing/top-up/?checkout={CHECKOUT_SESSION_ID}"
CANCEL = "https://console.mantle.test/o/x/billing/top-up/"


@pytest.fixture
def fake(settings: Any) -> FakeStripe:
    return use_fake_stripe(settings)


def paid_topup(world: OrgWorld, fake: FakeStripe, amount: str = "25.00") -> tuple[TopUp, str]:
    """A console top-up paid and credited through the webhook; and its charge's id."""
    topup, _ = topups.topup_checkout_start(
        principal=Principal(user=world.users[Role.BILLING]),
        org=world.org,
        amount=amount,
        success_url=OK,
        cancel_url=CANCEL,
    )
    fake.checkout_complete(topup.stripe_checkout_session_id or "")
    assert deliver(fake, last_event(fake, "checkout.session.completed")).status_code == 200
    topup.refresh_from_db()
    assert topup.status == "paid"
    intent = fake.payment_intents[topup.stripe_payment_intent_id or ""]
    return topup, str(intent["latest_charge"])


def ledger(world: OrgWorld) -> list[tuple[str, Decimal]]:
    return [
        (kind, amount.normalize())
        for kind, amount in CreditLedgerEntry.objects.filter(organization=world.org)
        .order_by("created_at", "id")
        .values_list("kind", "amount")
    ]


def test_a_partial_refund_takes_back_its_amount_once(world: OrgWorld, fake: FakeStripe) -> None:
    topup, charge_id = paid_topup(world, fake, "25.00")
    refund_id = fake.charge_refund(charge_id, amount=1000)
    refunded = last_event(fake, "charge.refunded")

    first = deliver(fake, refunded)
    again = deliver(fake, refunded)

    assert (first.json()["status"], again.json()["status"]) == ("processed", "duplicate")
    assert ledger(world) == [
        ("prepaid_purchase", Decimal("25")),
        ("adjustment", Decimal("-10")),
    ]
    assert credit_balance(world.org) == Decimal("15")
    topup.refresh_from_db()
    assert (topup.status, topup.refunded_amount, topup.dispute_status) == (
        "paid",
        Decimal("10.00"),
        "",
    )
    (reversal,) = TopUpReversal.objects.all()
    assert (reversal.stripe_object_id, reversal.kind, reversal.amount) == (
        refund_id,
        "refund",
        Decimal("-10.00"),
    )
    assert reversal.entry.grant_id == topup.credit_id
    audit = AuditLog.objects.get(action="billing.topup_refund", target_id=topup.id)
    assert audit.metadata["refund"] == refund_id and audit.metadata["amount"] == "-10.00"


def test_a_second_refund_takes_back_only_itself_whichever_event_brings_it(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, charge_id = paid_topup(world, fake, "25.00")
    fake.charge_refund(charge_id, amount=1000)
    first_event = last_event(fake, "charge.refunded")
    fake.charge_refund(charge_id)  # the remaining 15.00
    second_event = last_event(fake, "charge.refunded")

    # The first event, delivered late, re-reads the charge: both refunds are seen.
    late = deliver(fake, first_event)
    second = deliver(fake, second_event)

    assert (late.json()["status"], second.json()["status"]) == ("processed", "processed")
    assert credit_balance(world.org) == Decimal(0)
    assert sorted(TopUpReversal.objects.values_list("amount", flat=True)) == [
        Decimal("-15.00"),
        Decimal("-10.00"),
    ]
    topup.refresh_from_db()
    assert topup.refunded_amount == Decimal("25.00")


def test_a_refund_of_spent_credit_leaves_a_debt_that_admission_refuses(
    world: OrgWorld, fake: FakeStripe
) -> None:
    staff = staff_principal()
    billing_mode_set(
        principal=staff, org=world.org, mode=BillingAccount.Mode.PREPAID, reason="test"
    )
    topup, charge_id = paid_topup(world, fake, "25.00")
    # An invoice's finalization drew 20.00 of the top-up's credit.
    CreditLedgerEntry.objects.create(
        organization=world.org,
        kind="consumption",
        amount=Decimal("-20"),
        currency="USD",
        grant=topup.credit,
        reason="applied to invoice MNT-1",
    )
    credit_grant(principal=staff, org=world.org, kind="promotional", amount="3", reason="welcome")
    fake.charge_refund(charge_id)

    deliver(fake, last_event(fake, "charge.refunded"))

    # 25 bought, 20 spent, 25 refunded: 20 owed, less the 3 of promotion.
    assert credit_balance(world.org) == Decimal("-17")
    assert credit_available(world.org) == Decimal("-17")
    state = wallet_compute(world.org)
    assert state.cap_nanos is not None and state.cap_nanos - state.spent_nanos < 0
    world.org.refresh_from_db()
    assert world.org.status == "active"  # not suspended: admission refuses prepaid spend


def test_a_dispute_takes_back_its_amount_once_alerts_and_stops_auto_recharge(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, charge_id = paid_topup(world, fake, "40.00")
    AutoRecharge.objects.create(
        organization=world.org,
        enabled=True,
        threshold=Decimal("10"),
        amount=Decimal("20"),
        daily_cap=Decimal("100"),
    )
    dispute_id = fake.dispute_open(charge_id, reason="fraudulent")
    created = last_event(fake, "charge.dispute.created")

    deliver(fake, created)
    deliver(fake, created)

    assert credit_balance(world.org) == Decimal(0)
    topup.refresh_from_db()
    assert (topup.dispute_status, topup.refunded_amount) == ("needs_response", Decimal(0))
    (reversal,) = TopUpReversal.objects.all()
    assert (reversal.stripe_object_id, reversal.kind) == (dispute_id, "dispute")
    (alert,) = AlertEvent.objects.filter(organization=world.org)
    assert alert.kind == "payment_failed"
    assert (alert.payload["topup_id"], alert.payload["stripe_dispute_id"]) == (
        topup.id,
        dispute_id,
    )
    assert alert.payload["decline_code"] == "dispute_fraudulent"
    assert AuditLog.objects.filter(action="billing.topup_dispute", target_id=topup.id).count() == 1
    # The card's holder is not charged again automatically.
    assert AutoRecharge.objects.get(organization=world.org).enabled is False
    stopped = AuditLog.objects.get(action="billing.auto_recharge_set")
    assert stopped.metadata["enabled"] is False and dispute_id in stopped.metadata["reason"]


def test_a_won_dispute_gives_the_credit_back_once(world: OrgWorld, fake: FakeStripe) -> None:
    topup, charge_id = paid_topup(world, fake, "40.00")
    dispute_id = fake.dispute_open(charge_id)
    deliver(fake, last_event(fake, "charge.dispute.created"))
    fake.dispute_close(dispute_id, won=True)
    closed = last_event(fake, "charge.dispute.closed")

    assert deliver(fake, closed).json()["status"] == "processed"
    assert deliver(fake, closed).json()["status"] == "duplicate"

    assert credit_balance(world.org) == Decimal("40")
    assert ledger(world) == [
        ("prepaid_purchase", Decimal("40")),
        ("adjustment", Decimal("-40")),
        ("adjustment", Decimal("40")),
    ]
    topup.refresh_from_db()
    assert topup.dispute_status == "won"
    assert AuditLog.objects.filter(action="billing.topup_dispute_won").count() == 1


def test_a_lost_dispute_keeps_the_credit_taken_back(world: OrgWorld, fake: FakeStripe) -> None:
    topup, charge_id = paid_topup(world, fake, "40.00")
    dispute_id = fake.dispute_open(charge_id)
    fake.dispute_close(dispute_id, won=False)

    # The closing event comes first (the first was delayed): it takes back just the same.
    closed = deliver(fake, last_event(fake, "charge.dispute.closed"))
    created = deliver(fake, last_event(fake, "charge.dispute.created"))

    assert (closed.json()["status"], created.json()["status"]) == ("processed", "processed")
    assert credit_balance(world.org) == Decimal(0)
    assert TopUpReversal.objects.count() == 1
    topup.refresh_from_db()
    assert topup.dispute_status == "lost"


def test_a_dispute_already_won_when_first_read_moves_nothing(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, charge_id = paid_topup(world, fake, "40.00")
    dispute_id = fake.dispute_open(charge_id)
    fake.dispute_close(dispute_id, won=True)

    deliver(fake, last_event(fake, "charge.dispute.created"))  # re-read: won already

    assert credit_balance(world.org) == Decimal("40")
    assert TopUpReversal.objects.count() == 0
    assert not AlertEvent.objects.exists()
    topup.refresh_from_db()
    assert topup.dispute_status == "won"


def test_a_charge_not_of_a_top_up_is_ignored(world: OrgWorld, fake: FakeStripe) -> None:
    paid_topup(world, fake, "25.00")
    customer = fake.customer_create(organization_id="org_elsewhere", name="Elsewhere")
    pm = fake.payment_method_attach("pm_card_visa", customer_id=customer.id)
    intent = fake.payment_intent_charge_off_session(
        TopUpCharge(
            organization_id="org_elsewhere",
            topup_id="topup_not_ours",
            customer_id=customer.id,
            amount=2500,
            currency="USD",
            description="something else",
        ),
        payment_method_id=pm.id,
        idempotency_key="k-other",
    )
    other_charge = str(fake.payment_intents[intent.id]["latest_charge"])
    fake.charge_refund(other_charge, amount=1000)
    refunded = deliver(fake, last_event(fake, "charge.refunded"))
    fake.dispute_open(other_charge)
    disputed = deliver(fake, last_event(fake, "charge.dispute.created"))

    assert (refunded.json()["status"], disputed.json()["status"]) == ("processed", "processed")
    assert not AlertEvent.objects.exists()
    assert credit_balance(world.org) == Decimal("25")
    assert TopUpReversal.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_concurrent_deliveries_take_back_once(world: OrgWorld, fake: FakeStripe) -> None:
    _, charge_id = paid_topup(world, fake, "40.00")
    fake.charge_refund(charge_id, amount=500)
    first = last_event(fake, "charge.refunded")
    fake.charge_refund(charge_id, amount=700)
    second = last_event(fake, "charge.refunded")
    events = [first, second, first, second, first, second]
    statuses = deliver_at_once(fake, events)

    assert statuses == [200] * len(events)
    assert credit_balance(world.org) == Decimal("28")
    assert TopUpReversal.objects.count() == 2


def test_history_shows_refunds_and_disputes(world: OrgWorld, fake: FakeStripe) -> None:
    _, charge_id = paid_topup(world, fake, "25.00")
    fake.charge_refund(charge_id, amount=1000)
    deliver(fake, last_event(fake, "charge.refunded"))
    _, disputed_charge = paid_topup(world, fake, "30.00")
    fake.dispute_open(disputed_charge)
    deliver(fake, last_event(fake, "charge.dispute.created"))

    page = Client()
    page.force_login(world.users[Role.BILLING])
    html = page.get(reverse("console-topup", kwargs={"org_id": world.org.id})).content.decode()

    assert "10.00 USD refunded" in html
    assert "disputed: needs_response" in html
