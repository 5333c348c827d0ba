"""Billing URLs outside the management API: Stripe's webhook."""

from __future__ import annotations

from django.urls import path

from billing.payments import webhooks

app_name = "billing"

urlpatterns = [
    path("stripe/webhook", webhooks.stripe_webhook, name="stripe-webhook"),
]
