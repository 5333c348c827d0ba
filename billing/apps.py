"""Billing: metering, pricing, invoices, credits, budgets, Stripe, back office."""

from __future__ import annotations

from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    default_auto_field = "django.db.models.BigAutoField"
