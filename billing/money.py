"""Money arithmetic: Decimal amounts, cents rounded half-even, and nano-units for Redis."""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation

from core.errors import InvalidInput

CENT = Decimal("0.01")
UNIT_PRICE_PLACES = Decimal("0.000000001")
TOKENS_PER_PRICE_UNIT = 1_000_000  # unit prices are per million tokens
NANOS_PER_UNIT = 1_000_000_000
# Bounds that keep every amount inside DecimalField(max_digits=20) with room to sum.
MAX_AMOUNT = Decimal("1000000000")  # 1e9 currency units
MAX_UNIT_PRICE = Decimal("1000000")  # per million tokens


def round_cents(amount: Decimal) -> Decimal:
    """The one rounding of money: to cents, half to even (banker's rounding)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_EVEN)


def line_amount(quantity: int, unit_price: Decimal) -> Decimal:
    """quantity tokens x unit price per million, rounded once to cents (half-even)."""
    return round_cents(Decimal(quantity) * unit_price / TOKENS_PER_PRICE_UNIT)


def exact_amount(quantity: int, unit_price: Decimal) -> Decimal:
    return Decimal(quantity) * unit_price / TOKENS_PER_PRICE_UNIT


def nanos_ceil(amount: Decimal) -> int:
    """Currency units -> integer nanos, rounded up (spend is never under-counted)."""
    return int((amount * NANOS_PER_UNIT).to_integral_value(rounding=ROUND_CEILING))


def nanos_floor(amount: Decimal) -> int:
    """Currency units -> integer nanos, rounded down (funds are never over-stated)."""
    return int((amount * NANOS_PER_UNIT).to_integral_value(rounding=ROUND_FLOOR))


def nanos_amount(nanos: int) -> Decimal:
    """Integer nanos -> currency units, exact (a relayed request's cost of goods)."""
    return Decimal(nanos).scaleb(-9)


def nanos_per_token(unit_price: Decimal) -> Decimal:
    """A price per million tokens as nanos per token, exact (it may have a fraction)."""
    return unit_price * NANOS_PER_UNIT / TOKENS_PER_PRICE_UNIT


def nanos_per_token_ceil(unit_price: Decimal) -> int:
    return math.ceil(nanos_per_token(unit_price))


def parse_decimal(value: object, *, param: str) -> Decimal:
    """A Decimal from a Decimal, int or string; floats are refused (binary fractions)."""
    if isinstance(value, bool | float):
        raise InvalidInput(f"{param} must be a decimal string, not a float", param=param)
    try:
        result = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except (InvalidOperation, ValueError) as exc:
        raise InvalidInput(f"{param} must be a decimal number", param=param) from exc
    if not result.is_finite():
        raise InvalidInput(f"{param} must be a finite number", param=param)
    return result


def check_places(value: Decimal, places: int, *, param: str) -> Decimal:
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -places:
        raise InvalidInput(f"{param} may have at most {places} decimal places", param=param)
    return value
