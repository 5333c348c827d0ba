"""Billing: metering, pricing, invoices, credits, budgets, Stripe, back office."""

from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate

from billing.staff_roles import roles_sync


def _sync_staff_roles(sender: AppConfig, **kwargs: Any) -> None:
    # After every migrate (and every test-database flush, which re-sends post_migrate),
    # so the roles always carry the view rights of every model that exists now.
    roles_sync()


class BillingConfig(AppConfig):
    name = "billing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        post_migrate.connect(_sync_staff_roles, sender=self, dispatch_uid="billing-staff-roles")
        # Every billing task registered in every process, so that billing.jobs can queue
        # them by name (eagerly where tests run tasks eagerly).
        from billing import tasks  # noqa: F401

        # The drain moves each settled request's cost from the wallet's pending to its
        # spent, once: without the hook, pending only grows and a prepaid or capped
        # organization is refused early (docs/billing.md, "Admission").
        from billing.metering.outbox import on_counted
        from billing.wallet import wallet_record_events

        on_counted(wallet_record_events)
        # A model a tenant compiles gets the operator's default price, if one is set.
        from billing.starter_prices import compiled_model_priced
        from catalog.compile import on_model_compiled

        on_model_compiled(compiled_model_priced)
        # Every invoice names the seller: a process with settings it could not print on
        # one does not start (docs/deployment.md).
        from billing.tax import check_seller_settings

        check_seller_settings()
