"""factory_boy factories and helpers for the pricing, invoicing, credits and wallet tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import factory

from accounts.models import Organization, User
from accounts.principal import Principal
from billing.models import CreditLedgerEntry, Price, PriceOverride, UsageRollup
from catalog.models import Model
from tests.factories import UserFactory, default_project

CHAT = "chat-small"
EMBED = "embed-small"
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def at(month: int, day: int = 1, hour: int = 0, year: int = 2026) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


class CatalogModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Model
        django_get_or_create = ("name",)

    name = CHAT
    kind = Model.Kind.CHAT
    context_length = 2048


class PriceFactory(factory.django.DjangoModelFactory):
    """A list price, by default in effect since the start of 2026."""

    class Meta:
        model = Price

    model_name = CHAT
    token_kind = "input"
    currency = "USD"
    unit_price = Decimal("1.000000000")
    effective_from = EPOCH
    reason = "test price book"


class OverrideFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = PriceOverride

    kind = PriceOverride.Kind.DISCOUNT
    effective_from = EPOCH
    reason = "contract"


class RollupFactory(factory.django.DjangoModelFactory):
    """One hourly rollup row of an organization (the metering drain writes these)."""

    class Meta:
        model = UsageRollup

    organization_id = "org_missing"
    project_id = "proj_missing"
    api_key_id = factory.Sequence(lambda n: f"key_{n}")
    endpoint_id = "ep-test"
    model_name = CHAT
    hour = factory.LazyFunction(lambda: at(10, 15, 12))
    requests = 1
    input_tokens = 0
    output_tokens = 0


class GrantFactory(factory.django.DjangoModelFactory):
    """A credit grant written straight to the ledger (the service is tested on its own)."""

    class Meta:
        model = CreditLedgerEntry

    kind = CreditLedgerEntry.Kind.PREPAID_PURCHASE
    amount = Decimal("100.00")
    currency = "USD"
    reason = "test grant"
    created_at = factory.LazyFunction(lambda: at(1))


def usage(
    org: Organization,
    when: datetime,
    *,
    input_tokens: int = 0,
    output_tokens: int = 0,
    model: str = CHAT,
    project_id: str | None = None,
    **kwargs: Any,
) -> UsageRollup:
    rollup: UsageRollup = RollupFactory(
        organization_id=org.id,
        project_id=project_id or default_project(org).id,
        model_name=model,
        hour=when,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        **kwargs,
    )
    return rollup


def price_book(model: str = CHAT, input_price: str = "1", output_price: str = "2") -> None:
    """List prices per million tokens for one model, in effect since 2026-01-01."""
    CatalogModelFactory(name=model)
    PriceFactory(model_name=model, token_kind="input", unit_price=Decimal(input_price))
    PriceFactory(model_name=model, token_kind="output", unit_price=Decimal(output_price))


def staff_principal() -> Principal:
    user: User = UserFactory(is_staff=True)
    return Principal(user=user, ip_address="10.0.0.1")


# A rollup without priority, flex or provisioned usage: those tiers' units, each 0.
NO_TIER_TOKENS = [
    (f"{tier}_{unit}", 0)
    for tier in ("priority", "flex", "provisioned")
    for unit in ("input", "cached_input", "output")
]
NO_TIER_TENSOR_UNITS = [
    (f"{tier}_{unit}", 0)
    for tier in ("priority", "flex", "provisioned")
    for unit in ("request", "compute_ms")
]
