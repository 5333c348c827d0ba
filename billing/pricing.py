"""The price book: list prices with effective dates, organization overrides, price lookup.

Also the one rating path: `PriceBook.rate_rollups` rates hourly rollups in the units each
model is billed by, at the organization's price in effect in each hour. Invoices, the
console's usage page, the back office's explorer, CSV and dashboard all rate through it,
so a usage page can never rate differently from the invoice.
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from billing import checks, jobs
from billing.models import Price, PriceOverride, TierMultiplier, TokenKind
from billing.money import (
    MAX_AMOUNT,
    MAX_UNIT_PRICE,
    UNIT_PRICE_PLACES,
    check_places,
    exact_amount,
    parse_decimal,
)
from billing.periods import hour_start, is_whole_hour
from catalog.models import Model
from core.errors import Conflict, InvalidInput, NotFound

logger = logging.getLogger(__name__)

HUNDRED = Decimal(100)
ZERO = Decimal(0)


INPUT = TokenKind.INPUT.value
OUTPUT = TokenKind.OUTPUT.value
CACHED_INPUT = TokenKind.CACHED_INPUT.value
REQUEST = TokenKind.REQUEST.value
COMPUTE_MS = TokenKind.COMPUTE_MS.value
BATCH_INPUT = TokenKind.BATCH_INPUT.value
BATCH_OUTPUT = TokenKind.BATCH_OUTPUT.value
BATCH_CACHED_INPUT = TokenKind.BATCH_CACHED_INPUT.value
BATCH_REQUEST = TokenKind.BATCH_REQUEST.value
BATCH_COMPUTE_MS = TokenKind.BATCH_COMPUTE_MS.value

# What each kind of model is billed by: text models by tokens, tensor models (the /v2
# protocol, no tokens) by requests and compute time. Prices are per million units of each.
# These are the units a model must have prices for to be served; a text model's prompt
# tokens that the prefix cache served are billed by `cached_input` on top, but only where
# the book prices it (PriceBook.billed): otherwise they are input tokens. Batch lines are
# billed by the `batch_` twin of each unit (BATCH_OF), at the online price where the book
# has no batch price: admission never needs one.
TEXT_UNITS: tuple[str, str] = (INPUT, OUTPUT)
TENSOR_UNITS: tuple[str, str] = (REQUEST, COMPUTE_MS)
BATCH_OF: Mapping[str, str] = {
    INPUT: BATCH_INPUT,
    OUTPUT: BATCH_OUTPUT,
    CACHED_INPUT: BATCH_CACHED_INPUT,
    REQUEST: BATCH_REQUEST,
    COMPUTE_MS: BATCH_COMPUTE_MS,
}
"""Each unit's twin for the usage of batch lines (service class `batch`)."""
ONLINE_OF: Mapping[str, str] = {batch: online for online, batch in BATCH_OF.items()}
BATCH_UNITS: tuple[str, ...] = tuple(BATCH_OF.values())

# The priority and flex service tiers: each unit's twin, billed at the online unit's price
# times the tier's multiplier (TierMultiplier; DEFAULT_TIER_MULTIPLIERS where no row
# applies). Admission, the drain and the invoice all take that price from `billed`.
TIERS: tuple[str, ...] = ("priority", "flex", "provisioned")
PRICED_TIERS: tuple[str, ...] = ("priority", "flex")
"""The tiers an operator prices by a multiplier; usage within provisioned throughput units
(`provisioned_*`) costs 0 per token (the units are billed per unit-hour)."""
TIER_TWINS: Mapping[str, Mapping[str, str]] = {
    tier: {unit: f"{tier}_{unit}" for unit in (INPUT, OUTPUT, CACHED_INPUT, REQUEST, COMPUTE_MS)}
    for tier in TIERS
}
"""tier -> online unit -> the tier's twin of it (`priority_input`...)."""
TIER_OF: Mapping[str, tuple[str, str]] = {
    twin: (tier, online) for tier, twins in TIER_TWINS.items() for online, twin in twins.items()
}
"""A tier unit -> (its tier, the online unit it is a multiple of)."""
TIER_UNITS: tuple[str, ...] = tuple(TIER_OF)
DEFAULT_TIER_MULTIPLIERS: Mapping[str, Decimal] = {
    "priority": Decimal(2),
    "flex": Decimal("0.5"),
    "provisioned": Decimal(0),  # never set by a row: TierMultiplier has no such tier
}
"""A tier's multiplier where no TierMultiplier row applies (the model's, or every model's):
priority at twice the online price, flex at half (OpenAI's flex processing is half price)."""
CLASS_TWINS: Mapping[str, Mapping[str, str]] = {
    "batch": BATCH_OF,
    **{tier: TIER_TWINS[tier] for tier in PRICED_TIERS},
}
"""service class -> online unit -> the unit its usage is billed by, for the classes the
wallet's price hash carries prices of (the online class: the unit itself; provisioned
usage: 0)."""

TOKEN_UNITS: tuple[str, ...] = (
    INPUT,
    CACHED_INPUT,
    OUTPUT,
    BATCH_INPUT,
    BATCH_CACHED_INPUT,
    BATCH_OUTPUT,
    *(TIER_TWINS[t][u] for t in TIERS for u in (INPUT, CACHED_INPUT, OUTPUT)),
)
"""The units that count tokens (the console's "unpriced tokens")."""
# A cached prompt token is also a prompt token: billed as one (on that line) when that is
# not dearer. `PriceBook.billed` is where both maps are read.
_UNCACHED_OF: Mapping[str, str] = {CACHED_INPUT: INPUT, BATCH_CACHED_INPUT: BATCH_INPUT}


def billed_units(model_kind: str) -> tuple[str, str]:
    """The two units a model of `model_kind` (catalog Model.Kind) must be priced for."""
    return TENSOR_UNITS if model_kind == "tensor" else TEXT_UNITS


# Each unit's column in UsageRollup, and the sums of them every rater reads (annotations on
# a values() query, keyed by `_SUM_OF_UNIT`): one path from rollups to billed quantities.
# `cached_input_tokens` is a part of `input_tokens`, and each `batch_` column a part of its
# online twin (split_quantities splits them).
_ONLINE_COLUMNS = {
    INPUT: "input_tokens",
    OUTPUT: "output_tokens",
    REQUEST: "requests",
    COMPUTE_MS: "compute_ms",
    CACHED_INPUT: "cached_input_tokens",
}
UNIT_COLUMNS = {
    INPUT: "input_tokens",
    OUTPUT: "output_tokens",
    REQUEST: "requests",
    COMPUTE_MS: "compute_ms",
    CACHED_INPUT: "cached_input_tokens",
    BATCH_INPUT: "batch_input_tokens",
    BATCH_OUTPUT: "batch_output_tokens",
    BATCH_REQUEST: "batch_requests",
    BATCH_COMPUTE_MS: "batch_compute_ms",
    BATCH_CACHED_INPUT: "batch_cached_input_tokens",
    **{twin: f"{tier}_{_ONLINE_COLUMNS[online]}" for twin, (tier, online) in TIER_OF.items()},
}
_SUM_OF_UNIT = {
    INPUT: "i",
    OUTPUT: "o",
    REQUEST: "r",
    COMPUTE_MS: "c",
    CACHED_INPUT: "ci",
    BATCH_INPUT: "bi",
    BATCH_OUTPUT: "bo",
    BATCH_REQUEST: "br",
    BATCH_COMPUTE_MS: "bc",
    BATCH_CACHED_INPUT: "bci",
    # Not the column's own name (an annotation may not shadow a field).
    **{twin: f"s_{twin}" for twin in TIER_UNITS},
}
ROLLUP_SUMS = {_SUM_OF_UNIT[unit]: Sum(column) for unit, column in UNIT_COLUMNS.items()}


def billed_quantities(row: Mapping[str, Any], model_kind: str) -> list[tuple[str, int]]:
    """(unit, quantity) billed for a rollup group annotated with ROLLUP_SUMS: tokens for
    text models (`split_quantities`), requests and compute time for tensor models (a text
    model's compute time is in its token price)."""
    # Mapping[str, Any]: django-stubs' values() row types leave the annotated sums out.
    # .get: a group summed before the tiers' parts existed has none (0).
    totals = {unit: int(row.get(key) or 0) for unit, key in _SUM_OF_UNIT.items()}
    return split_quantities(totals, model_kind)


def split_quantities(totals: Mapping[str, int], model_kind: str) -> list[tuple[str, int]]:
    """(unit, quantity) billed, from each unit's column total (unit -> sum of its
    UNIT_COLUMNS column), online units first, then their batch twins, then the priority
    and flex tiers' twins.

    Every token is in exactly one unit. A column total counts its parts: input tokens
    count the cached ones, and every online total counts the batch lines' and the tiers'
    parts. So `input` is the online uncached part, `cached_input` the online cached one,
    `batch_input` and `batch_cached_input` the same of batch lines, and so on for each
    tier (`PriceBook.rate` bills a cached part as the uncached one again when no cached
    price applies).
    """

    def total(unit: str) -> int:
        return int(totals.get(unit, 0))

    classes = [BATCH_OF, *(TIER_TWINS[t] for t in TIERS)]
    if model_kind == "tensor":
        units = (REQUEST, COMPUTE_MS)
        online = [(u, total(u) - sum(total(c[u]) for c in classes)) for u in units]
        return online + [(c[u], total(c[u])) for c in classes for u in units]

    def parts(twins: Mapping[str, str]) -> list[tuple[str, int]]:
        cached = total(twins[CACHED_INPUT])
        return [
            (twins[INPUT], total(twins[INPUT]) - cached),
            (twins[CACHED_INPUT], cached),
            (twins[OUTPUT], total(twins[OUTPUT])),
        ]

    others = [part for c in classes for part in parts(c)]
    taken = {unit: 0 for unit in (INPUT, CACHED_INPUT, OUTPUT)}
    for c in classes:
        for unit in taken:
            taken[unit] += dict(parts(c))[c[unit]]
    cached = total(CACHED_INPUT) - taken[CACHED_INPUT]
    online = [
        (INPUT, total(INPUT) - cached - taken[CACHED_INPUT] - taken[INPUT]),
        (CACHED_INPUT, cached),
        (OUTPUT, total(OUTPUT) - taken[OUTPUT]),
    ]
    return online + others


def counted_as(unit: str) -> str:
    """The unit whose column total `unit`'s quantities are a part of: cached input tokens
    are input tokens (and billed as such where no cached price applies), and batch lines'
    usage is usage of the online unit (batch tokens are billed at the online price where
    no batch price applies)."""
    online = ONLINE_OF.get(unit) or TIER_OF.get(unit, (None, unit))[1]
    return INPUT if online == CACHED_INPUT else online


def model_kinds(model_names: Iterable[str]) -> dict[str, str]:
    """model name -> catalog kind; a name the catalog no longer has counts as text."""
    names = set(model_names)
    found = dict(Model.objects.filter(name__in=names).values_list("name", "kind"))
    return {name: found.get(name, "chat") for name in names}


class Unpriced(Conflict):
    """Usage of a model and token kind that has no price at that time: it cannot be rated."""

    code = "unpriced_usage"


@dataclass(frozen=True)
class EffectivePrice:
    model_name: str
    token_kind: str
    unit_price: Decimal  # per million tokens, after the organization's rate or discount
    list_price: Decimal
    source: str  # "list", "rate" or "discount"


@dataclass(frozen=True, slots=True)
class Charge:
    """A billed quantity of one unit at the price in effect; `price` is None when nothing
    prices that unit then (the invoice holds such usage, the other raters leave it out)."""

    unit: str
    quantity: int
    price: EffectivePrice | None

    @property
    def amount(self) -> Decimal | None:
        """Exact (unrounded) money; None when unpriced."""
        return None if self.price is None else exact_amount(self.quantity, self.price.unit_price)


@dataclass(frozen=True, slots=True)
class Rating:
    """The charges of one model in one hour: one per billed unit with a quantity."""

    charges: tuple[Charge, ...]

    @property
    def amount(self) -> Decimal | None:
        """The priced charges' exact sum; None when none of them is priced."""
        amount: Decimal | None = None
        for charge in self.charges:
            if charge.price is not None:
                amount = (amount or ZERO) + exact_amount(charge.quantity, charge.price.unit_price)
        return amount

    @property
    def unpriced(self) -> tuple[Charge, ...]:
        return tuple(c for c in self.charges if c.price is None)


@dataclass(frozen=True)
class CommitTier:
    threshold: Decimal
    percent: Decimal


@dataclass
class PriceBook:
    """Every price and override that can apply to one organization, loaded once.

    Rating a month asks for thousands of (model, kind, hour) prices; this answers them
    from memory. Lookups are by the instant: the price in effect at `at` is the latest
    row with effective_from <= at (rollups are hourly, so an hour is rated at the price
    in effect at its start).
    """

    organization_id: str | None
    # (model, kind) -> effective_from ascending, and the prices in the same order
    _list_times: dict[tuple[str, str], list[datetime]] = field(default_factory=dict)
    _list_prices: dict[tuple[str, str], list[Decimal]] = field(default_factory=dict)
    _overrides: list[PriceOverride] = field(default_factory=list)
    _cache: dict[tuple[str, str, datetime], EffectivePrice | None] = field(default_factory=dict)
    # (model or "" for every model, tier) -> effective_from ascending, and the multipliers
    _tier_times: dict[tuple[str, str], list[datetime]] = field(default_factory=dict)
    _tier_values: dict[tuple[str, str], list[Decimal]] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        organization_id: str | None,
        *,
        model_names: Iterable[str] | None = None,
        currency: str | None = None,
    ) -> PriceBook:
        prices = Price.objects.filter(currency=currency or settings.MANTLE_BILLING_CURRENCY)
        if model_names is not None:
            prices = prices.filter(model_name__in=list(model_names))
        book = cls(organization_id=organization_id)
        times: dict[tuple[str, str], list[datetime]] = defaultdict(list)
        values: dict[tuple[str, str], list[Decimal]] = defaultdict(list)
        for p in prices.order_by("model_name", "token_kind", "effective_from").only(
            "model_name", "token_kind", "unit_price", "effective_from"
        ):
            times[(p.model_name, p.token_kind)].append(p.effective_from)
            values[(p.model_name, p.token_kind)].append(p.unit_price)
        book._list_times, book._list_prices = dict(times), dict(values)
        multipliers = TierMultiplier.objects.all()
        if model_names is not None:
            multipliers = multipliers.filter(model_name__in=["", *model_names])
        tier_times: dict[tuple[str, str], list[datetime]] = defaultdict(list)
        tier_values: dict[tuple[str, str], list[Decimal]] = defaultdict(list)
        for m in multipliers.order_by("model_name", "service_tier", "effective_from").only(
            "model_name", "service_tier", "multiplier", "effective_from"
        ):
            tier_times[(m.model_name, m.service_tier)].append(m.effective_from)
            tier_values[(m.model_name, m.service_tier)].append(m.multiplier)
        book._tier_times, book._tier_values = dict(tier_times), dict(tier_values)
        return book if organization_id is None else book.for_organization(organization_id)

    def for_organization(self, organization_id: str) -> PriceBook:
        """This book's list prices with one organization's overrides (one query)."""
        book = PriceBook(organization_id=organization_id)
        book._list_times, book._list_prices = self._list_times, self._list_prices
        book._tier_times, book._tier_values = self._tier_times, self._tier_values
        book._overrides = list(
            PriceOverride.objects.filter(organization_id=organization_id).order_by(
                "effective_from", "id"
            )
        )
        return book

    def model_names(self) -> set[str]:
        return {model for model, _ in self._list_times} | {
            o.model_name for o in self._overrides if o.kind == PriceOverride.Kind.RATE
        }

    def list_price(self, model_name: str, token_kind: str, at: datetime) -> Decimal | None:
        times = self._list_times.get((model_name, token_kind))
        if not times:
            return None
        i = bisect.bisect_right(times, at) - 1
        return self._list_prices[(model_name, token_kind)][i] if i >= 0 else None

    def effective(self, model_name: str, token_kind: str, at: datetime) -> EffectivePrice | None:
        """The unit price the organization pays at `at`, or None if nothing prices it."""
        key = (model_name, token_kind, at)
        if key not in self._cache:
            self._cache[key] = self._effective(model_name, token_kind, at)
        return self._cache[key]

    def _effective(self, model_name: str, token_kind: str, at: datetime) -> EffectivePrice | None:
        listed = self.list_price(model_name, token_kind, at)
        active = [o for o in self._overrides if _active(o, at)]
        rates = [
            o
            for o in active
            if o.kind == PriceOverride.Kind.RATE
            and o.model_name == model_name
            and o.token_kind == token_kind
        ]
        if rates:
            rate = rates[-1]  # the latest effective_from wins
            assert rate.unit_price is not None
            return EffectivePrice(
                model_name, token_kind, rate.unit_price, listed or rate.unit_price, "rate"
            )
        if listed is None:
            return None
        discounts = [
            o
            for o in active
            if o.kind == PriceOverride.Kind.DISCOUNT
            and o.model_name in ("", model_name)
            and o.token_kind in ("", token_kind)
        ]
        if discounts:
            # The most specific applies; among equals, the latest.
            best = max(
                enumerate(discounts),
                key=lambda p: (bool(p[1].model_name), bool(p[1].token_kind), p[0]),
            )[1]
            assert best.discount_percent is not None
            unit = discounted(listed, best.discount_percent)
            return EffectivePrice(model_name, token_kind, unit, listed, "discount")
        return EffectivePrice(model_name, token_kind, listed, listed, "list")

    def tier_multiplier(self, model_name: str, tier: str, at: datetime) -> Decimal:
        """The multiplier of `tier`'s prices for the model at `at`: the model's own row in
        effect then, else every model's, else DEFAULT_TIER_MULTIPLIERS."""
        if tier not in PRICED_TIERS:
            return DEFAULT_TIER_MULTIPLIERS[tier]
        for model in (model_name, ""):
            times = self._tier_times.get((model, tier))
            if times:
                i = bisect.bisect_right(times, at) - 1
                if i >= 0:
                    return self._tier_values[(model, tier)][i]
        return DEFAULT_TIER_MULTIPLIERS[tier]

    def billed(self, model_name: str, unit: str, at: datetime) -> tuple[str, EffectivePrice | None]:
        """The line a quantity of `unit` is billed on, and its price at `at`.

        A token is billed at the cheapest price the book gives for what it is, so a cached
        or batch token never costs more than a plain online one:

        - a cached token (`cached_input`, `batch_cached_input`) is also a prompt token of
          its class: billed as that (on its line, `input` or `batch_input`) when nothing
          prices the cached unit then or that is cheaper;
        - a batch line's token (`batch_*`) is also an online token: billed at the online
          unit's price, on its own batch line, when nothing prices the batch unit then or
          the online price is cheaper (a contract rate, a discount on one kind alone).

        Ties go to the unit's own price. So a book without cached or batch prices rates
        as before them, batch lines are never free for want of a batch price, and
        admission needs the two online units only. When nothing prices a token at all,
        its line is the uncached one for a cached unit (the invoice holds it there), else
        its own, and the price None.

        Not memoized: it only combines `effective`'s cached prices, and a second cache
        would double the book's memory over a long range (the back office's CSV streams
        years of hours in bounded memory).
        """
        if unit in TIER_OF:
            return self._tier_billed(model_name, unit, at)
        line, best = unit, self.effective(model_name, unit, at)
        uncached = _UNCACHED_OF.get(unit)
        if uncached is not None:
            as_uncached = self.billed(model_name, uncached, at)
            if as_uncached[1] is not None and (
                best is None or as_uncached[1].unit_price < best.unit_price
            ):
                line, best = as_uncached
        online = ONLINE_OF.get(unit)
        if online is not None:
            as_online = self.billed(model_name, online, at)[1]
            if as_online is not None and (best is None or as_online.unit_price < best.unit_price):
                line, best = unit, as_online
        if best is None and uncached is not None:
            line = uncached
        return line, best

    def _tier_billed(
        self, model_name: str, unit: str, at: datetime
    ) -> tuple[str, EffectivePrice | None]:
        """A priority or flex unit: the online unit's line and price (`billed`: a cached
        token with no cached price is billed as an input token) times the tier's
        multiplier, rounded half up to the nano per million (the unit price's places), on
        the tier's twin of that line."""
        tier, online = TIER_OF[unit]
        line, price = self.billed(model_name, online, at)
        twin = TIER_TWINS[tier][line]
        if price is None:
            return twin, None
        times = self.tier_multiplier(model_name, tier, at)
        return twin, EffectivePrice(
            model_name,
            twin,
            (price.unit_price * times).quantize(UNIT_PRICE_PLACES, rounding=ROUND_HALF_UP),
            (price.list_price * times).quantize(UNIT_PRICE_PLACES, rounding=ROUND_HALF_UP),
            price.source,
        )

    def cached_input_price(self, model_name: str, at: datetime) -> EffectivePrice | None:
        """The price of a prompt token the prefix cache served, or None when such tokens
        are billed as input tokens (`billed`): when nothing prices `cached_input` for the
        model then, or when that price is above the input price in effect (a rate or
        discount on `input` alone can bring it below). So a price book without cached
        prices rates exactly as before."""
        line, price = self.billed(model_name, CACHED_INPUT, at)
        return price if line == CACHED_INPUT else None

    def rate(
        self, model_name: str, hour: datetime, quantities: Iterable[tuple[str, int]]
    ) -> Rating:
        """(unit, quantity) pairs of one model in one hour at the prices in effect then,
        one charge per line (`billed`): cached tokens are added to the uncached quantity of
        their class when no cached price applies; batch quantities keep their own line,
        at the online price when no batch price applies.
        """
        lines: dict[str, list[Any]] = {}  # line -> [quantity, price], in first-seen order
        for unit, qty in quantities:
            if not qty:
                continue
            line, price = self.billed(model_name, unit, hour)
            if line in lines:
                lines[line][0] += qty
            else:
                lines[line] = [qty, price]
        return Rating(tuple(Charge(line, qty, price) for line, (qty, price) in lines.items()))

    def rate_rollups(
        self, groups: Iterable[Mapping[str, Any]], *, kinds: Mapping[str, str] | None = None
    ) -> Iterator[tuple[Mapping[str, Any], Rating]]:
        """Each rollup group with its rating, in the order given.

        A group is a UsageRollup values() row with `model_name`, `hour` and the ROLLUP_SUMS
        annotations (grouped by them, or finer). It is rated in the units its model is
        billed by (`billed_quantities`), each at the price in effect in its hour. `kinds`
        (model -> catalog kind, `model_kinds`) is looked up when not given.
        """
        if kinds is None:
            groups = list(groups)
            kinds = model_kinds(g["model_name"] for g in groups)
        for g in groups:
            model_name = g["model_name"]
            yield g, self.rate(model_name, g["hour"], billed_quantities(g, kinds[model_name]))

    def commit_tiers(self, at: datetime) -> list[CommitTier]:
        """The committed-spend tiers in effect at `at`, by threshold."""
        tiers = [
            CommitTier(o.threshold, o.discount_percent)
            for o in self._overrides
            if o.kind == PriceOverride.Kind.COMMIT_TIER
            and _active(o, at)
            and o.threshold is not None
            and o.discount_percent is not None
        ]
        return sorted(tiers, key=lambda t: t.threshold)


def _active(o: PriceOverride, at: datetime) -> bool:
    return o.effective_from <= at and (o.effective_until is None or at < o.effective_until)


def discounted(list_price: Decimal, percent: Decimal) -> Decimal:
    return (list_price * (HUNDRED - percent) / HUNDRED).quantize(
        UNIT_PRICE_PLACES, rounding=ROUND_HALF_EVEN
    )


def commit_discount(subtotal: Decimal, tiers: Sequence[CommitTier]) -> Decimal:
    """The discount (positive, unrounded) that marginal tiers give on `subtotal`.

    Each tier's percentage applies to the part of the subtotal between its threshold
    and the next tier's, like tax brackets: passing a threshold never makes the
    spend below it cheaper, so the invoice never drops when usage grows.
    """
    discount = Decimal(0)
    for i, tier in enumerate(tiers):
        upper = tiers[i + 1].threshold if i + 1 < len(tiers) else subtotal
        band = min(subtotal, upper) - tier.threshold
        if band > 0:
            discount += band * tier.percent / HUNDRED
    return discount


def price_lookup(
    org: Organization | None, model_name: str, token_kind: str, at: datetime | None = None
) -> EffectivePrice:
    """The unit price per million tokens that `org` pays for a model and token kind at `at`."""
    book = PriceBook.load(org.id if org else None, model_names=[model_name])
    found = book.effective(model_name, token_kind, at or timezone.now())
    if found is None:
        raise NotFound(f"no price for {model_name} {token_kind} tokens", param="model_name")
    return found


# --- Back-office writes ------------------------------------------------------------------


def price_set(
    *,
    principal: Principal,
    model_name: str,
    token_kind: str,
    unit_price: Decimal | str,
    effective_from: datetime,
    reason: str,
    currency: str = "USD",
) -> Price:
    """A new list price from `effective_from` on (the history is kept: nothing is updated).

    `effective_from` is a whole UTC hour (rollups are hourly, so an hour never has two
    prices) and not before the current hour: a price change never re-rates the past, so
    it can never touch a finalized invoice.
    """
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    currency = checks.check_currency(currency)
    model_name = _check_model(model_name)
    token_kind = _check_kind(token_kind, param="token_kind")
    price = check_unit_price(unit_price, param="unit_price")
    _check_from(effective_from)
    try:
        with transaction.atomic():
            row = Price.objects.create(
                model_name=model_name,
                token_kind=token_kind,
                currency=currency,
                unit_price=price,
                effective_from=effective_from,
                reason=reason,
                created_by=principal.user,
            )
            audit_record(
                principal=principal,
                action="billing.price_set",
                target=row,
                organization=None,
                metadata={
                    "model_name": model_name,
                    "token_kind": token_kind,
                    "unit_price": str(price),
                    "currency": currency,
                    "effective_from": effective_from.isoformat(),
                    "reason": reason,
                },
            )
            jobs.queue_wallet_sync_all()
    except IntegrityError as exc:
        raise Conflict(
            f"{model_name} {token_kind} already has a price from {effective_from.isoformat()}",
            param="effective_from",
        ) from exc
    return row


MAX_PRIORITY_MULTIPLIER = Decimal(100)


def tier_multiplier_set(
    *,
    principal: Principal,
    service_tier: str,
    multiplier: Decimal | str,
    effective_from: datetime,
    reason: str,
    model_name: str = "",
) -> TierMultiplier:
    """A service tier's price multiplier from `effective_from` on, for one model or, with
    no `model_name`, every model without its own (the history is kept: nothing is updated).

    Priority is a premium: at least 1 (the online price) and at most 100. Flex is a
    discount: above 0 and at most 1. Whole UTC hours, not in the past, as for prices: a
    change never re-rates the past.
    """
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    if service_tier not in TierMultiplier.Tier.values:
        raise InvalidInput(
            f"service_tier must be one of {sorted(TierMultiplier.Tier.values)}",
            param="service_tier",
        )
    model_name = _check_model(model_name) if (model_name or "").strip() else ""
    value = check_places(parse_decimal(multiplier, param="multiplier"), 4, param="multiplier")
    if service_tier == TierMultiplier.Tier.PRIORITY and not (1 <= value <= MAX_PRIORITY_MULTIPLIER):
        raise InvalidInput(
            f"a priority multiplier is a premium: from 1 to {MAX_PRIORITY_MULTIPLIER}, not {value}",
            param="multiplier",
        )
    if service_tier == TierMultiplier.Tier.FLEX and not (0 < value <= 1):
        raise InvalidInput(
            f"a flex multiplier is a discount: above 0 and at most 1, not {value}",
            param="multiplier",
        )
    _check_from(effective_from)
    try:
        with transaction.atomic():
            row = TierMultiplier.objects.create(
                model_name=model_name,
                service_tier=service_tier,
                multiplier=value,
                effective_from=effective_from,
                reason=reason,
                created_by=principal.user,
            )
            audit_record(
                principal=principal,
                action="billing.tier_multiplier_set",
                target=row,
                organization=None,
                metadata={
                    "model_name": model_name,
                    "service_tier": service_tier,
                    "multiplier": str(value),
                    "effective_from": effective_from.isoformat(),
                    "reason": reason,
                },
            )
            jobs.queue_wallet_sync_all()
    except IntegrityError as exc:
        raise Conflict(
            f"{model_name or 'every model'} {service_tier} already has a multiplier from "
            f"{effective_from.isoformat()}",
            param="effective_from",
        ) from exc
    return row


def price_override_create(
    *,
    principal: Principal,
    org: Organization,
    kind: str,
    effective_from: datetime,
    reason: str,
    model_name: str = "",
    token_kind: str = "",
    unit_price: Decimal | str | None = None,
    discount_percent: Decimal | str | None = None,
    threshold: Decimal | str | None = None,
    effective_until: datetime | None = None,
) -> PriceOverride:
    """Contract terms for one organization (see PriceOverride for the three kinds)."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    if kind not in PriceOverride.Kind.values:
        raise InvalidInput(f"kind must be one of {sorted(PriceOverride.Kind.values)}", param="kind")
    _check_from(effective_from)
    if effective_until is not None:
        checks.check_aware(effective_until, param="effective_until")
        if not is_whole_hour(effective_until) or effective_until <= effective_from:
            raise InvalidInput(
                "effective_until must be a whole UTC hour after effective_from",
                param="effective_until",
            )
    values: dict[str, object] = {"model_name": "", "token_kind": ""}
    if kind == PriceOverride.Kind.RATE:
        values["model_name"] = _check_model(model_name)
        values["token_kind"] = _check_kind(token_kind, param="token_kind")
        if unit_price is None:
            raise InvalidInput("a rate needs unit_price", param="unit_price")
        values["unit_price"] = check_unit_price(unit_price, param="unit_price")
        _refuse(discount_percent=discount_percent, threshold=threshold)
    elif kind == PriceOverride.Kind.DISCOUNT:
        values["model_name"] = _check_model(model_name) if model_name else ""
        values["token_kind"] = _check_kind(token_kind, param="token_kind") if token_kind else ""
        values["discount_percent"] = _check_percent(discount_percent)
        _refuse(unit_price=unit_price, threshold=threshold)
    else:
        if model_name or token_kind:
            raise InvalidInput(
                "a commit tier applies to the whole invoice: no model_name or token_kind",
                param="model_name" if model_name else "token_kind",
            )
        values["discount_percent"] = _check_percent(discount_percent)
        if threshold is None:
            raise InvalidInput("a commit tier needs threshold", param="threshold")
        amount = check_places(parse_decimal(threshold, param="threshold"), 2, param="threshold")
        if amount < 0 or amount > MAX_AMOUNT:
            raise InvalidInput(f"threshold must be in [0, {MAX_AMOUNT}]", param="threshold")
        values["threshold"] = amount
        _refuse(unit_price=unit_price)
    with transaction.atomic():
        row = PriceOverride.objects.create(
            organization=org,
            kind=kind,
            effective_from=effective_from,
            effective_until=effective_until,
            reason=reason,
            created_by=principal.user,
            **values,
        )
        audit_record(
            principal=principal,
            action="billing.price_override_created",
            target=row,
            organization=org,
            metadata={
                "kind": kind,
                **{k: str(v) for k, v in values.items()},
                "effective_from": effective_from.isoformat(),
                "effective_until": effective_until.isoformat() if effective_until else None,
                "reason": reason,
            },
        )
        jobs.queue_wallet_sync(org.id)
    return row


def price_override_end(
    *, principal: Principal, override: PriceOverride, at: datetime, reason: str
) -> PriceOverride:
    """Ends contract terms at `at` (a whole hour, not in the past): the past stays as rated."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    _check_from(at, param="at")
    with transaction.atomic():
        row = PriceOverride.objects.select_for_update().get(pk=override.pk)
        if at <= row.effective_from:
            raise InvalidInput("at must be after the override's effective_from", param="at")
        if row.effective_until is not None and row.effective_until <= at:
            raise Conflict("the override already ends by then", param="at")
        row.effective_until = at
        row.save(update_fields=["effective_until"])
        audit_record(
            principal=principal,
            action="billing.price_override_ended",
            target=row,
            organization=row.organization,
            metadata={"at": at.isoformat(), "reason": reason},
        )
        jobs.queue_wallet_sync(row.organization_id)
    return row


def _check_model(model_name: str) -> str:
    name = (model_name or "").strip()
    if not name:
        raise InvalidInput("model_name must not be empty", param="model_name")
    if not Model.objects.filter(name=name).exists():
        raise InvalidInput(f"model_name {name!r} is not a model of the catalog", param="model_name")
    return name


def _check_kind(token_kind: str, *, param: str) -> str:
    if token_kind not in TokenKind.values:
        raise InvalidInput(f"{param} must be one of {sorted(TokenKind.values)}", param=param)
    if token_kind in TIER_OF:
        tier = TIER_OF[token_kind][0]
        raise InvalidInput(
            f"{param} {token_kind} is priced as the online unit times the {tier} tier's "
            "multiplier: set the online price, or the multiplier (tier_multiplier_set)",
            param=param,
        )
    return token_kind


def check_unit_price(value: Decimal | str, *, param: str) -> Decimal:
    price = check_places(parse_decimal(value, param=param), 9, param=param)
    if price < 0 or price > MAX_UNIT_PRICE:
        raise InvalidInput(f"{param} must be in [0, {MAX_UNIT_PRICE}] per million", param=param)
    return price


def _check_percent(value: Decimal | str | None) -> Decimal:
    if value is None:
        raise InvalidInput("discount_percent is required", param="discount_percent")
    percent = check_places(
        parse_decimal(value, param="discount_percent"), 2, param="discount_percent"
    )
    if not Decimal(0) < percent <= HUNDRED:
        raise InvalidInput("discount_percent must be in (0, 100]", param="discount_percent")
    return percent


def _check_from(at: datetime, *, param: str = "effective_from") -> None:
    checks.check_aware(at, param=param)
    if not is_whole_hour(at):
        raise InvalidInput(f"{param} must be a whole UTC hour (hh:00:00)", param=param)
    if at < hour_start(timezone.now()):
        raise InvalidInput(
            f"{param} must not be in the past: rated usage is never re-priced", param=param
        )


def _refuse(**given: object) -> None:
    for name, value in given.items():
        if value is not None:
            raise InvalidInput(f"{name} does not apply to this kind of override", param=name)


def overrides_active(org: Organization, at: datetime | None = None) -> list[PriceOverride]:
    at = at or timezone.now()
    return list(
        PriceOverride.objects.filter(organization=org, effective_from__lte=at)
        .filter(Q(effective_until__isnull=True) | Q(effective_until__gt=at))
        .order_by("kind", "effective_from")
    )
