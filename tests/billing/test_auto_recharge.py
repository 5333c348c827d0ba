"""Auto-recharge against the fake Stripe: once per threshold crossing, within the daily
cap, credited by the signed payment_intent.succeeded webhook, declines recorded and never
retried in a loop."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from accounts.models import AuditLog
from accounts.permissions import Role
from accounts.principal import Principal
from billing.models import AlertEvent, AutoRecharge, BillingAccount, CreditLedgerEntry, TopUp
from billing.payments import auto_recharge
from billing.payments.auto_recharge import AutoRechargeSpec
from billing.payments.stripe_fake import FakeStripe
from billing.payments.stripe_sync import stripe_customer_ensure
from billing.payments.stripe_types import StripeUnavailable
from billing.payments.tasks import auto_recharge_evaluate_all
from billing.tasks import wallet_sync_organization
from core.errors import InvalidInput
from tests.billing.factories import GrantFactory, price_book, usage
from tests.billing.stripe_support import deliver, last_event, use_fake_stripe
from tests.conftest import OrgWorld

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)


@dataclass
class Prepaid:
    """A prepaid organization with 20.00 of credit, a saved card, list prices of 1 per
    million input tokens, and auto-recharge under 10.00 for 25.00, at most 60.00 a day."""

    fake: FakeStripe
    world: OrgWorld
    customer_id: str
    hours: Iterator[int]

    @property
    def org_id(self) -> str:
        return self.world.org.id

    def spend(self, amount: str) -> None:
        """Usage the drain counted (rollups on no invoice) worth `amount`."""
        usage(
            self.world.org,
            datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=next(self.hours)),
            input_tokens=int(Decimal(amount) * 1_000_000),
        )

    def card(self, card: str) -> None:
        pm = self.fake.payment_method_attach(card, customer_id=self.customer_id)
        self.fake.customer_set_default_payment_method(
            customer_id=self.customer_id, payment_method_id=pm.id
        )

    def evaluate(self, now: datetime = NOW) -> TopUp | None:
        return auto_recharge.auto_recharge_evaluate(self.world.org, now=now)

    def settings_row(self) -> AutoRecharge:
        return AutoRecharge.objects.get(organization=self.world.org)

    def intents(self) -> list[dict[str, Any]]:
        return [
            pi for pi in self.fake.payment_intents.values() if pi["customer"] == self.customer_id
        ]

    def credited(self) -> list[Decimal]:
        return list(
            CreditLedgerEntry.objects.filter(
                organization=self.world.org, reference__startswith="topup_"
            ).values_list("amount", flat=True)
        )


def configure(world: OrgWorld, **overrides: Any) -> AutoRecharge:
    spec = {
        "enabled": True,
        "threshold": Decimal("10.00"),
        "amount": Decimal("25.00"),
        "daily_cap": Decimal("60.00"),
        **overrides,
    }
    return auto_recharge.auto_recharge_set(
        principal=Principal(user=world.users[Role.BILLING]),
        org=world.org,
        spec=AutoRechargeSpec(**spec),
    )


@pytest.fixture
def prepaid(world: OrgWorld, settings: Any) -> Prepaid:
    fake = use_fake_stripe(settings)
    BillingAccount.objects.create(organization=world.org, mode=BillingAccount.Mode.PREPAID)
    GrantFactory(organization=world.org, amount=Decimal("20.00"))
    price_book()
    customer = stripe_customer_ensure(org=world.org)
    p = Prepaid(
        fake=fake,
        world=world,
        customer_id=customer.stripe_customer_id,
        hours=itertools.count(),
    )
    p.card("pm_card_visa")
    configure(world)
    return p


def test_above_the_threshold_nothing_is_charged(prepaid: Prepaid) -> None:
    prepaid.spend("9.99")  # 10.01 left

    assert prepaid.evaluate() is None
    assert prepaid.intents() == []
    assert not TopUp.objects.exists()


def test_falling_under_charges_the_saved_card_off_session_once(prepaid: Prepaid) -> None:
    prepaid.spend("12.00")  # 8.00 left

    topup = prepaid.evaluate()
    again = prepaid.evaluate()

    assert topup is not None and again is None
    (intent,) = prepaid.intents()
    assert (intent["amount"], intent["currency"], intent["status"]) == (2500, "usd", "succeeded")
    assert (
        intent["payment_method"]
        == prepaid.fake.customers[prepaid.customer_id]["invoice_settings"]["default_payment_method"]
    )
    assert intent["metadata"] == {
        "mantle_organization_id": prepaid.org_id,
        "mantle_topup_id": topup.id,
    }
    assert ("POST /v1/payment_intents", f"mantle-auto-recharge-{prepaid.org_id}-1") in (
        prepaid.fake.requests
    )
    topup.refresh_from_db()
    assert (topup.source, topup.status, topup.crossing, topup.amount) == (
        "auto_recharge",
        "pending",
        1,
        Decimal("25.00"),
    )
    assert topup.stripe_payment_intent_id == intent["id"]
    assert prepaid.credited() == []  # the webhook credits, not the charge
    assert prepaid.settings_row().armed is False


def test_the_webhook_credits_once_and_a_recovered_balance_re_arms(prepaid: Prepaid) -> None:
    prepaid.spend("12.00")
    first = prepaid.evaluate()
    assert first is not None
    event = last_event(prepaid.fake, "payment_intent.succeeded")

    assert deliver(prepaid.fake, event).json()["status"] == "processed"
    assert deliver(prepaid.fake, event).json()["status"] == "duplicate"

    assert prepaid.credited() == [Decimal("25.00")]
    first.refresh_from_db()
    assert first.status == "paid"
    assert first.receipt_url.startswith("https://pay.stripe.com/receipts/")
    # 33.00 now: back above 10.00, so the next fall is a new crossing.
    assert prepaid.evaluate() is None
    assert prepaid.settings_row().armed is True
    prepaid.spend("24.00")  # 9.00
    second = prepaid.evaluate()
    assert second is not None and second.crossing == 2
    assert ("POST /v1/payment_intents", f"mantle-auto-recharge-{prepaid.org_id}-2") in (
        prepaid.fake.requests
    )
    assert len(prepaid.intents()) == 2


def test_a_recharge_that_leaves_the_balance_under_waits_for_a_rise(prepaid: Prepaid) -> None:
    prepaid.spend("19.00")  # 1.00
    assert prepaid.evaluate() is not None
    deliver(prepaid.fake, last_event(prepaid.fake, "payment_intent.succeeded"))
    prepaid.spend("20.00")  # 26.00 - 20.00 = 6.00, still under, never rose above: same crossing

    assert prepaid.evaluate() is None
    assert len(prepaid.intents()) == 1


def test_the_daily_cap_holds_a_crossing_until_the_next_utc_day(prepaid: Prepaid) -> None:
    for _ in range(2):  # two crossings, 50.00 of the 60.00 cap
        prepaid.spend("15.00")
        assert prepaid.evaluate() is not None
        deliver(prepaid.fake, last_event(prepaid.fake, "payment_intent.succeeded"))
        assert prepaid.evaluate() is None  # back above: re-armed
        prepaid.spend("25.00")
    # Under again, armed, but 50.00 + 25.00 > 60.00 today.
    assert prepaid.evaluate() is None
    assert prepaid.evaluate(NOW.replace(hour=23, minute=59)) is None
    assert len(prepaid.intents()) == 2
    assert prepaid.settings_row().armed is True

    tomorrow = prepaid.evaluate(NOW.replace(hour=0) + timedelta(days=1))

    assert tomorrow is not None and tomorrow.crossing == 3
    assert len(prepaid.intents()) == 3


def test_a_failed_charge_does_not_count_against_the_cap_but_is_not_retried(
    prepaid: Prepaid,
) -> None:
    prepaid.card("pm_card_chargeDeclined")
    prepaid.spend("15.00")

    failed = prepaid.evaluate()
    for minute in range(1, 4):  # the beat, every minute
        assert prepaid.evaluate(NOW + timedelta(minutes=minute)) is None

    assert failed is not None
    failed.refresh_from_db()
    assert (failed.status, failed.failure_code) == ("failed", "generic_decline")
    assert failed.stripe_payment_intent_id == prepaid.intents()[0]["id"]
    assert len(prepaid.intents()) == 1
    assert auto_recharge.auto_recharge_spent_today(prepaid.world.org, now=NOW) == 0


@pytest.mark.parametrize(
    ("card", "code"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
        ("pm_card_authenticationRequired", "authentication_required"),
    ],
)
def test_a_decline_is_recorded_and_alerted_once(prepaid: Prepaid, card: str, code: str) -> None:
    prepaid.card(card)
    prepaid.spend("15.00")

    topup = prepaid.evaluate()
    # Stripe's own event of the failure changes nothing more.
    response = deliver(prepaid.fake, last_event(prepaid.fake, "payment_intent.payment_failed"))

    assert response.json()["status"] == "processed"
    assert topup is not None
    topup.refresh_from_db()
    assert (topup.status, topup.failure_code) == ("failed", code)
    (alert,) = AlertEvent.objects.filter(organization=prepaid.world.org)
    assert alert.kind == AlertEvent.Kind.PAYMENT_FAILED
    assert alert.dedupe_key == f"payment_failed:topup:{topup.id}"
    assert alert.payload["topup_id"] == topup.id
    assert alert.payload["decline_code"] == code
    assert (alert.payload["total"], alert.payload["currency"]) == ("25.00", "USD")
    assert prepaid.credited() == []


def test_saving_again_after_a_decline_re_arms(prepaid: Prepaid) -> None:
    prepaid.card("pm_card_chargeDeclined")
    prepaid.spend("15.00")
    assert prepaid.evaluate() is not None
    prepaid.card("pm_card_visa")

    configure(prepaid.world)
    retried = prepaid.evaluate()

    assert retried is not None and retried.crossing == 2
    assert [pi["status"] for pi in prepaid.intents()] == ["requires_payment_method", "succeeded"]


def test_a_transient_error_leaves_the_crossing_to_be_charged_once_under_its_key(
    prepaid: Prepaid, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepaid.spend("15.00")
    real = prepaid.fake.payment_intent_charge_off_session

    def down(*args: Any, **kwargs: Any) -> Any:
        raise StripeUnavailable("charging the saved payment method: Stripe could not be reached")

    monkeypatch.setattr(prepaid.fake, "payment_intent_charge_off_session", down)
    with pytest.raises(StripeUnavailable):
        prepaid.evaluate()
    (pending,) = TopUp.objects.all()
    assert (pending.status, pending.stripe_payment_intent_id) == ("pending", None)

    monkeypatch.setattr(prepaid.fake, "payment_intent_charge_off_session", real)
    assert prepaid.evaluate(NOW + timedelta(minutes=1)) is None  # no new crossing...
    pending.refresh_from_db()
    (intent,) = prepaid.intents()  # ...the recorded one charged, once
    assert pending.stripe_payment_intent_id == intent["id"]
    assert TopUp.objects.count() == 1


def test_a_crossing_not_sent_within_a_day_is_given_up(prepaid: Prepaid) -> None:
    TopUp.objects.create(
        organization=prepaid.world.org,
        source=TopUp.Source.AUTO_RECHARGE,
        amount=Decimal("25.00"),
        currency="USD",
        crossing=1,
        created_at=NOW - timedelta(hours=24),
    )

    prepaid.evaluate()

    assert TopUp.objects.get(crossing=1).failure_code == "not_sent"
    assert prepaid.intents() == []


def test_postpaid_organizations_are_not_recharged(prepaid: Prepaid) -> None:
    BillingAccount.objects.filter(organization=prepaid.world.org).update(mode="postpaid")
    prepaid.spend("15.00")

    assert prepaid.evaluate() is None
    assert prepaid.intents() == []


def test_disabled_auto_recharge_charges_nothing(prepaid: Prepaid) -> None:
    configure(prepaid.world, enabled=False)
    prepaid.spend("15.00")

    assert prepaid.evaluate() is None
    assert prepaid.intents() == []


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("threshold", Decimal("-1"), "threshold must be between 0 and"),
        ("threshold", Decimal("1.001"), "2 decimal places"),
        ("amount", Decimal("4.99"), "amount must be between 5.00 and 10000.00 USD"),
        ("amount", Decimal("10000.01"), "amount must be between 5.00 and 10000.00 USD"),
        ("daily_cap", Decimal("24.99"), "daily_cap must be at least the amount (25.00)"),
        ("daily_cap", Decimal("50000.01"), "and at most 50000.00"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(
    prepaid: Prepaid, field: str, value: Decimal, says: str
) -> None:
    before = prepaid.settings_row()

    with pytest.raises(InvalidInput) as caught:
        configure(prepaid.world, **{field: value})

    assert caught.value.param == field
    assert says in caught.value.message
    after = prepaid.settings_row()
    assert (after.threshold, after.amount, after.daily_cap) == (
        before.threshold,
        before.amount,
        before.daily_cap,
    )


def test_enabling_needs_a_saved_payment_method(world: OrgWorld, settings: Any) -> None:
    use_fake_stripe(settings)
    stripe_customer_ensure(org=world.org)

    with pytest.raises(InvalidInput) as caught:
        configure(world)

    assert caught.value.param == "enabled"
    assert "save a payment method first" in caught.value.message
    assert not AutoRecharge.objects.exists()


def test_settings_are_audited(prepaid: Prepaid) -> None:
    entry = AuditLog.objects.filter(action="billing.auto_recharge_set").latest("id")

    assert entry.metadata == {
        "enabled": True,
        "threshold": "10.00",
        "amount": "25.00",
        "daily_cap": "60.00",
        "currency": "USD",
    }


def test_console_saves_the_settings(prepaid: Prepaid) -> None:
    client = prepaid.world.client_for(Role.OWNER)
    url = reverse("console-auto-recharge", kwargs={"org_id": prepaid.org_id})

    response = client.post(
        url,
        {
            "auto-enabled": "on",
            "auto-threshold": "5.00",
            "auto-amount": "50.00",
            "auto-daily_cap": "100.00",
        },
    )
    refused = client.post(
        url,
        {
            "auto-enabled": "on",
            "auto-threshold": "5.00",
            "auto-amount": "50.00",
            "auto-daily_cap": "10.00",
        },
    )

    assert response.status_code == 302
    row = prepaid.settings_row()
    assert (row.threshold, row.amount, row.daily_cap) == (
        Decimal("5.00"),
        Decimal("50.00"),
        Decimal("100.00"),
    )
    assert refused.status_code == 400
    assert "daily_cap must be at least the amount (50.00)" in refused.content.decode()


@pytest.mark.parametrize("role", [Role.ADMIN, Role.DEVELOPER])
def test_console_settings_need_the_billing_permission(prepaid: Prepaid, role: Role) -> None:
    client = prepaid.world.client_for(role)
    url = reverse("console-auto-recharge", kwargs={"org_id": prepaid.org_id})

    response = client.post(
        url,
        {"auto-threshold": "1.00", "auto-amount": "5.00", "auto-daily_cap": "5.00"},
    )

    assert response.status_code == 403
    assert prepaid.settings_row().threshold == Decimal("10.00")


@pytest.mark.django_db(transaction=True)
def test_concurrent_evaluations_charge_a_crossing_once(prepaid: Prepaid) -> None:
    prepaid.spend("15.00")
    results: list[TopUp | None] = []
    gate = threading.Barrier(4)

    def run() -> None:
        try:
            gate.wait()
            results.append(auto_recharge.auto_recharge_evaluate(prepaid.world.org))
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(results) == 4
    assert sum(r is not None for r in results) == 1
    assert len(prepaid.intents()) == 1
    assert TopUp.objects.count() == 1


def test_the_beat_task_evaluates_every_enabled_organization(prepaid: Prepaid) -> None:
    prepaid.spend("15.00")

    assert auto_recharge_evaluate_all() == 1
    assert auto_recharge_evaluate_all() == 0
    assert TopUp.objects.get().created_at <= timezone.now()


@pytest.mark.django_db(transaction=True)
def test_concurrent_charges_of_one_crossing_send_one_request(prepaid: Prepaid) -> None:
    pending = TopUp.objects.create(
        organization=prepaid.world.org,
        source=TopUp.Source.AUTO_RECHARGE,
        amount=Decimal("25.00"),
        currency="USD",
        crossing=1,
    )
    gate = threading.Barrier(4)

    def run() -> None:
        try:
            gate.wait()
            auto_recharge.auto_recharge_charge(pending)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    sent = [r for r in prepaid.fake.requests if r[0] == "POST /v1/payment_intents"]
    assert sent == [("POST /v1/payment_intents", f"mantle-auto-recharge-{prepaid.org_id}-1")]
    pending.refresh_from_db()
    assert pending.stripe_payment_intent_id == prepaid.intents()[0]["id"]


@pytest.mark.django_db(transaction=True)
def test_a_wallet_sync_checks_the_threshold_at_once(prepaid: Prepaid) -> None:
    prepaid.spend("15.00")

    wallet_sync_organization(prepaid.org_id)  # as after a finalization or an expiry

    (topup,) = TopUp.objects.all()
    assert (topup.crossing, topup.stripe_payment_intent_id) == (1, prepaid.intents()[0]["id"])
    # The credit syncs the wallet again after commit: back above, re-armed by that sync.
    deliver(prepaid.fake, last_event(prepaid.fake, "payment_intent.succeeded"))
    assert prepaid.settings_row().armed is True
    assert prepaid.credited() == [Decimal("25.00")]
