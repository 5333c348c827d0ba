"""Billing URLs outside the management API: Stripe's webhook (and the fake Stripe's
hosted Checkout page, which answers 404 unless the fake is the backend)."""

from __future__ import annotations

from django.urls import path

from billing.payments import fake_checkout, webhooks

app_name = "billing"

urlpatterns = [
    path("stripe/webhook", webhooks.stripe_webhook, name="stripe-webhook"),
    path(
        "stripe/fake-checkout/<str:session_id>",
        fake_checkout.fake_checkout,
        name="stripe-fake-checkout",
    ),
]
