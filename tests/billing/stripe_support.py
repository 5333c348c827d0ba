"""Helpers for the Stripe tests: settings for the fake, invoices of ours, signed deliveries."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.db import connection
from django.test import Client

from accounts.models import Organization
from billing.models import Invoice, InvoiceLine
from billing.payments.stripe_fake import FakeStripe
from billing.payments.stripe_sync import stripe_backend, stripe_backend_reset

WEBHOOK_SECRET = "whsec_test_secret"
WEBHOOK_URL = "/billing/stripe/webhook"


def use_fake_stripe(settings: Any) -> FakeStripe:
    """Points the platform at a fresh in-memory Stripe; returns it."""
    settings.MANTLE_STRIPE_BACKEND = "fake"
    settings.STRIPE_API_KEY = ""
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.MANTLE_DUNNING_MAX_FAILURES = 3
    settings.MANTLE_DUNNING_WINDOW_DAYS = 30
    stripe_backend_reset()
    fake = stripe_backend()
    assert isinstance(fake, FakeStripe)
    return fake


def make_invoice(
    org: Organization,
    *,
    number: str = "MNT-2026-000001",
    amounts: Sequence[str] = ("12.34", "5.66"),
    credits_applied: str = "0",
    status: str = Invoice.Status.FINALIZED,
    month: int = 10,
) -> Invoice:
    """One of our invoices, finalized, with one usage line per amount."""
    subtotal = sum((Decimal(a) for a in amounts), Decimal(0))
    invoice = Invoice.objects.create(
        organization=org,
        period_start=datetime(2026, month, 1, tzinfo=UTC),
        period_end=datetime(2026, month + 1, 1, tzinfo=UTC),
        number=number,
        status=status,
        currency="USD",
        subtotal=subtotal,
        credits_applied=Decimal(credits_applied),
        total=subtotal - Decimal(credits_applied),
        finalized_at=datetime(2026, 11, 1, 0, 5, tzinfo=UTC),
    )
    for position, amount in enumerate(amounts):
        InvoiceLine.objects.create(
            invoice=invoice,
            position=position,
            kind=InvoiceLine.Kind.USAGE,
            model_name="mantle-chat-small",
            token_kind="input" if position % 2 == 0 else "output",
            quantity=1_000_000 * (position + 1),
            unit_price=Decimal(amount) / (position + 1),
            amount=Decimal(amount),
            label=f"mantle-chat-small line {position}",
        )
    return invoice


def deliver(fake: FakeStripe, event: dict[str, Any], *, timestamp: int | None = None) -> Any:
    """POSTs an event to the webhook as Stripe would: the raw body, signed."""
    body, header = fake.signed(event, timestamp=timestamp)
    return Client().post(
        WEBHOOK_URL, data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=header
    )


def deliver_at_once(fake: FakeStripe, events: Sequence[dict[str, Any]]) -> list[int]:
    """POSTs the events to the webhook from one thread each, released together (Stripe's
    redeliveries racing one another); the statuses, in the order they came back."""
    statuses: list[int] = []
    gate = threading.Barrier(len(events))

    def post(event: dict[str, Any]) -> None:
        try:
            gate.wait()
            statuses.append(deliver(fake, event).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(event,)) for event in events]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def last_event(fake: FakeStripe, event_type: str) -> dict[str, Any]:
    events = fake.events_of(event_type)
    assert events, f"the fake emitted no {event_type}"
    return events[-1]
