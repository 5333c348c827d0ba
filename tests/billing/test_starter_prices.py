"""Starter list prices for the built-in models: set once, never over an operator's prices."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.core.management import call_command

from accounts.principal import SYSTEM
from billing.models import Price
from billing.starter_prices import (
    STARTER_CACHED_INPUT_PRICES,
    STARTER_PRICES,
    compiled_model_prices_ensure,
    starter_prices_ensure,
)
from tests.billing.factories import CatalogModelFactory, PriceFactory

pytestmark = pytest.mark.django_db


def test_builtin_models_get_their_starter_prices_once() -> None:
    for name in STARTER_PRICES:
        CatalogModelFactory(name=name)

    call_command("seed_prices")
    call_command("seed_prices")

    prices = {(p.model_name, p.token_kind): p.unit_price for p in Price.objects.all()}
    online = {
        (name, kind): Decimal(value)
        for name, pair in STARTER_PRICES.items()
        for kind, value in zip(("input", "output"), pair, strict=True)
    } | {(name, "cached_input"): Decimal(v) for name, v in STARTER_CACHED_INPUT_PRICES.items()}
    # Every unit's batch twin at half its price (tests/billing/test_batch_usage.py).
    batch = {(name, f"batch_{kind}"): price / 2 for (name, kind), price in online.items()}
    assert prices == online | batch
    # Generative models only, at half their input price.
    assert prices["smollm2-135m-instruct", "cached_input"] == Decimal("0.025")
    assert prices["smollm2-135m-instruct", "input"] == Decimal("0.05")
    assert ("all-minilm-l6-v2", "cached_input") not in prices


def test_a_model_an_operator_priced_is_left_alone() -> None:
    CatalogModelFactory(name="smollm2-135m-instruct")
    PriceFactory(model_name="smollm2-135m-instruct", token_kind="input", unit_price=Decimal("9"))

    created = starter_prices_ensure(principal=SYSTEM)

    assert created == []
    assert list(Price.objects.values_list("unit_price", flat=True)) == [Decimal("9")]


def test_models_not_in_the_catalog_are_not_priced() -> None:
    assert starter_prices_ensure(principal=SYSTEM) == []
    assert not Price.objects.exists()


def test_a_compiled_text_model_gets_the_default_cached_price_when_one_is_set(
    settings: Any,
) -> None:
    settings.MANTLE_COMPILED_MODEL_PRICES = {
        "input": "0.1",
        "output": "0.4",
        "cached_input": "0.05",
        "request": "1",
        "compute_ms": "0.02",
    }
    chat = CatalogModelFactory(name="tenant-chat")
    ranker = CatalogModelFactory(name="tenant-ranker", kind="tensor")

    compiled_model_prices_ensure(principal=SYSTEM, model=chat)
    compiled_model_prices_ensure(principal=SYSTEM, model=ranker)

    prices = {(p.model_name, p.token_kind): p.unit_price for p in Price.objects.all()}
    assert prices == {
        ("tenant-chat", "input"): Decimal("0.1"),
        ("tenant-chat", "output"): Decimal("0.4"),
        ("tenant-chat", "cached_input"): Decimal("0.05"),
        ("tenant-ranker", "request"): Decimal("1"),
        ("tenant-ranker", "compute_ms"): Decimal("0.02"),
        # and each unit's batch twin at half its price
        ("tenant-chat", "batch_input"): Decimal("0.05"),
        ("tenant-chat", "batch_output"): Decimal("0.2"),
        ("tenant-chat", "batch_cached_input"): Decimal("0.025"),
        ("tenant-ranker", "batch_request"): Decimal("0.5"),
        ("tenant-ranker", "batch_compute_ms"): Decimal("0.01"),
    }


def test_an_hour_that_turns_while_seeding_prices_from_the_new_hour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The price book refuses a start in the past: a clock read at hh:59:59.999 and a write
    at the next hour once failed seeding (and CI)."""
    from datetime import UTC, datetime

    from django.utils import timezone

    CatalogModelFactory(name="smollm2-135m-instruct")
    before, after = (
        datetime(2031, 5, 1, 9, 59, 59, 999000, tzinfo=UTC),
        datetime(2031, 5, 1, 10, 0, 0, 1000, tzinfo=UTC),
    )
    reads = iter([before])
    monkeypatch.setattr(timezone, "now", lambda: next(reads, after))

    created = starter_prices_ensure(principal=SYSTEM)

    assert created
    assert {p.effective_from for p in created} == {datetime(2031, 5, 1, 10, tzinfo=UTC)}
