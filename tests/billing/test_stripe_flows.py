"""Billing flows against the in-memory Stripe: customers, invoice push, payment setup, meters."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from accounts.permissions import Role
from billing.models import Invoice, Price, StripeCustomer, UsageRollup
from billing.payments import stripe_sync
from billing.payments import tasks as stripe_tasks
from billing.payments.stripe_fake import IDEMPOTENCY_TTL_S, FakeStripe
from billing.payments.stripe_types import StripeDisabled, StripeUnavailable
from catalog.models import Model
from core.errors import Conflict, InvalidInput
from tests.billing.stripe_support import deliver, last_event, make_invoice, use_fake_stripe
from tests.conftest import OrgWorld
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def fake(settings: Any) -> FakeStripe:
    return use_fake_stripe(settings)


def test_without_a_key_stripe_is_disabled(world: OrgWorld, settings: Any) -> None:
    settings.MANTLE_STRIPE_BACKEND = "stripe"
    settings.STRIPE_API_KEY = ""
    invoice = make_invoice(world.org)

    assert stripe_sync.stripe_backend() is None
    with pytest.raises(StripeDisabled) as caught:
        stripe_sync.stripe_customer_ensure(org=world.org)
    assert caught.value.status == 503
    stripe_tasks.stripe_push_invoice.apply(args=[invoice.id]).get()  # a quiet no-op

    assert not StripeCustomer.objects.exists()
    invoice.refresh_from_db()
    assert invoice.stripe_invoice_id is None


def test_with_a_key_the_real_adapter_is_used(settings: Any) -> None:
    from billing.payments.stripe_client import StripeApi

    settings.MANTLE_STRIPE_BACKEND = "stripe"
    settings.STRIPE_API_KEY = "sk_test_configured"
    stripe_sync.stripe_backend_reset()

    backend = stripe_sync.stripe_backend()

    assert isinstance(backend, StripeApi)
    assert stripe_sync.stripe_backend() is backend  # built once, its HTTP session reused


# --- Customers ----------------------------------------------------------------------------


def test_customer_is_created_once(world: OrgWorld, fake: FakeStripe) -> None:
    first = stripe_sync.stripe_customer_ensure(org=world.org)
    again = stripe_sync.stripe_customer_ensure(org=world.org)

    assert again.stripe_customer_id == first.stripe_customer_id
    assert len(fake.customers) == 1
    customer = fake.customers[first.stripe_customer_id]
    assert customer["metadata"] == {"mantle_organization_id": world.org.id}
    assert customer["name"] == world.org.name
    assert customer["email"] == world.users[Role.OWNER].email


def test_lost_row_finds_the_same_customer_within_a_day(world: OrgWorld, fake: FakeStripe) -> None:
    first = stripe_sync.stripe_customer_ensure(org=world.org)
    StripeCustomer.objects.all().delete()

    again = stripe_sync.stripe_customer_ensure(org=world.org)

    assert again.stripe_customer_id == first.stripe_customer_id  # the idempotency key
    assert len(fake.customers) == 1


# --- Invoice push -------------------------------------------------------------------------


def test_push_twice_makes_one_stripe_invoice(world: OrgWorld, fake: FakeStripe) -> None:
    invoice = make_invoice(world.org, amounts=("12.34", "5.66"), credits_applied="3.00")

    first = stripe_sync.stripe_invoice_push(invoice_id=invoice.id)
    second = stripe_sync.stripe_invoice_push(invoice_id=invoice.id)

    assert second.id == first.id
    assert len(fake.invoices) == 1
    stripe_invoice = fake.invoices[first.id]
    assert [(i["description"], i["amount"]) for i in stripe_invoice["lines"]] == [
        ("mantle-chat-small line 0", 1234),
        ("mantle-chat-small line 1", 566),
        ("Credits applied", -300),
    ]
    assert stripe_invoice["total"] == 1500 == int(invoice.total * 100)
    assert stripe_invoice["lines"][0]["metadata"] == {
        "kind": "usage",
        "model": "mantle-chat-small",
        "token_kind": "input",
        "tokens": "1000000",
        "unit_price_per_million": "12.340000000",
        "mantle_invoice_id": invoice.id,
        "mantle_line_index": "0",
    }
    assert stripe_invoice["lines"][2]["metadata"] == {
        "mantle_invoice_id": invoice.id,
        "mantle_line_index": "2",
    }
    assert stripe_invoice["number"] == invoice.number
    assert stripe_invoice["metadata"]["mantle_invoice_id"] == invoice.id
    assert first.status == "open"
    invoice.refresh_from_db()
    assert invoice.stripe_invoice_id == first.id
    assert invoice.status == Invoice.Status.FINALIZED  # paid only when Stripe says so


def test_interrupted_push_resumes_its_draft_after_keys_expire(
    world: OrgWorld, fake: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    invoice = make_invoice(world.org, amounts=("1.00", "2.00", "3.00"))
    real_complete = fake.invoice_complete
    calls = {"n": 0}

    def crash_after_first_line(push: Any) -> Any:
        calls["n"] += 1
        # Line 0 goes in, then Stripe becomes unreachable.
        fake._invoice_item_create(
            key="mantle-invoice-" + invoice.id + "-line-0",
            customer_id=push.customer_id,
            invoice_id=push.stripe_invoice_id,
            currency="usd",
            amount=100,
            description="mantle-chat-small line 0",
            metadata={"mantle_invoice_id": invoice.id, "mantle_line_index": "0"},
        )
        raise StripeUnavailable("adding line 1: Stripe could not be reached")

    monkeypatch.setattr(fake, "invoice_complete", crash_after_first_line)
    with pytest.raises(StripeUnavailable):
        stripe_sync.stripe_invoice_push(invoice_id=invoice.id)
    invoice.refresh_from_db()
    draft_id = invoice.stripe_invoice_id
    assert draft_id is not None  # recorded before any line was added

    monkeypatch.setattr(fake, "invoice_complete", real_complete)
    fake.advance(IDEMPOTENCY_TTL_S + 3600)  # Stripe has forgotten every key by now
    pushed = stripe_sync.stripe_invoice_push(invoice_id=invoice.id)

    assert pushed.id == draft_id
    assert len(fake.invoices) == 1
    assert len(fake.invoice_items) == 3
    assert pushed.total == 600


@pytest.mark.parametrize("status", [Invoice.Status.DRAFT, Invoice.Status.VOID])
def test_only_finalized_invoices_are_pushed(world: OrgWorld, fake: FakeStripe, status: str) -> None:
    invoice = make_invoice(world.org, status=status)

    with pytest.raises(Conflict, match="only finalized"):
        stripe_sync.stripe_invoice_push(invoice_id=invoice.id)

    assert fake.invoices == {}
    assert fake.customers == {}


def test_lines_that_do_not_add_up_are_refused_before_stripe(
    world: OrgWorld, fake: FakeStripe
) -> None:
    invoice = make_invoice(world.org)
    Invoice.objects.filter(id=invoice.id).update(total=Decimal("99.99"))

    with pytest.raises(InvalidInput, match="do not add up"):
        stripe_sync.stripe_invoice_push(invoice_id=invoice.id)

    assert fake.requests == []
    assert Invoice.objects.get(id=invoice.id).stripe_invoice_id is None


def test_push_task(world: OrgWorld, fake: FakeStripe) -> None:
    invoice = make_invoice(world.org)

    stripe_tasks.stripe_push_invoice.apply(args=[invoice.id]).get()
    stripe_tasks.stripe_push_invoice.apply(args=[invoice.id]).get()  # a redelivery

    assert len(fake.invoices) == 1
    assert Invoice.objects.get(id=invoice.id).stripe_invoice_id in fake.invoices


def test_pending_invoices_are_swept_into_stripe(world: OrgWorld, fake: FakeStripe) -> None:
    recent = make_invoice(world.org, number="MNT-2026-000001", month=10)
    old = make_invoice(world.org, number="MNT-2026-000002", month=9)
    Invoice.objects.filter(id=old.id).update(finalized_at=timezone.now() - timedelta(days=30))
    Invoice.objects.filter(id=recent.id).update(finalized_at=timezone.now())
    nothing_due = make_invoice(world.org, number="MNT-2026-000003", month=8, amounts=("0",))
    Invoice.objects.filter(id=nothing_due.id).update(finalized_at=timezone.now())

    assert stripe_tasks.stripe_push_pending_invoices.apply().get() == 1
    assert stripe_tasks.stripe_push_pending_invoices.apply().get() == 0  # pushed already

    assert len(fake.invoices) == 1
    assert Invoice.objects.get(id=recent.id).stripe_invoice_id in fake.invoices
    assert Invoice.objects.get(id=old.id).stripe_invoice_id is None


def test_zero_total_invoice_is_paid_by_stripe_at_once(world: OrgWorld, fake: FakeStripe) -> None:
    invoice = make_invoice(world.org, amounts=("4.00",), credits_applied="4.00")

    pushed = stripe_sync.stripe_invoice_push(invoice_id=invoice.id)
    deliver(fake, last_event(fake, "invoice.paid"))

    assert pushed.status == "paid"
    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID


# --- Payment methods, end to end ----------------------------------------------------------


def test_checkout_setup_then_automatic_collection(world: OrgWorld, fake: FakeStripe) -> None:
    session = stripe_sync.stripe_checkout_setup(
        org=world.org, success_url="https://mantle.test/ok", cancel_url="https://mantle.test/no"
    )
    assert session.url.startswith("https://checkout.stripe.com/")
    pm_id = fake.checkout_complete(session.id)
    deliver(fake, last_event(fake, "setup_intent.succeeded"))
    assert [pm.id for pm in stripe_sync.stripe_payment_methods(org=world.org)] == [pm_id]

    invoice = make_invoice(world.org)
    pushed = stripe_sync.stripe_invoice_push(invoice_id=invoice.id)
    assert fake.attempt_payment(pushed.id) is True  # Stripe's auto_advance collection
    deliver(fake, last_event(fake, "invoice.paid"))

    invoice.refresh_from_db()
    assert invoice.status == Invoice.Status.PAID
    assert invoice.payment_reference == f"stripe:{pushed.id}"


def test_setup_intent_for_the_console(world: OrgWorld, fake: FakeStripe) -> None:
    intent = stripe_sync.stripe_setup_intent(org=world.org)

    assert intent.client_secret.startswith(intent.id + "_secret_")
    assert fake.setup_intents[intent.id]["customer"] == (
        StripeCustomer.objects.get(organization=world.org).stripe_customer_id
    )


def test_payment_methods_of_an_organization_without_customer(
    world: OrgWorld, fake: FakeStripe
) -> None:
    assert stripe_sync.stripe_payment_methods(org=world.org) == ()
    assert fake.customers == {}


# --- Meter events -------------------------------------------------------------------------


def _rollup(org_id: str, model: str, hour: Any, tokens_in: int, tokens_out: int, key: str) -> None:
    UsageRollup.objects.create(
        organization_id=org_id,
        project_id="proj_x",
        api_key_id=key,
        endpoint_id="ep-x",
        model_name=model,
        hour=hour,
        requests=1,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
    )


def test_meter_hour_push_is_exact_and_repeatable(world: OrgWorld, fake: FakeStripe) -> None:
    other = OrganizationFactory(name="Globex")
    hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    _rollup(world.org.id, "chat", hour, 1_000, 200, key="k1")
    _rollup(world.org.id, "chat", hour, 5_000_000_000, 7, key="k2")  # 64-bit sums
    _rollup(world.org.id, "embed", hour, 300, 0, key="k1")
    _rollup(other.id, "chat", hour, 10, 20, key="k3")
    _rollup(world.org.id, "chat", hour - timedelta(hours=1), 999, 999, key="k1")  # not this hour

    sent = stripe_sync.stripe_meter_push_hour(hour=hour)
    again = stripe_sync.stripe_meter_push_hour(hour=hour + timedelta(minutes=30))

    assert sent == again == 5  # zero quantities are not sent
    mine = StripeCustomer.objects.get(organization=world.org).stripe_customer_id
    theirs = StripeCustomer.objects.get(organization=other).stripe_customer_id
    assert fake.meter_total(customer_id=mine, model="chat", kind="input") == 5_000_001_000
    assert fake.meter_total(customer_id=mine, model="chat", kind="output") == 207
    assert fake.meter_total(customer_id=mine, model="embed", kind="input") == 300
    assert fake.meter_total(customer_id=theirs, model="chat", kind="output") == 20
    assert len(fake.meter_events) == 5


def test_meter_hour_push_sends_a_tensor_models_requests_and_compute(
    world: OrgWorld, fake: FakeStripe
) -> None:
    Model.objects.create(name="ranker", kind=Model.Kind.TENSOR, context_length=0)
    hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    UsageRollup.objects.create(
        organization_id=world.org.id,
        project_id="proj_x",
        api_key_id="k1",
        endpoint_id="ep-x",
        model_name="ranker",
        hour=hour,
        requests=3,
        compute_ms=1_234,
    )

    assert stripe_sync.stripe_meter_push_hour(hour=hour) == 2

    mine = StripeCustomer.objects.get(organization=world.org).stripe_customer_id
    assert fake.meter_total(customer_id=mine, model="ranker", kind="request") == 3
    assert fake.meter_total(customer_id=mine, model="ranker", kind="compute_ms") == 1_234


def test_meter_hour_push_sends_cached_input_tokens_apart_only_where_they_are_priced(
    world: OrgWorld, fake: FakeStripe
) -> None:
    # "chat" prices cached input tokens, "chat-plain" does not: its are input tokens.
    for model in ("chat", "chat-plain"):
        Model.objects.create(name=model, kind=Model.Kind.CHAT, context_length=2048)
        for kind, price in (("input", "1"), ("output", "2")):
            Price.objects.create(
                model_name=model, token_kind=kind, unit_price=Decimal(price),
                effective_from=timezone.now() - timedelta(days=1),
            )  # fmt: skip
    Price.objects.create(
        model_name="chat", token_kind="cached_input", unit_price=Decimal("0.5"),
        effective_from=timezone.now() - timedelta(days=1),
    )  # fmt: skip
    hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    for model in ("chat", "chat-plain"):
        UsageRollup.objects.create(
            organization_id=world.org.id, project_id="proj_x", api_key_id="k1",
            endpoint_id="ep-x", model_name=model, hour=hour, requests=1, input_tokens=1_000,
            cached_input_tokens=600, output_tokens=7,
        )  # fmt: skip

    assert stripe_sync.stripe_meter_push_hour(hour=hour) == 5

    mine = StripeCustomer.objects.get(organization=world.org).stripe_customer_id
    totals = {
        (model, kind): fake.meter_total(customer_id=mine, model=model, kind=kind)
        for model in ("chat", "chat-plain")
        for kind in ("input", "cached_input", "output")
    }
    assert totals == {
        ("chat", "input"): 400,
        ("chat", "cached_input"): 600,
        ("chat", "output"): 7,
        ("chat-plain", "input"): 1_000,
        ("chat-plain", "cached_input"): 0,
        ("chat-plain", "output"): 7,
    }


def test_meter_push_refuses_an_open_hour(world: OrgWorld, fake: FakeStripe) -> None:
    with pytest.raises(InvalidInput, match="closed hour"):
        stripe_sync.stripe_meter_push_hour(hour=timezone.now())

    assert fake.meter_events == {}


def test_meter_task_runs_only_in_meter_mode(
    world: OrgWorld, fake: FakeStripe, settings: Any
) -> None:
    hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    _rollup(world.org.id, "chat", hour, 10, 10, key="k1")

    settings.MANTLE_STRIPE_USAGE_PUSH = "invoices"
    assert stripe_tasks.stripe_push_meter_hour.apply().get() == 0
    settings.MANTLE_STRIPE_USAGE_PUSH = "meter_events"
    assert stripe_tasks.stripe_push_meter_hour.apply().get() == 2
