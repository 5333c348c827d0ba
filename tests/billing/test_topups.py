"""Console top-ups against the fake Stripe, through the real webhook endpoint (signed
events): a Checkout payment credits the ledger once, on the webhook only, whatever is
delivered twice, late, or at the same time."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import AuditLog
from accounts.permissions import Role
from accounts.principal import Principal
from billing.models import AlertEvent, CreditLedgerEntry, StripeEvent, TopUp
from billing.payments import topups
from billing.payments.stripe_fake import FakeStripe
from billing.payments.stripe_types import StripeCardDeclined, StripeInvalidRequest
from core.errors import Conflict, InvalidInput
from tests.billing.stripe_support import deliver, deliver_at_once, last_event, use_fake_stripe
from tests.conftest import OrgWorld, build_world

pytestmark = pytest.mark.django_db

OK = "https://console.mantle.test/o/x/billing/top-up/?checkout={CHECKOUT_SESSION_ID}"
CANCEL = "https://console.mantle.test/o/x/billing/top-up/"


def start(world: OrgWorld, amount: str = "25.00") -> tuple[TopUp, str]:
    return topups.topup_checkout_start(
        principal=Principal(user=world.users[Role.BILLING]),
        org=world.org,
        amount=amount,
        success_url=OK,
        cancel_url=CANCEL,
    )


def ledger(world: OrgWorld) -> list[Decimal]:
    return list(
        CreditLedgerEntry.objects.filter(organization=world.org).values_list("amount", flat=True)
    )


@pytest.fixture
def fake(settings: Any) -> FakeStripe:
    return use_fake_stripe(settings)


def test_start_records_a_pending_top_up_and_a_checkout_session_in_payment_mode(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, url = start(world, "25.00")

    topup.refresh_from_db()
    session = fake.checkout_sessions[topup.stripe_checkout_session_id or ""]
    assert url == session["url"] == f"https://checkout.stripe.com/c/pay/{session['id']}"
    assert (topup.status, topup.source, topup.amount, topup.currency) == (
        "pending",
        "checkout",
        Decimal("25.00"),
        "USD",
    )
    assert topup.created_by == world.users[Role.BILLING]
    assert session["mode"] == "payment"
    assert (session["amount_total"], session["currency"]) == (2500, "usd")
    assert session["metadata"] == {
        "mantle_organization_id": world.org.id,
        "mantle_topup_id": topup.id,
    }
    assert session["payment_intent_data"]["metadata"] == session["metadata"]
    assert (session["status"], session["payment_status"], session["payment_intent"]) == (
        "open",
        "unpaid",
        None,
    )
    assert session["success_url"] == OK
    assert ("POST /v1/checkout/sessions", f"mantle-topup-{topup.id}-checkout") in fake.requests
    assert ledger(world) == []  # nothing until Stripe says it is paid
    assert AuditLog.objects.filter(action="billing.topup_started", target_id=topup.id).exists()


@pytest.mark.parametrize(
    ("amount", "says"),
    [
        ("4.99", "between 5.00 and 10000.00 USD"),
        ("10000.01", "between 5.00 and 10000.00 USD"),
        ("-5", "between 5.00 and 10000.00 USD"),
        ("12.345", "2 decimal places"),
        ("lots", "amount"),
        ("NaN", "amount"),
    ],
)
def test_amounts_out_of_bounds_are_refused_before_stripe(
    world: OrgWorld, fake: FakeStripe, amount: str, says: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        start(world, amount)

    assert caught.value.param == "amount"
    assert says in caught.value.message
    assert not TopUp.objects.exists()
    assert fake.requests == []


def test_pending_top_ups_have_a_budget(world: OrgWorld, fake: FakeStripe, settings: Any) -> None:
    settings.MANTLE_TOPUP_PENDING_MAX = 2
    start(world)
    start(world)

    with pytest.raises(Conflict) as caught:
        start(world)

    assert "2 top-ups are already waiting for payment (at most 2)" in caught.value.message
    assert TopUp.objects.count() == 2
    assert len(fake.checkout_sessions) == 2


def test_a_refused_session_keeps_no_top_up(
    world: OrgWorld, fake: FakeStripe, settings: Any
) -> None:
    settings.MANTLE_TOPUP_MIN = "0.10"  # below Stripe's own minimum charge of 0.50

    with pytest.raises(StripeInvalidRequest) as caught:
        start(world, "0.20")

    assert "at least 50" in caught.value.message
    assert not TopUp.objects.exists()


def test_paid_checkout_is_credited_once_on_the_webhook_with_its_receipt(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, _ = start(world, "25.00")
    session_id = topup.stripe_checkout_session_id or ""
    fake.checkout_complete(session_id, card="pm_card_visa")
    completed = last_event(fake, "checkout.session.completed")
    assert completed["data"]["object"]["payment_status"] == "paid"

    first = deliver(fake, completed)
    again = deliver(fake, completed)
    # Stripe also sends the PaymentIntent's own event: the same payment, not a new one.
    intent_event = last_event(fake, "payment_intent.succeeded")
    late = deliver(fake, intent_event)

    assert first.json()["status"] == "processed"
    assert again.json()["status"] == "duplicate"
    assert late.json()["status"] == "processed"
    assert ledger(world) == [Decimal("25.00")]
    topup.refresh_from_db()
    intent = fake.payment_intents[completed["data"]["object"]["payment_intent"]]
    charge = fake.charges[intent["latest_charge"]]
    assert (topup.status, topup.stripe_payment_intent_id) == ("paid", intent["id"])
    assert topup.receipt_url == charge["receipt_url"]
    assert topup.receipt_url.startswith("https://pay.stripe.com/receipts/")
    assert topup.credit is not None and topup.paid_at is not None
    assert (topup.credit.kind, topup.credit.reference) == ("prepaid_purchase", topup.id)


def test_the_payment_intent_event_first_credits_and_the_session_event_adds_nothing(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, _ = start(world, "30.00")
    fake.checkout_complete(topup.stripe_checkout_session_id or "")

    deliver(fake, last_event(fake, "payment_intent.succeeded"))
    deliver(fake, last_event(fake, "checkout.session.completed"))

    assert ledger(world) == [Decimal("30.00")]


def test_returning_from_checkout_credits_nothing(world: OrgWorld, fake: FakeStripe) -> None:
    topup, _ = start(world, "25.00")
    fake.checkout_complete(topup.stripe_checkout_session_id or "")
    client = world.client_for(Role.BILLING)
    url = reverse("console-topup", kwargs={"org_id": world.org.id})

    page = client.get(url, {"checkout": topup.stripe_checkout_session_id})

    assert page.status_code == 200
    assert "Stripe is confirming your payment of 25.00 USD" in page.content.decode()
    assert ledger(world) == []
    assert TopUp.objects.get(pk=topup.pk).status == "pending"


def test_a_declined_card_on_the_checkout_page_leaves_it_open_and_unpaid(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, _ = start(world)
    session_id = topup.stripe_checkout_session_id or ""

    with pytest.raises(StripeCardDeclined):
        fake.checkout_complete(session_id, card="pm_card_chargeDeclined")

    assert fake.checkout_sessions[session_id]["status"] == "open"
    assert fake.events_of("checkout.session.completed") == []
    # A card that asks for 3-D Secure is fine while the holder is on the page.
    fake.checkout_complete(session_id, card="pm_card_authenticationRequired")
    deliver(fake, last_event(fake, "checkout.session.completed"))
    assert ledger(world) == [Decimal("25.00")]


def test_an_expired_session_closes_the_top_up_without_credit(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, _ = start(world)
    fake.checkout_expire(topup.stripe_checkout_session_id or "")

    response = deliver(fake, last_event(fake, "checkout.session.expired"))

    assert response.json()["status"] == "processed"
    assert TopUp.objects.get(pk=topup.pk).status == "expired"
    assert ledger(world) == []


def test_a_payment_that_does_not_match_its_top_up_is_not_credited(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, _ = start(world, "25.00")
    fake.checkout_complete(topup.stripe_checkout_session_id or "")
    completed = last_event(fake, "checkout.session.completed")
    intent_id = completed["data"]["object"]["payment_intent"]
    fake.payment_intents[intent_id]["amount"] = 100  # not what the top-up asked for

    deliver(fake, completed)

    assert ledger(world) == []
    assert TopUp.objects.get(pk=topup.pk).status == "pending"


def test_a_session_naming_another_organizations_top_up_credits_nobody(
    world: OrgWorld, fake: FakeStripe
) -> None:
    other = build_world("Globex")
    theirs, _ = start(other, "25.00")
    mine, _ = start(world, "25.00")
    # Our session's metadata claims their top-up: its customer is not theirs.
    session = fake.checkout_sessions[mine.stripe_checkout_session_id or ""]
    session["metadata"]["mantle_topup_id"] = theirs.id
    session["payment_intent_data"]["metadata"]["mantle_topup_id"] = theirs.id
    fake.checkout_complete(session["id"])

    deliver(fake, last_event(fake, "checkout.session.completed"))
    deliver(fake, last_event(fake, "payment_intent.succeeded"))

    assert CreditLedgerEntry.objects.count() == 0
    assert set(TopUp.objects.values_list("status", flat=True)) == {"pending"}


@pytest.mark.django_db(transaction=True)
def test_concurrent_deliveries_credit_once(world: OrgWorld, fake: FakeStripe) -> None:
    topup, _ = start(world, "40.00")
    fake.checkout_complete(topup.stripe_checkout_session_id or "")
    completed = last_event(fake, "checkout.session.completed")
    succeeded = last_event(fake, "payment_intent.succeeded")
    # Stripe's redeliveries and both events of the payment, all at once.
    events = [completed, completed, completed, succeeded, succeeded, completed]
    statuses = deliver_at_once(fake, events)

    assert statuses == [200] * len(events)
    assert ledger(world) == [Decimal("40.00")]
    assert TopUp.objects.get(pk=topup.pk).status == "paid"
    assert StripeEvent.objects.filter(id__in=[completed["id"], succeeded["id"]]).count() == 2


def test_console_top_up_redirects_to_checkout(world: OrgWorld, fake: FakeStripe) -> None:
    client = world.client_for(Role.BILLING)
    url = reverse("console-topup-start", kwargs={"org_id": world.org.id})

    response = client.post(url, {"amount": "50.00"})

    topup = TopUp.objects.get(organization=world.org)
    assert response.status_code == 303
    assert (
        response["Location"]
        == fake.checkout_sessions[topup.stripe_checkout_session_id or ""]["url"]
    )
    session = fake.checkout_sessions[topup.stripe_checkout_session_id or ""]
    assert session["success_url"] == (
        f"http://testserver/console/o/{world.org.id}/billing/top-up/"
        "?checkout={CHECKOUT_SESSION_ID}"
    )


def test_console_top_up_shows_a_bad_amount_on_the_form(world: OrgWorld, fake: FakeStripe) -> None:
    client = world.client_for(Role.OWNER)
    url = reverse("console-topup-start", kwargs={"org_id": world.org.id})

    response = client.post(url, {"amount": "1.00"})

    assert response.status_code == 400
    assert "amount must be between 5.00 and 10000.00 USD" in response.content.decode()
    assert not TopUp.objects.exists()


@pytest.mark.parametrize("role", [Role.ADMIN, Role.DEVELOPER])
def test_top_up_needs_the_billing_permission(world: OrgWorld, fake: FakeStripe, role: Role) -> None:
    client = world.client_for(role)
    url = reverse("console-topup-start", kwargs={"org_id": world.org.id})

    response = client.post(url, {"amount": "50.00"})

    assert response.status_code == 403
    assert not TopUp.objects.exists()
    assert fake.checkout_sessions == {}


def test_another_organization_cannot_top_up_or_see_ours(
    world: OrgWorld, other_world: OrgWorld, fake: FakeStripe
) -> None:
    start(world)
    outsider = other_world.client_for(Role.OWNER)

    page = outsider.get(reverse("console-topup", kwargs={"org_id": world.org.id}))
    post = outsider.post(
        reverse("console-topup-start", kwargs={"org_id": world.org.id}), {"amount": "50.00"}
    )

    assert (page.status_code, post.status_code) == (404, 404)
    assert TopUp.objects.count() == 1


def test_history_shows_paid_top_ups_with_their_receipts(world: OrgWorld, fake: FakeStripe) -> None:
    topup, _ = start(world, "25.00")
    fake.checkout_complete(topup.stripe_checkout_session_id or "")
    deliver(fake, last_event(fake, "checkout.session.completed"))
    topup.refresh_from_db()

    page = Client()
    page.force_login(world.users[Role.BILLING])
    html = page.get(reverse("console-topup", kwargs={"org_id": world.org.id})).content.decode()

    assert f'href="{topup.receipt_url}"' in html
    assert "25.00 USD" in html
    assert ">paid<" in html


def test_a_top_up_that_lost_its_session_id_adopts_the_paid_session(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, _ = start(world, "25.00")
    session_id = topup.stripe_checkout_session_id or ""
    TopUp.objects.filter(pk=topup.pk).update(stripe_checkout_session_id=None)  # a crash
    fake.checkout_complete(session_id)

    deliver(fake, last_event(fake, "checkout.session.completed"))

    topup.refresh_from_db()
    assert (topup.status, topup.stripe_checkout_session_id) == ("paid", session_id)
    assert ledger(world) == [Decimal("25.00")]


def test_a_delayed_payment_is_credited_when_it_clears_not_at_completion(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, _ = start(world, "25.00")
    session_id = topup.stripe_checkout_session_id or ""
    fake.checkout_complete_delayed(session_id)

    deliver(fake, last_event(fake, "checkout.session.completed"))  # complete, unpaid

    assert ledger(world) == []
    assert TopUp.objects.get(pk=topup.pk).status == "pending"
    fake.checkout_delayed_settle(session_id, succeed=True)
    deliver(fake, last_event(fake, "checkout.session.async_payment_succeeded"))
    assert ledger(world) == [Decimal("25.00")]
    assert TopUp.objects.get(pk=topup.pk).status == "paid"


def test_a_delayed_payment_that_fails_fails_the_top_up_and_alerts(
    world: OrgWorld, fake: FakeStripe
) -> None:
    topup, _ = start(world, "25.00")
    session_id = topup.stripe_checkout_session_id or ""
    fake.checkout_complete_delayed(session_id)
    fake.checkout_delayed_settle(session_id, succeed=False)

    deliver(fake, last_event(fake, "payment_intent.payment_failed"))  # changes nothing
    assert TopUp.objects.get(pk=topup.pk).status == "pending"
    deliver(fake, last_event(fake, "checkout.session.async_payment_failed"))

    topup.refresh_from_db()
    assert (topup.status, topup.failure_code) == ("failed", "payment_method_provider_decline")
    assert ledger(world) == []
    (alert,) = AlertEvent.objects.filter(organization=world.org)
    assert (alert.kind, alert.payload["topup_id"]) == ("payment_failed", topup.id)
