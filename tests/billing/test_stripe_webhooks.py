"""POST /billing/stripe/webhook: signature first, each event once, any order; dunning."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client

from accounts import keys, services
from accounts.models import AuditLog, Organization
from accounts.principal import SYSTEM
from billing.models import Invoice, StripeCustomer, StripeEvent, StripePaymentFailure
from billing.payments import stripe_events
from billing.payments.stripe_client import webhook_sign
from billing.payments.stripe_fake import FakeStripe
from billing.payments.stripe_sync import stripe_customer_ensure, stripe_invoice_push
from billing.payments.stripe_types import InvoiceLine, InvoicePush, StripeUnavailable, invoice_push
from core.redis import get_redis
from tests.billing.stripe_support import (
    WEBHOOK_SECRET,
    WEBHOOK_URL,
    deliver,
    last_event,
    make_invoice,
    use_fake_stripe,
)
from tests.conftest import OrgWorld

pytestmark = pytest.mark.django_db

DAY = 86400


@dataclass
class Billed:
    """An organization with a Stripe customer and one open Stripe invoice."""

    fake: FakeStripe
    world: OrgWorld
    invoice: Invoice
    stripe_invoice_id: str
    customer_id: str

    def use_card(self, card: str) -> None:
        pm = self.fake.payment_method_attach(card, customer_id=self.customer_id)
        self.fake.customer_set_default_payment_method(
            customer_id=self.customer_id, payment_method_id=pm.id
        )

    def fail(self, *, after_s: float = 3600) -> dict[str, Any]:
        """One declined collection attempt, `after_s` after the previous event."""
        self.fake.advance(after_s)
        assert self.fake.attempt_payment(self.stripe_invoice_id) is False
        return last_event(self.fake, "invoice.payment_failed")

    def pay(self, *, after_s: float = 3600) -> dict[str, Any]:
        self.fake.advance(after_s)
        self.use_card("pm_card_visa")
        assert self.fake.attempt_payment(self.stripe_invoice_id) is True
        return last_event(self.fake, "invoice.paid")


@pytest.fixture
def billed(world: OrgWorld, settings: Any) -> Billed:
    fake = use_fake_stripe(settings)
    customer = stripe_customer_ensure(org=world.org)
    invoice = make_invoice(world.org)
    pushed = stripe_invoice_push(invoice_id=invoice.id)
    invoice.refresh_from_db()
    b = Billed(
        fake=fake,
        world=world,
        invoice=invoice,
        stripe_invoice_id=pushed.id,
        customer_id=customer.stripe_customer_id,
    )
    b.use_card("pm_card_chargeDeclined")
    return b


@contextmanager
def committing(capture: Any) -> Iterator[None]:
    """Runs on-commit callbacks (the key cache rewrites) as a real commit would."""
    with capture(execute=True):
        yield


def org_status(world: OrgWorld) -> str:
    return Organization.objects.get(pk=world.org.pk).status


def cached_active(world: OrgWorld) -> bool:
    raw = get_redis().get(keys.cache_key(world.admin_key.digest))
    assert raw is not None
    return keys.KeyIdentity.from_json(str(raw)).organization_active


# --- Signature: checked before anything is stored -----------------------------------------


def test_valid_event_is_stored_and_processed(billed: Billed) -> None:
    event = last_event(billed.fake, "invoice.finalized")

    response = deliver(billed.fake, event)

    assert response.status_code == 200
    assert response.json() == {"id": event["id"], "status": "processed"}
    row = StripeEvent.objects.get(id=event["id"])
    assert row.type == "invoice.finalized"
    assert row.payload == event
    assert int(row.created.timestamp()) == event["created"]
    assert row.processed_at is not None
    assert (row.attempts, row.error) == (1, "")


def _tampered(body: bytes, header: str) -> tuple[bytes, str]:
    return body.replace(b'"open"', b'"paid"'), header


def _other_secret(body: bytes, header: str) -> tuple[bytes, str]:
    return body, webhook_sign(body.decode(), secret="whsec_someone_else")


def _stale(body: bytes, header: str) -> tuple[bytes, str]:
    return body, webhook_sign(
        body.decode(), secret=WEBHOOK_SECRET, timestamp=int(time.time()) - 301
    )


def _garbage(body: bytes, header: str) -> tuple[bytes, str]:
    return body, "not-a-signature"


def _v0_only(body: bytes, header: str) -> tuple[bytes, str]:
    return body, header.replace("v1=", "v0=")


@pytest.mark.parametrize(
    "spoil",
    [_tampered, _other_secret, _stale, _garbage, _v0_only],
    ids=["tampered-body", "wrong-secret", "stale-timestamp", "garbage-header", "no-v1-scheme"],
)
def test_bad_signature_is_400_and_nothing_is_stored(
    billed: Billed, spoil: Any, django_assert_num_queries: Any
) -> None:
    body, header = billed.fake.signed(last_event(billed.fake, "invoice.finalized"))
    body, header = spoil(body, header)

    with django_assert_num_queries(0):
        response = Client().post(
            WEBHOOK_URL, data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=header
        )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_signature"
    assert StripeEvent.objects.count() == 0


def test_missing_signature_is_400(billed: Billed, django_assert_num_queries: Any) -> None:
    body, _ = billed.fake.signed(last_event(billed.fake, "invoice.finalized"))

    with django_assert_num_queries(0):
        response = Client().post(WEBHOOK_URL, data=body, content_type="application/json")

    assert response.status_code == 400
    assert "No Stripe-Signature header" in response.json()["error"]["message"]
    assert StripeEvent.objects.count() == 0


def test_signature_within_tolerance_is_accepted(billed: Billed) -> None:
    event = last_event(billed.fake, "invoice.finalized")

    response = deliver(billed.fake, event, timestamp=int(time.time()) - 290)

    assert response.status_code == 200


def test_signed_body_that_is_not_an_event_is_400(billed: Billed) -> None:
    body = json.dumps({"object": "invoice", "id": "in_1"})
    header = webhook_sign(body, secret=WEBHOOK_SECRET)

    response = Client().post(
        WEBHOOK_URL, data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=header
    )

    assert response.status_code == 400
    assert StripeEvent.objects.count() == 0


def test_webhook_is_404_when_stripe_is_not_configured(billed: Billed, settings: Any) -> None:
    settings.STRIPE_WEBHOOK_SECRET = ""

    response = deliver(billed.fake, last_event(billed.fake, "invoice.finalized"))

    assert response.status_code == 404
    assert StripeEvent.objects.count() == 0


def test_webhook_takes_only_post(billed: Billed) -> None:
    assert Client().get(WEBHOOK_URL).status_code == 405


# --- Once per event id, in any order ------------------------------------------------------


def test_replay_has_no_second_effect(billed: Billed) -> None:
    event = billed.fail()

    first = deliver(billed.fake, event)
    replay = deliver(billed.fake, event)

    assert first.json()["status"] == "processed"
    assert replay.status_code == 200
    assert replay.json()["status"] == "duplicate"
    assert StripeEvent.objects.count() == 1
    assert StripePaymentFailure.objects.count() == 1
    assert StripeEvent.objects.get(id=event["id"]).attempts == 1


def test_paid_before_finalized(billed: Billed) -> None:
    finalized = last_event(billed.fake, "invoice.finalized")
    paid = billed.pay(after_s=0)

    assert deliver(billed.fake, paid).json()["status"] == "processed"
    assert deliver(billed.fake, finalized).json()["status"] == "processed"

    billed.invoice.refresh_from_db()
    assert billed.invoice.status == Invoice.Status.PAID
    assert billed.invoice.payment_reference == f"stripe:{billed.stripe_invoice_id}"
    assert int(billed.invoice.paid_at.timestamp()) == paid["created"]  # type: ignore[union-attr]


def test_a_failure_delivered_after_the_payment_is_not_counted(billed: Billed) -> None:
    failed = billed.fail()
    paid = billed.pay()

    deliver(billed.fake, paid)
    deliver(billed.fake, failed)

    assert StripePaymentFailure.objects.count() == 0
    assert stripe_events.dunning_failures(StripeCustomer.objects.get()) == 0


def test_unknown_event_types_are_stored_and_ignored(billed: Billed) -> None:
    event = last_event(billed.fake, "customer.created")

    response = deliver(billed.fake, event)

    assert response.json()["status"] == "ignored"
    assert StripeEvent.objects.get(id=event["id"]).processed_at is not None


def test_invoices_of_other_stripe_customers_are_left_alone(billed: Billed) -> None:
    stranger = billed.fake.customer_create(organization_id="org_elsewhere", name="Elsewhere")
    pm = billed.fake.payment_method_attach("pm_card_chargeDeclined", customer_id=stranger.id)
    billed.fake.customer_set_default_payment_method(
        customer_id=stranger.id, payment_method_id=pm.id
    )
    invoice = invoice_push(billed.fake, _push_like(billed, stranger.id, number="OTHER-1"))
    billed.fake.attempt_payment(invoice.id)

    response = deliver(billed.fake, last_event(billed.fake, "invoice.payment_failed"))

    assert response.json()["status"] == "processed"
    assert StripePaymentFailure.objects.count() == 0


def _push_like(billed: Billed, customer_id: str, *, number: str) -> InvoicePush:
    return InvoicePush(
        invoice_id="inv_elsewhere",
        number=number,
        currency="usd",
        customer_id=customer_id,
        lines=(InvoiceLine(description="x", amount=billed.invoice.total),),
    )


def test_handler_failure_is_500_recorded_and_retried(
    billed: Billed, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = billed.fail()

    def unreachable(stripe_invoice_id: str) -> Any:
        raise StripeUnavailable("reading the Stripe invoice: Stripe could not be reached")

    monkeypatch.setattr(billed.fake, "invoice_retrieve", unreachable)
    response = deliver(billed.fake, event)

    assert response.status_code == 500
    assert response.json()["status"] == "failed"
    row = StripeEvent.objects.get(id=event["id"])
    assert row.processed_at is None
    assert row.attempts == 1
    assert row.error.startswith("StripeUnavailable: reading the Stripe invoice")
    assert StripePaymentFailure.objects.count() == 0

    monkeypatch.undo()
    assert stripe_events.stripe_events_retry(older_than=timedelta(0)) == 1

    row.refresh_from_db()
    assert row.processed_at is not None
    assert (row.attempts, row.error) == (2, "")
    assert StripePaymentFailure.objects.count() == 1
    assert deliver(billed.fake, event).json()["status"] == "duplicate"


# --- Dunning ------------------------------------------------------------------------------


def test_three_failures_suspend_the_organization(
    billed: Billed, django_capture_on_commit_callbacks: Any
) -> None:
    failures = [billed.fail(after_s=DAY) for _ in range(3)]

    with committing(django_capture_on_commit_callbacks):
        for event in failures[:2]:
            deliver(billed.fake, event)
    assert org_status(billed.world) == "active"
    assert not AuditLog.objects.filter(action="organization.suspended").exists()

    with committing(django_capture_on_commit_callbacks):
        deliver(billed.fake, failures[2])

    assert org_status(billed.world) == "suspended"
    assert StripeCustomer.objects.get().suspended_for_nonpayment is True
    audit = AuditLog.objects.get(action="organization.suspended")
    assert audit.organization_id == billed.world.org.id
    assert audit.metadata["reason"].startswith("3 failed Stripe payments within 30 days")
    # The gateway's cache entry for the organization's key refuses it at once.
    assert cached_active(billed.world) is False


def test_out_of_order_failures_still_suspend(
    billed: Billed, django_capture_on_commit_callbacks: Any
) -> None:
    first, second, third = (billed.fail(after_s=DAY) for _ in range(3))

    with committing(django_capture_on_commit_callbacks):
        for event in (third, first, second):
            deliver(billed.fake, event)

    assert org_status(billed.world) == "suspended"


def test_failures_spread_beyond_the_window_do_not_suspend(billed: Billed) -> None:
    for _ in range(3):
        deliver(billed.fake, billed.fail(after_s=20 * DAY))

    assert StripePaymentFailure.objects.count() == 3
    assert stripe_events.dunning_failures(StripeCustomer.objects.get()) == 2
    assert org_status(billed.world) == "active"


def test_threshold_is_configurable(billed: Billed, settings: Any) -> None:
    settings.MANTLE_DUNNING_MAX_FAILURES = 1

    deliver(billed.fake, billed.fail())

    assert org_status(billed.world) == "suspended"


def test_payment_restores_the_organization(
    billed: Billed, django_capture_on_commit_callbacks: Any
) -> None:
    with committing(django_capture_on_commit_callbacks):
        for _ in range(3):
            deliver(billed.fake, billed.fail())
    assert org_status(billed.world) == "suspended"

    with committing(django_capture_on_commit_callbacks):
        response = deliver(billed.fake, billed.pay())

    assert response.json()["status"] == "processed"
    assert org_status(billed.world) == "active"
    assert cached_active(billed.world) is True
    assert StripeCustomer.objects.get().suspended_for_nonpayment is False
    assert AuditLog.objects.filter(action="organization.reactivated").count() == 1
    billed.invoice.refresh_from_db()
    assert billed.invoice.status == Invoice.Status.PAID


def test_after_a_payment_old_failures_no_longer_count(billed: Billed) -> None:
    for _ in range(2):
        deliver(billed.fake, billed.fail())
    deliver(billed.fake, billed.pay())
    second = make_invoice(billed.world.org, number="MNT-2026-000002", month=9)
    stripe_invoice_push(invoice_id=second.id)
    billed.stripe_invoice_id = str(Invoice.objects.get(id=second.id).stripe_invoice_id)
    billed.use_card("pm_card_chargeDeclined")

    deliver(billed.fake, billed.fail())

    assert stripe_events.dunning_failures(StripeCustomer.objects.get()) == 1
    assert org_status(billed.world) == "active"


def test_a_stale_payment_does_not_lift_a_suspension(billed: Billed) -> None:
    # A first invoice paid long ago; its invoice.paid is delivered only after the
    # failures of a second invoice suspended the organization.
    old_paid = billed.pay()
    second = make_invoice(billed.world.org, number="MNT-2026-000002", month=9)
    stripe_invoice_push(invoice_id=second.id)
    billed.stripe_invoice_id = str(Invoice.objects.get(id=second.id).stripe_invoice_id)
    billed.use_card("pm_card_chargeDeclined")
    for _ in range(3):
        deliver(billed.fake, billed.fail())
    assert org_status(billed.world) == "suspended"

    deliver(billed.fake, old_paid)

    assert org_status(billed.world) == "suspended"


def test_payment_does_not_lift_an_operators_suspension(
    billed: Billed, django_capture_on_commit_callbacks: Any
) -> None:
    services.organization_set_status(
        principal=SYSTEM, org=billed.world.org, status="suspended", reason="abuse report"
    )
    for _ in range(3):
        deliver(billed.fake, billed.fail())
    assert StripeCustomer.objects.get().suspended_for_nonpayment is False

    deliver(billed.fake, billed.pay())

    assert org_status(billed.world) == "suspended"
    assert not AuditLog.objects.filter(action="organization.reactivated").exists()


def test_an_operators_reactivation_holds_until_the_next_failure(billed: Billed) -> None:
    for _ in range(3):
        deliver(billed.fake, billed.fail())
    services.organization_set_status(
        principal=SYSTEM, org=billed.world.org, status="active", reason="promised to pay"
    )
    second = make_invoice(billed.world.org, number="MNT-2026-000002", month=9)
    stripe_invoice_push(invoice_id=second.id)

    deliver(billed.fake, last_event(billed.fake, "invoice.finalized"))
    assert org_status(billed.world) == "active"

    deliver(billed.fake, billed.fail())
    assert org_status(billed.world) == "suspended"


# --- Payment methods ----------------------------------------------------------------------


def test_completed_setup_becomes_the_default_payment_method(billed: Billed) -> None:
    session = billed.fake.checkout_setup_session_create(
        customer_id=billed.customer_id,
        currency="usd",
        success_url="https://mantle.test/ok",
        cancel_url="https://mantle.test/no",
    )
    pm_id = billed.fake.checkout_complete(session.id, card="pm_card_mastercard")

    response = deliver(billed.fake, last_event(billed.fake, "setup_intent.succeeded"))

    assert response.json()["status"] == "processed"
    customer = billed.fake.customer_retrieve(billed.customer_id)
    assert customer.default_payment_method_id == pm_id
    assert billed.fake.attempt_payment(billed.stripe_invoice_id) is True
