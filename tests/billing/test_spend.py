"""A request's cost in nanos: exact, rounded up once, the same whether costed alone (the
gateway's settlement) or through a batch's integer prices (the drain's wallet hook)."""

from __future__ import annotations

import math
import random
from decimal import Decimal

from billing.spend import FREE, Prices


def exact_cost(prices: list[str], quantities: list[int]) -> int:
    return math.ceil(sum(Decimal(q) * Decimal(p) for q, p in zip(quantities, prices, strict=True)))


def test_integer_prices_cost_exactly_what_decimal_arithmetic_does() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        prices = [
            str(Decimal(rng.randrange(0, 10**7)) / Decimal(10 ** rng.randrange(0, 13)))
            for _ in range(4)
        ]
        quantities = [rng.randrange(0, 10**8) for _ in range(4)]
        p = Prices(*prices)
        expected = exact_cost(prices, quantities)
        assert p.scaled().cost(*quantities) == expected, (prices, quantities)
        assert (
            p.cost(
                input_tokens=quantities[0],
                output_tokens=quantities[1],
                requests=quantities[2],
                compute_ms=quantities[3],
            )
            == expected
        )


def test_a_fraction_of_a_nano_rounds_up_and_free_costs_nothing() -> None:
    third = Prices(input="0.333333333", output="0", request="0", compute_ms="0")
    assert third.cost(input_tokens=3) == 1  # 0.999999999 nanos
    assert third.cost(input_tokens=4) == 2  # 1.333333332 nanos
    assert Prices(input="1E+2").cost(input_tokens=2) == 200
    assert FREE.cost(input_tokens=10**9, output_tokens=10**9, requests=5, compute_ms=99) == 0
