"""Opt-in: the adapter against Stripe's test mode (needs STRIPE_TEST_API_KEY, never a live key)."""

from __future__ import annotations

import os
import secrets
from decimal import Decimal

import pytest

from billing.payments.stripe_client import StripeApi, StripeConfig
from billing.payments.stripe_types import InvoiceLine, InvoicePush, TopUpCharge, invoice_push

KEY = os.environ.get("STRIPE_TEST_API_KEY", "")

pytestmark = [
    pytest.mark.stripe_live,
    pytest.mark.skipif(not KEY, reason="set STRIPE_TEST_API_KEY to run against Stripe's test mode"),
    pytest.mark.skipif(
        bool(KEY) and not KEY.startswith(("sk_test_", "rk_test_")),
        reason="STRIPE_TEST_API_KEY must be a test-mode key",
    ),
]


def test_customer_invoice_push_and_retry_in_test_mode() -> None:
    api = StripeApi(StripeConfig(api_key=KEY))
    run = secrets.token_hex(6)
    customer = api.customer_create(organization_id=f"org_live_{run}", name=f"Mantle live {run}")
    again = api.customer_create(organization_id=f"org_live_{run}", name=f"Mantle live {run}")
    assert again.id == customer.id  # the idempotency key

    push = InvoicePush(
        invoice_id=f"inv_live_{run}",
        number=f"MNTLIVE-{run.upper()}",
        currency="usd",
        customer_id=customer.id,
        lines=(
            InvoiceLine(description="live test input tokens", amount=Decimal("1.23")),
            InvoiceLine(description="credits", amount=Decimal("-0.23")),
        ),
    )
    first = invoice_push(api, push)
    second = invoice_push(api, push)

    assert second.id == first.id
    assert first.status == "open"
    assert first.total == 100
    fetched = api.invoice_retrieve(first.id)
    assert fetched.mantle_invoice_id == push.invoice_id


def test_top_up_checkout_session_in_test_mode() -> None:
    api = StripeApi(StripeConfig(api_key=KEY))
    run = secrets.token_hex(6)
    customer = api.customer_create(organization_id=f"org_live_{run}", name=f"Mantle live {run}")
    charge = TopUpCharge(
        organization_id=f"org_live_{run}",
        topup_id=f"topup_live_{run}",
        customer_id=customer.id,
        amount=1000,
        currency="usd",
        description="Mantle live top-up",
    )

    session = api.checkout_payment_session_create(
        charge,
        success_url="https://example.com/ok?checkout={CHECKOUT_SESSION_ID}",
        cancel_url="https://example.com/cancel",
    )
    again = api.checkout_payment_session_create(
        charge,
        success_url="https://example.com/ok?checkout={CHECKOUT_SESSION_ID}",
        cancel_url="https://example.com/cancel",
    )

    assert again.id == session.id  # the top-up's idempotency key
    assert (session.status, session.payment_status, session.amount_total) == (
        "open",
        "unpaid",
        1000,
    )
    assert (session.topup_id, session.customer_id) == (charge.topup_id, customer.id)
    assert (session.url or "").startswith("https://checkout.stripe.com/")
    assert api.checkout_session_retrieve(session.id).id == session.id
