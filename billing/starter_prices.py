"""Default list prices: built-in models at start, compiled models as they are registered."""

from __future__ import annotations

import logging
from decimal import ROUND_UP, Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.principal import SYSTEM, Principal
from billing.models import Price
from billing.money import UNIT_PRICE_PLACES, parse_decimal
from billing.periods import hour_start
from billing.pricing import BATCH_OF, CACHED_INPUT, billed_units, price_set
from catalog.models import Model
from core.errors import InvalidInput

logger = logging.getLogger(__name__)

# USD per million tokens, (input, output). Small open models at small-model prices, so the
# console's catalog, usage and budgets show real money from the first request; the echo
# model is free: it computes nothing and exists to measure the platform's own overhead.
STARTER_PRICES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("0.050000000", "0.200000000"),
    "all-minilm-l6-v2": ("0.010000000", "0"),
    "mantle-echo": ("0", "0"),
}
# USD per million cached input tokens (prompt tokens the prefix cache served), half the
# input price: a cached token skips its prefill, but its KV blocks still take cache memory
# for the whole request and every generated token still attends over it, so it is cheaper,
# not free; and 50% is the discount OpenAI gave cached prompt tokens when it introduced
# them, which is what customers expect to compare with. Generative models only: an encoder
# has no prefix cache (its cached count is always 0), and the echo model is free.
STARTER_CACHED_INPUT_PRICES: dict[str, str] = {
    "smollm2-135m-instruct": "0.025000000",
}
# A batch price as a share of the online price of the same unit, for every unit a model is
# given a default price for (the `batch_` units): half. Batch lines run on the capacity
# online traffic leaves idle (a worker takes them only with slots to spare) and may take
# up to 24 hours, so they cost the operator little beyond what it has already paid for;
# and half is what OpenAI and Together bill batches at, which is what customers compare
# with. Written as list prices like any other, so operators change them the usual way.
BATCH_PRICE_SHARE = Decimal("0.5")


def batch_price(online: Decimal) -> Decimal:
    """The default batch price of a unit priced `online` per million: BATCH_PRICE_SHARE
    of it, rounded up to the price book's nine places (a priced unit never turns free)."""
    return (online * BATCH_PRICE_SHARE).quantize(UNIT_PRICE_PLACES, rounding=ROUND_UP)


def with_batch_prices(units: list[tuple[str, Decimal]]) -> list[tuple[str, Decimal]]:
    """(unit, price) pairs, then each unit's batch twin at its default batch price."""
    return [*units, *((BATCH_OF[unit], batch_price(price)) for unit, price in units)]


def starter_prices_ensure(*, principal: Principal) -> list[Price]:
    """Prices the built-in models that have no price at all yet, from the current hour:
    their online units, and the batch twin of each at BATCH_PRICE_SHARE of it.

    A model that already has any price (an operator set one) is left alone, so running
    it on every start never changes a price book someone has touched.
    """
    created: list[Price] = []
    for name, (price_in, price_out) in STARTER_PRICES.items():
        if not Model.objects.filter(name=name).exists():
            continue
        if Price.objects.filter(model_name=name).exists():
            continue
        online = [("input", Decimal(price_in)), ("output", Decimal(price_out))]
        if name in STARTER_CACHED_INPUT_PRICES:
            online.append(("cached_input", Decimal(STARTER_CACHED_INPUT_PRICES[name])))
        units = with_batch_prices(online)
        created.extend(_priced_from_this_hour(principal, name, units))
        logger.info(
            "starter prices for %s per million tokens: %s",
            name,
            ", ".join(f"{kind} {unit}" for kind, unit in units),
        )
    return created


def _priced_from_this_hour(
    principal: Principal,
    name: str,
    units: list[tuple[str, Decimal]],
    *,
    reason: str = "starter list price for a built-in model",
) -> list[Price]:
    """Every unit of `name` priced from the current hour, together. An hour that turns
    between reading the clock and writing (the price book refuses a start in the past)
    is read again once: all units then start at the new hour."""
    for attempt in range(2):
        start = hour_start(timezone.now())
        try:
            with transaction.atomic():
                return [
                    price_set(
                        principal=principal,
                        model_name=name,
                        token_kind=kind,
                        unit_price=unit,
                        effective_from=start,
                        reason=reason,
                    )
                    for kind, unit in units
                ]
        except InvalidInput:
            if attempt or hour_start(timezone.now()) == start:
                raise
    raise AssertionError("unreachable")


def compiled_model_priced(model: Model) -> None:
    """The catalog's hook for a newly compiled model (catalog.compile.on_model_compiled)."""
    compiled_model_prices_ensure(principal=SYSTEM, model=model)


def compiled_model_prices_ensure(*, principal: Principal, model: Model) -> list[Price]:
    """Gives a newly compiled model the operator's default list price, from this hour.

    MANTLE_COMPILED_MODEL_PRICES names a price per unit; the model gets the two units of
    its kind (billing.pricing.billed_units), and a text model `cached_input` too when the
    setting names it (else its cached tokens are billed as input); and the batch twin of
    each at BATCH_PRICE_SHARE of it, as the built-in models do. Without both units of
    its kind, it stays unpriced: admission refuses it (403 model_not_priced) until an
    operator prices it, so a tenant's own model never runs free by accident. A model that
    already has a price is left alone.
    """
    defaults: dict[str, str] = settings.MANTLE_COMPILED_MODEL_PRICES
    units: tuple[str, ...] = billed_units(model.kind)
    if not all(unit in defaults for unit in units):
        logger.info("compiled model %s has no default price: not served until priced", model)
        return []
    if Price.objects.filter(model_name=model.name).exists():
        return []
    if model.kind != Model.Kind.TENSOR and CACHED_INPUT in defaults:
        units = (*units, CACHED_INPUT)
    try:
        priced = with_batch_prices(
            [(unit, parse_decimal(defaults[unit], param=unit)) for unit in units]
        )
        return _priced_from_this_hour(
            principal,
            model.name,
            priced,
            reason="default list price for a compiled model (MANTLE_COMPILED_MODEL_PRICES)",
        )
    except InvalidInput:
        # A bad setting must not fail the tenant's compile job: the model stays unpriced.
        logger.exception("MANTLE_COMPILED_MODEL_PRICES does not price %s", model)
        return []
