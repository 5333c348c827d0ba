"""List prices a fresh platform starts with for its built-in models (operators change them)."""

from __future__ import annotations

import logging
from decimal import Decimal

from django.utils import timezone

from accounts.principal import Principal
from billing.models import Price
from billing.periods import hour_start
from billing.pricing import price_set
from catalog.models import Model

logger = logging.getLogger(__name__)

# USD per million tokens, (input, output). Small open models at small-model prices, so the
# console's catalog, usage and budgets show real money from the first request; the echo
# model is free: it computes nothing and exists to measure the platform's own overhead.
STARTER_PRICES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("0.050000000", "0.200000000"),
    "all-minilm-l6-v2": ("0.010000000", "0"),
    "mantle-echo": ("0", "0"),
}


def starter_prices_ensure(*, principal: Principal) -> list[Price]:
    """Prices the built-in models that have no price at all yet, from the current hour.

    A model that already has any price (an operator set one) is left alone, so running
    it on every start never changes a price book someone has touched.
    """
    created: list[Price] = []
    start = hour_start(timezone.now())
    for name, (price_in, price_out) in STARTER_PRICES.items():
        if not Model.objects.filter(name=name).exists():
            continue
        if Price.objects.filter(model_name=name).exists():
            continue
        for kind, unit in (("input", price_in), ("output", price_out)):
            created.append(
                price_set(
                    principal=principal,
                    model_name=name,
                    token_kind=kind,
                    unit_price=Decimal(unit),
                    effective_from=start,
                    reason="starter list price for a built-in model",
                )
            )
        logger.info(
            "starter prices for %s: %s in, %s out per million tokens", name, price_in, price_out
        )
    return created
