"""The in-memory Stripe keeps the documented rules the billing flows rely on."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from billing.payments.stripe_client import webhook_verify
from billing.payments.stripe_fake import IDEMPOTENCY_TTL_S, FakeStripe
from billing.payments.stripe_sync import stripe_backend_reset
from billing.payments.stripe_types import (
    InvoiceLine,
    InvoicePush,
    StripeBackend,
    StripeCardDeclined,
    StripeIdempotencyConflict,
    StripeInvalidRequest,
    StripeObjectMissing,
    TopUpCharge,
    invoice_push,
)

SECRET = "whsec_fake_tests"
HOUR = datetime(2026, 11, 21, 13, tzinfo=UTC)


@pytest.fixture
def fake() -> FakeStripe:
    return FakeStripe(webhook_secret=SECRET, start=HOUR.timestamp() + 3 * 3600)


def push_for(customer_id: str, *, amounts: tuple[str, ...] = ("10.00", "2.50")) -> InvoicePush:
    return InvoicePush(
        invoice_id="inv_1",
        number="MNT-1",
        currency="USD",
        customer_id=customer_id,
        lines=tuple(
            InvoiceLine(description=f"line {i}", amount=Decimal(a)) for i, a in enumerate(amounts)
        ),
    )


def open_invoice(fake: FakeStripe, amounts: tuple[str, ...] = ("10.00",)) -> str:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    return invoice_push(fake, push_for(customer.id, amounts=amounts)).id


def test_fake_is_a_stripe_backend(fake: FakeStripe) -> None:
    backend: StripeBackend = fake  # mypy checks billing.payments.stripe_sync._build the same way
    assert backend.customer_create(organization_id="org_1", name="Acme").id.startswith("cus_")


# --- Idempotency --------------------------------------------------------------------------


def test_same_key_same_params_gives_the_same_object(fake: FakeStripe) -> None:
    first = fake.customer_create(organization_id="org_1", name="Acme")
    again = fake.customer_create(organization_id="org_1", name="Acme")

    assert again == first
    assert len(fake.customers) == 1
    assert len(fake.events_of("customer.created")) == 1


def test_same_key_other_params_is_an_error(fake: FakeStripe) -> None:
    fake.customer_create(organization_id="org_1", name="Acme")

    with pytest.raises(StripeIdempotencyConflict, match="same parameters"):
        fake.customer_create(organization_id="org_1", name="Acme Renamed")

    assert len(fake.customers) == 1


def test_keys_are_forgotten_after_24_hours(fake: FakeStripe) -> None:
    fake.customer_create(organization_id="org_1", name="Acme")
    fake.advance(IDEMPOTENCY_TTL_S + 1)

    fake.customer_create(organization_id="org_1", name="Acme")

    assert len(fake.customers) == 2  # which is why our push also records the draft's id


def test_push_twice_makes_one_invoice(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    push = push_for(customer.id)

    first = invoice_push(fake, push)
    second = invoice_push(fake, push)

    assert second.id == first.id
    assert len(fake.invoices) == 1
    assert len(fake.invoice_items) == 2
    assert fake.invoices[first.id]["total"] == 1250


def test_resumed_push_after_24_hours_adds_only_missing_lines(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    push = push_for(customer.id, amounts=("1.00", "2.00", "3.00"))
    draft = fake.invoice_draft_create(push)
    # Add line 0 only, as a push that crashed after its first item would have.
    fake._invoice_item_create(
        key="mantle-invoice-inv_1-line-0",
        customer_id=customer.id,
        invoice_id=draft.id,
        currency="usd",
        amount=100,
        description="line 0",
        metadata={"mantle_invoice_id": "inv_1", "mantle_line_index": "0"},
    )
    fake.advance(IDEMPOTENCY_TTL_S + 1)

    done = fake.invoice_complete(replace(push, stripe_invoice_id=draft.id))

    assert done.status == "open"
    assert done.total == 600
    assert len(fake.invoice_items) == 3


# --- Invoice state machine ----------------------------------------------------------------


def test_finalize_opens_and_payment_pays(fake: FakeStripe) -> None:
    invoice_id = open_invoice(fake)
    assert fake.invoice_retrieve(invoice_id).status == "open"

    fake.pay_invoice(invoice_id)

    paid = fake.invoice_retrieve(invoice_id)
    assert (paid.status, paid.amount_paid, paid.paid_at) == ("paid", 1000, fake.now())
    assert [e["type"] for e in fake.events if e["type"].startswith("invoice.")] == [
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
    ]


@pytest.mark.parametrize(
    ("prepare", "action"),
    [
        ("pay_invoice", "pay_invoice"),  # paid → paid
        ("pay_invoice", "void_invoice"),  # paid → void
        ("void_invoice", "pay_invoice"),  # void → paid
        ("void_invoice", "mark_uncollectible"),  # void → uncollectible
        ("mark_uncollectible", "mark_uncollectible"),
    ],
)
def test_forbidden_transitions(fake: FakeStripe, prepare: str, action: str) -> None:
    invoice_id = open_invoice(fake)
    getattr(fake, prepare)(invoice_id)
    before = fake.invoice_retrieve(invoice_id)
    events = len(fake.events)

    with pytest.raises(StripeInvalidRequest, match="cannot"):
        getattr(fake, action)(invoice_id)

    assert fake.invoice_retrieve(invoice_id) == before
    assert len(fake.events) == events


@pytest.mark.parametrize("then", ["pay_invoice", "void_invoice"])
def test_uncollectible_can_still_be_paid_or_voided(fake: FakeStripe, then: str) -> None:
    invoice_id = open_invoice(fake)
    fake.mark_uncollectible(invoice_id)

    getattr(fake, then)(invoice_id)

    assert fake.invoice_retrieve(invoice_id).status in ("paid", "void")


def test_draft_cannot_be_paid(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    draft = fake.invoice_draft_create(push_for(customer.id))

    with pytest.raises(StripeInvalidRequest, match="draft"):
        fake.pay_invoice(draft.id)


def test_items_only_on_drafts(fake: FakeStripe) -> None:
    invoice_id = open_invoice(fake)

    with pytest.raises(StripeInvalidRequest, match="only be added to a draft"):
        fake._invoice_item_create(
            key="other",
            customer_id=fake.invoice_retrieve(invoice_id).customer_id,
            invoice_id=invoice_id,
            currency="usd",
            amount=1,
            description="late",
            metadata={},
        )


def test_zero_amount_due_is_paid_on_finalization(fake: FakeStripe) -> None:
    invoice_id = open_invoice(fake, amounts=("5.00", "-5.00"))

    assert fake.invoice_retrieve(invoice_id).status == "paid"


def test_invoice_numbers_are_unique(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    fake.invoice_draft_create(push_for(customer.id))

    with pytest.raises(StripeInvalidRequest, match="already in use"):
        fake.invoice_draft_create(replace(push_for(customer.id), invoice_id="inv_2"))


# --- Payment methods and collection -------------------------------------------------------


def test_setup_attaches_a_card_and_collection_charges_the_default(fake: FakeStripe) -> None:
    invoice_id = open_invoice(fake)
    customer_id = fake.invoice_retrieve(invoice_id).customer_id
    intent = fake.setup_intent_create(customer_id=customer_id)
    pm_id = fake.setup_intent_succeed(intent.id)
    assert [pm.id for pm in fake.payment_methods_list(customer_id=customer_id)] == [pm_id]
    assert fake.setup_intent_retrieve(intent.id) == (
        replace(intent, status="succeeded"),
        pm_id,
    )

    assert fake.attempt_payment(invoice_id) is False  # no default payment method yet
    fake.customer_set_default_payment_method(customer_id=customer_id, payment_method_id=pm_id)
    assert fake.attempt_payment(invoice_id) is True

    assert fake.invoice_retrieve(invoice_id).status == "paid"
    assert len(fake.events_of("invoice.payment_failed")) == 1


def test_declined_card_leaves_the_invoice_open(fake: FakeStripe) -> None:
    invoice_id = open_invoice(fake)
    customer_id = fake.invoice_retrieve(invoice_id).customer_id
    pm = fake.payment_method_attach("pm_card_chargeDeclined", customer_id=customer_id)
    fake.customer_set_default_payment_method(customer_id=customer_id, payment_method_id=pm.id)

    assert fake.attempt_payment(invoice_id) is False
    assert fake.attempt_payment(invoice_id) is False

    assert fake.invoice_retrieve(invoice_id).status == "open"
    assert fake.invoices[invoice_id]["attempt_count"] == 2
    assert len(fake.events_of("invoice.payment_failed")) == 2


def test_default_payment_method_must_belong_to_the_customer(fake: FakeStripe) -> None:
    mine = fake.customer_create(organization_id="org_1", name="Acme")
    theirs = fake.customer_create(organization_id="org_2", name="Globex")
    pm = fake.payment_method_attach("pm_card_visa", customer_id=theirs.id)

    with pytest.raises(StripeInvalidRequest, match="not attached"):
        fake.customer_set_default_payment_method(customer_id=mine.id, payment_method_id=pm.id)


def test_unknown_objects_are_missing(fake: FakeStripe) -> None:
    with pytest.raises(StripeObjectMissing, match="No such invoice"):
        fake.invoice_retrieve("in_nope")


# --- Meter events -------------------------------------------------------------------------


def test_meter_events_are_deduplicated_by_identifier(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    send = {"customer_id": customer.id, "model": "m", "kind": "input", "hour": HOUR}

    fake.meter_event_send(**send, quantity=1000)
    fake.meter_event_send(**send, quantity=1000)
    fake.meter_event_send(customer_id=customer.id, model="m", kind="output", hour=HOUR, quantity=7)

    assert fake.meter_total(customer_id=customer.id, model="m", kind="input") == 1000
    assert fake.meter_total(customer_id=customer.id, model="m", kind="output") == 7
    with pytest.raises(StripeIdempotencyConflict):
        fake.meter_event_send(**send, quantity=2000)


def test_meter_events_older_than_35_days_are_refused(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    fake.advance(36 * 86400)

    with pytest.raises(StripeInvalidRequest, match="timestamp"):
        fake.meter_event_send(
            customer_id=customer.id, model="m", kind="input", hour=HOUR, quantity=1
        )


# --- Webhook events -----------------------------------------------------------------------


def test_events_are_signed_like_stripes(fake: FakeStripe) -> None:
    open_invoice(fake)
    event = fake.events_of("invoice.finalized")[0]

    body, header = fake.signed(event)
    verified = webhook_verify(body, header, secret=SECRET, tolerance_s=10**10)

    assert (verified.id, verified.type, verified.object_type) == (
        event["id"],
        "invoice.finalized",
        "invoice",
    )
    assert verified.payload["data"]["object"]["status"] == "open"  # a snapshot of that moment


# --- Checkout payments and PaymentIntents (top-ups) -----------------------------------------


def charge_for(customer_id: str, *, amount: int = 2500, topup_id: str = "topup_1") -> TopUpCharge:
    return TopUpCharge(
        organization_id="org_1",
        topup_id=topup_id,
        customer_id=customer_id,
        amount=amount,
        currency="USD",
        description="credit",
    )


def saved_card(fake: FakeStripe, customer_id: str, card: str = "pm_card_visa") -> str:
    return fake.payment_method_attach(card, customer_id=customer_id).id


def test_checkout_payment_session_is_idempotent_on_the_top_up(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    first = fake.checkout_payment_session_create(
        charge_for(customer.id), success_url="https://x/ok", cancel_url="https://x/no"
    )
    again = fake.checkout_payment_session_create(
        charge_for(customer.id), success_url="https://x/ok", cancel_url="https://x/no"
    )

    assert again == first
    assert len(fake.checkout_sessions) == 1
    with pytest.raises(StripeIdempotencyConflict):
        fake.checkout_payment_session_create(
            charge_for(customer.id, amount=9900),
            success_url="https://x/ok",
            cancel_url="https://x/no",
        )


@pytest.mark.parametrize("amount", [49, 100_000_000])
def test_charges_outside_stripes_limits_are_refused(fake: FakeStripe, amount: int) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    pm = saved_card(fake, customer.id)

    with pytest.raises(StripeInvalidRequest):
        fake.checkout_payment_session_create(
            charge_for(customer.id, amount=amount), success_url="https://x", cancel_url="https://x"
        )
    with pytest.raises(StripeInvalidRequest):
        fake.payment_intent_charge_off_session(
            charge_for(customer.id, amount=amount), payment_method_id=pm, idempotency_key="k"
        )
    assert fake.checkout_sessions == {} and fake.payment_intents == {}


def test_completing_a_payment_session_pays_it_once_with_a_receipt(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    session = fake.checkout_payment_session_create(
        charge_for(customer.id),
        success_url="https://x/ok?checkout={CHECKOUT_SESSION_ID}",
        cancel_url="https://x/no",
    )

    fake.checkout_complete(session.id)

    paid = fake.checkout_session_retrieve(session.id)
    assert (paid.status, paid.payment_status, paid.url) == ("complete", "paid", None)
    assert paid.payment_intent_id is not None
    intent = fake.payment_intent_retrieve(paid.payment_intent_id)
    assert (intent.status, intent.amount, intent.topup_id) == ("succeeded", 2500, "topup_1")
    assert intent.receipt_url is not None
    assert fake.checkout_success_url(session.id) == f"https://x/ok?checkout={session.id}"
    event = fake.events_of("checkout.session.completed")[-1]["data"]["object"]
    assert (event["payment_intent"], event["payment_status"]) == (intent.id, "paid")
    # The card paid once and was not saved to the customer.
    assert fake.payment_methods_list(customer_id=customer.id) == ()
    with pytest.raises(StripeInvalidRequest):
        fake.checkout_complete(session.id)


def test_an_expired_session_cannot_be_paid(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    session = fake.checkout_payment_session_create(
        charge_for(customer.id), success_url="https://x", cancel_url="https://x"
    )

    fake.checkout_expire(session.id)

    assert fake.checkout_session_retrieve(session.id).status == "expired"
    assert fake.events_of("checkout.session.expired")
    with pytest.raises(StripeInvalidRequest):
        fake.checkout_complete(session.id)


def test_an_off_session_decline_keeps_the_intent_and_is_replayed_under_its_key(
    fake: FakeStripe,
) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    pm = saved_card(fake, customer.id, "pm_card_chargeDeclinedInsufficientFunds")

    with pytest.raises(StripeCardDeclined) as first:
        fake.payment_intent_charge_off_session(
            charge_for(customer.id), payment_method_id=pm, idempotency_key="k1"
        )
    with pytest.raises(StripeCardDeclined) as again:
        fake.payment_intent_charge_off_session(
            charge_for(customer.id), payment_method_id=pm, idempotency_key="k1"
        )

    assert first.value.decline_code == "insufficient_funds"
    assert again.value.payment_intent_id == first.value.payment_intent_id
    assert len(fake.payment_intents) == 1
    intent = fake.payment_intent_retrieve(first.value.payment_intent_id or "")
    assert (intent.status, intent.failure_code) == ("requires_payment_method", "insufficient_funds")
    assert len(fake.events_of("payment_intent.payment_failed")) == 1


def test_an_off_session_charge_needs_a_method_of_that_customer(fake: FakeStripe) -> None:
    ours = fake.customer_create(organization_id="org_1", name="Acme")
    theirs = fake.customer_create(organization_id="org_2", name="Globex")
    pm = saved_card(fake, theirs.id)

    with pytest.raises(StripeInvalidRequest) as caught:
        fake.payment_intent_charge_off_session(
            charge_for(ours.id), payment_method_id=pm, idempotency_key="k"
        )

    assert caught.value.param == "payment_method"
    assert fake.payment_intents == {}


def test_an_off_session_charge_succeeds_once_per_key(fake: FakeStripe) -> None:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    pm = saved_card(fake, customer.id)

    first = fake.payment_intent_charge_off_session(
        charge_for(customer.id), payment_method_id=pm, idempotency_key="k"
    )
    again = fake.payment_intent_charge_off_session(
        charge_for(customer.id), payment_method_id=pm, idempotency_key="k"
    )

    assert again.id == first.id and first.status == "succeeded"
    assert len(fake.events_of("payment_intent.succeeded")) == 1


def test_the_hosted_page_is_not_served_unless_the_fake_is_the_backend(
    client: Any, settings: Any
) -> None:
    settings.MANTLE_STRIPE_BACKEND = "stripe"
    settings.STRIPE_API_KEY = ""
    stripe_backend_reset()

    assert client.get("/billing/stripe/fake-checkout/cs_test_1").status_code == 404


# --- Refunds and disputes of a charge -----------------------------------------------------


def paid_charge(fake: FakeStripe, amount: int = 2500) -> str:
    customer = fake.customer_create(organization_id="org_1", name="Acme")
    intent = fake.payment_intent_charge_off_session(
        charge_for(customer.id, amount=amount),
        payment_method_id=saved_card(fake, customer.id),
        idempotency_key="k-charge",
    )
    return str(fake.payment_intents[intent.id]["latest_charge"])


def test_partial_then_full_refund_of_a_charge(fake: FakeStripe) -> None:
    charge_id = paid_charge(fake, 2500)

    first = fake.charge_refund(charge_id, amount=1000)
    partial = fake.charge_retrieve(charge_id)
    second = fake.charge_refund(charge_id)  # what is left
    full = fake.charge_retrieve(charge_id)

    assert (partial.amount_refunded, partial.refunded) == (1000, False)
    assert (full.amount_refunded, full.refunded) == (2500, True)
    assert [(r.id, r.amount, r.status) for r in full.refunds] == [
        (first, 1000, "succeeded"),
        (second, 1500, "succeeded"),
    ]
    events = fake.events_of("charge.refunded")
    assert [e["data"]["object"]["amount_refunded"] for e in events] == [1000, 2500]
    assert events[0]["data"]["object"]["id"] == charge_id
    assert "refund_ids" not in events[0]["data"]["object"]  # `refunds` is expandable only
    assert [e["data"]["object"]["id"] for e in fake.events_of("refund.created")] == [first, second]


@pytest.mark.parametrize("amount", [0, -5, 2501])
def test_a_refund_beyond_the_charge_or_not_positive_is_refused(
    fake: FakeStripe, amount: int
) -> None:
    charge_id = paid_charge(fake, 2500)

    with pytest.raises(StripeInvalidRequest) as caught:
        fake.charge_refund(charge_id, amount=amount)

    assert caught.value.param == "amount"
    assert fake.charge_retrieve(charge_id).amount_refunded == 0
    assert fake.events_of("charge.refunded") == []


def test_a_fully_refunded_charge_cannot_be_refunded_again(fake: FakeStripe) -> None:
    charge_id = paid_charge(fake)
    fake.charge_refund(charge_id)

    with pytest.raises(StripeInvalidRequest):
        fake.charge_refund(charge_id, amount=1)


def test_a_dispute_opens_on_the_charge_and_closes_once(fake: FakeStripe) -> None:
    charge_id = paid_charge(fake, 2500)
    fake.charge_refund(charge_id, amount=500)

    dispute_id = fake.dispute_open(charge_id, reason="fraudulent")
    opened = fake.dispute_retrieve(dispute_id)
    fake.dispute_close(dispute_id, won=False)

    assert (opened.charge_id, opened.amount, opened.status, opened.reason) == (
        charge_id,
        2000,  # what was left unrefunded
        "needs_response",
        "fraudulent",
    )
    assert fake.charge_retrieve(charge_id).disputed is True
    assert fake.dispute_retrieve(dispute_id).status == "lost"
    created = fake.events_of("charge.dispute.created")
    closed = fake.events_of("charge.dispute.closed")
    assert [e["data"]["object"]["status"] for e in created + closed] == ["needs_response", "lost"]
    assert created[0]["data"]["object"]["object"] == "dispute"
    with pytest.raises(StripeInvalidRequest):
        fake.dispute_close(dispute_id, won=True)  # decided already
    with pytest.raises(StripeInvalidRequest):
        fake.dispute_open(charge_id)  # one dispute per charge


def test_a_disputed_charge_cannot_be_refunded(fake: FakeStripe) -> None:
    charge_id = paid_charge(fake)
    fake.dispute_open(charge_id)

    with pytest.raises(StripeInvalidRequest) as caught:
        fake.charge_refund(charge_id)

    assert "charged back" in caught.value.message


def test_unknown_charges_and_disputes_are_missing(fake: FakeStripe) -> None:
    with pytest.raises(StripeObjectMissing):
        fake.charge_retrieve("ch_nope")
    with pytest.raises(StripeObjectMissing):
        fake.dispute_retrieve("dp_nope")
    with pytest.raises(StripeObjectMissing):
        fake.charge_refund("ch_nope")
