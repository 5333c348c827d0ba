"""Starter list prices for the built-in models: set once, never over an operator's prices."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core.management import call_command

from accounts.principal import SYSTEM
from billing.models import Price
from billing.starter_prices import STARTER_PRICES, starter_prices_ensure
from tests.billing.factories import CatalogModelFactory, PriceFactory

pytestmark = pytest.mark.django_db


def test_builtin_models_get_their_starter_prices_once() -> None:
    for name in STARTER_PRICES:
        CatalogModelFactory(name=name)

    call_command("seed_prices")
    call_command("seed_prices")

    prices = {(p.model_name, p.token_kind): p.unit_price for p in Price.objects.all()}
    assert prices == {
        (name, kind): Decimal(value)
        for name, pair in STARTER_PRICES.items()
        for kind, value in zip(("input", "output"), pair, strict=True)
    }


def test_a_model_an_operator_priced_is_left_alone() -> None:
    CatalogModelFactory(name="smollm2-135m-instruct")
    PriceFactory(model_name="smollm2-135m-instruct", token_kind="input", unit_price=Decimal("9"))

    created = starter_prices_ensure(principal=SYSTEM)

    assert created == []
    assert list(Price.objects.values_list("unit_price", flat=True)) == [Decimal("9")]


def test_models_not_in_the_catalog_are_not_priced() -> None:
    assert starter_prices_ensure(principal=SYSTEM) == []
    assert not Price.objects.exists()
