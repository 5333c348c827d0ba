"""The usage and cost API's reads: an organization's hourly rollups in time buckets.

`GET /api/v1/organizations/{org}/usage` and `.../costs` (billing/api.py) parse their
query here (`parse_query`) and read one page of buckets (`usage_page`, `cost_page`).
Usage sums the rollups in the database. Costs are rated by the price book's one path
(`PriceBook.rate_rollups`, grouped by model and hour as the invoice groups them), with
provisioned throughput's unit-hours (`provisioned.unit_hours`, as the invoice bills
them), so a closed month's costs are the invoice's usage and provisioned lines: the same
charges, each line's exact amount here, rounded to cents there (docs/api.md, "Usage and
costs").
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Sum
from django.db.models.functions import TruncDay, TruncHour, TruncMonth
from django.http import QueryDict
from django.utils import timezone

from billing import provisioned
from billing.models import UsageRollup
from billing.periods import hour_start, month_start, next_month
from billing.pricing import (
    BATCH_UNITS,
    ROLLUP_SUMS,
    TIER_OF,
    PriceBook,
    Rating,
    model_kinds,
)
from core.errors import DomainError, InvalidInput
from core.redis import get_redis

# Reads (usage and costs together) an organization may make within a window: each costs
# read rates up to a page of hourly rollups in Python, in the processes that serve the
# gateway too, so a loop of them gets a budget. Ample for a finance tool walking a year
# by day (12 pages) or a month by hour (5 pages).
READS_PER_WINDOW = 60
READ_WINDOW_S = 60
_READ_BUDGET_PREFIX = "mantle:usage-api:"
_TAKE = """
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1], 'NX')
return {n, redis.call('TTL', KEYS[1])}
"""


class UsageReadsThrottled(DomainError):
    status = 429
    code = "rate_limit_exceeded"


def read_budget_take(organization_id: str) -> None:
    """Counts one read of the usage and cost API for the organization; UsageReadsThrottled
    (429) past READS_PER_WINDOW within READ_WINDOW_S of its first read in the window."""
    count, ttl = get_redis().eval(
        _TAKE, 1, f"{_READ_BUDGET_PREFIX}{organization_id}", READ_WINDOW_S
    )
    if int(count) <= READS_PER_WINDOW:
        return
    wait = int(ttl) if int(ttl) > 0 else READ_WINDOW_S
    raise UsageReadsThrottled(
        f"at most {READS_PER_WINDOW} usage and cost reads per organization within "
        f"{READ_WINDOW_S} seconds: try again in {wait} seconds"
    )


HOUR, DAY, MONTH = "1h", "1d", "1mo"
WIDTHS = (HOUR, DAY, MONTH)
# Buckets per page: (default, most). Hours and days as OpenAI's usage API bounds them.
PAGE_LIMITS: Mapping[str, tuple[int, int]] = {HOUR: (24, 168), DAY: (7, 31), MONTH: (12, 13)}
# The longest range one query may name: a month of hours, a year (a leap one) of days or
# months. Paging walks inside it; a longer history is several queries.
MAX_SPAN: Mapping[str, timedelta] = {
    HOUR: timedelta(days=31),
    DAY: timedelta(days=366),
    MONTH: timedelta(days=366),
}
# Instants outside these are no time anyone has usage at (and keep datetime in range).
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)

_DIGITS = re.compile(r"[0-9]{1,6}")
_SECONDS = re.compile(r"-?[0-9]{1,12}(\.[0-9]{1,9})?")

USAGE, COSTS = "usage", "costs"
# group_by values -> the rollup column (None: derived from the rollup's parts or charges).
DIMENSIONS: Mapping[str, str | None] = {
    "model": "model_name",
    "project_id": "project_id",
    "api_key_id": "api_key_id",
    "endpoint_id": "endpoint_id",
    "service_class": None,
    "token_kind": None,
}
GROUP_BY: Mapping[str, tuple[str, ...]] = {
    USAGE: ("model", "project_id", "api_key_id", "endpoint_id", "service_class"),
    COSTS: ("model", "project_id", "api_key_id", "endpoint_id", "service_class", "token_kind"),
}
# Filters (OpenAI's names): repeated or comma-separated values -> the rollup column.
FILTERS: Mapping[str, str] = {
    "models": "model_name",
    "project_ids": "project_id",
    "api_key_ids": "api_key_id",
    "endpoint_ids": "endpoint_id",
}
MAX_FILTER_VALUES = 100
ALIASES = {"line_item": "token_kind", "project": "project_id", "api_key": "api_key_id"}

# The line item of provisioned throughput's unit-hours (the invoice's `provisioned` lines).
UNIT_HOURS = "provisioned_unit_hours"

SERVICE_CLASSES = ("online", "batch", "priority", "flex", "provisioned")
# A rollup's parts per service class (the online class is the total less every part).
PART_CLASSES = ("batch", "priority", "flex", "provisioned")
USAGE_FIELDS: Mapping[str, str] = {
    "requests": "requests",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cached_input_tokens": "cached_input_tokens",
    "compute_ms": "compute_ms",
}
# Annotation names: `u_<class>_<field>` (not a field's own name, which an annotation may
# not shadow); the online class's are the totals.
USAGE_SUMS = {
    f"u_{cls}_{name}": Sum(f"{cls}_{column}")
    for cls in PART_CLASSES
    for name, column in USAGE_FIELDS.items()
} | {f"u_online_{name}": Sum(column) for name, column in USAGE_FIELDS.items()}


@dataclass(frozen=True)
class Query:
    kind: str  # USAGE or COSTS
    organization_id: str
    start: datetime  # the first bucket's start
    end: datetime  # the last bucket's end (exclusive)
    width: str
    group_by: tuple[str, ...]  # in GROUP_BY's order
    limit: int
    page_start: datetime  # the first bucket of this page
    # Filters: rollup column -> the values kept (none: every value).
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def fingerprint(self) -> str:
        """What a cursor is bound to: the query less its page and limit."""
        shape: list[Any] = [self.kind, self.organization_id]
        shape += [self.start.timestamp(), self.end.timestamp(), self.width, *self.group_by]
        shape += [[column, *values] for column, values in self.filters]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Bucket:
    start: datetime
    end: datetime
    results: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Page:
    buckets: list[Bucket]
    next_page: str | None


# --- the query ---------------------------------------------------------------------------


def parse_time(raw: str, *, param: str) -> datetime:
    """Unix seconds (`1767225600`) or ISO 8601 (`2026-01-01T00:00:00Z`; no offset: UTC)."""
    value = raw.strip()
    try:
        if _SECONDS.fullmatch(value):
            at = datetime.fromtimestamp(float(value), tz=UTC)
        else:
            at = datetime.fromisoformat(value)
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidInput(
            f"{param} must be unix seconds or an ISO 8601 time, not {raw[:40]!r}", param=param
        ) from None
    if not EARLIEST <= at < LATEST:
        raise InvalidInput(
            f"{param} must lie between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}", param=param
        )
    return at


def bucket_floor(at: datetime, width: str) -> datetime:
    hour = hour_start(at)
    if width == HOUR:
        return hour
    if width == DAY:
        return hour.replace(hour=0)
    return month_start(at)


def bucket_next(start: datetime, width: str) -> datetime:
    if width == HOUR:
        return start + timedelta(hours=1)
    if width == DAY:
        return start + timedelta(days=1)
    return next_month(start)


def bucket_ceil(at: datetime, width: str) -> datetime:
    floor = bucket_floor(at, width)
    return floor if floor == at else bucket_next(floor, width)


def _one(params: QueryDict, name: str) -> str | None:
    values = params.getlist(name)
    if len(values) > 1:
        raise InvalidInput(f"{name} may be given once", param=name)
    return values[0] if values and values[0].strip() else None


def _group_by(params: QueryDict, kind: str) -> tuple[str, ...]:
    wanted: set[str] = set()
    for value in params.getlist("group_by"):
        for part in value.split(","):
            name = part.strip()
            if not name:
                continue
            name = ALIASES.get(name, name)
            if name not in GROUP_BY[kind]:
                note = (
                    " (usage results carry each token kind as a field: token_kind groups costs)"
                    if name == "token_kind"
                    else ""
                )
                raise InvalidInput(
                    f"group_by {part.strip()[:40]!r} is not one of {', '.join(GROUP_BY[kind])}"
                    + note,
                    param="group_by",
                )
            wanted.add(name)
    return tuple(name for name in GROUP_BY[kind] if name in wanted)


def _filters(params: QueryDict) -> tuple[tuple[str, tuple[str, ...]], ...]:
    found = []
    for name, column in FILTERS.items():
        values = sorted(
            {part.strip() for value in params.getlist(name) for part in value.split(",")} - {""}
        )
        if len(values) > MAX_FILTER_VALUES or any(
            len(v) > 200 or not v.isprintable() for v in values
        ):
            raise InvalidInput(
                f"{name} takes at most {MAX_FILTER_VALUES} values of at most 200 printable "
                "characters",
                param=name,
            )
        if values:
            found.append((column, tuple(values)))
    return tuple(found)


def parse_query(
    params: QueryDict, *, kind: str, organization_id: str, now: datetime | None = None
) -> Query:
    """The query of one page, or InvalidInput naming the parameter at fault."""
    now = now or timezone.now()
    width = _one(params, "bucket_width") or DAY
    if width not in WIDTHS:
        raise InvalidInput(
            f"bucket_width must be one of {', '.join(WIDTHS)} (usage is kept by the hour), "
            f"not {width[:20]!r}",
            param="bucket_width",
        )
    raw_start = _one(params, "start_time")
    if raw_start is None:
        raise InvalidInput("start_time is required", param="start_time")
    start = parse_time(raw_start, param="start_time")
    raw_end = _one(params, "end_time")
    end = parse_time(raw_end, param="end_time") if raw_end is not None else now
    if end <= start:
        raise InvalidInput("end_time must be after start_time", param="end_time")
    if end - start > MAX_SPAN[width]:
        raise InvalidInput(
            f"end_time - start_time spans {(end - start).days} days: at most "
            f"{MAX_SPAN[width].days} days with bucket_width {width}",
            param="end_time",
        )
    default, most = PAGE_LIMITS[width]
    raw_limit = _one(params, "limit")
    limit = default
    if raw_limit is not None:
        if not _DIGITS.fullmatch(raw_limit.strip()) or not 1 <= int(raw_limit) <= most:
            raise InvalidInput(
                f"limit must be a whole number of buckets from 1 to {most} with "
                f"bucket_width {width}",
                param="limit",
            )
        limit = int(raw_limit)
    query = Query(
        kind=kind,
        organization_id=organization_id,
        start=bucket_floor(start, width),
        end=bucket_ceil(end, width),
        width=width,
        group_by=_group_by(params, kind),
        limit=limit,
        page_start=bucket_floor(start, width),
        filters=_filters(params),
    )
    cursor = _one(params, "page")
    if cursor is None:
        return query
    page_start = _read_cursor(cursor, query)
    return dataclasses.replace(query, page_start=page_start)


def _cursor(query: Query, at: datetime) -> str:
    body = json.dumps({"at": int(at.timestamp()), "q": query.fingerprint()}).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def _read_cursor(cursor: str, query: Query) -> datetime:
    bad = InvalidInput("page is not a cursor this query returned (next_page)", param="page")
    try:
        padded = cursor.strip() + "=" * (-len(cursor.strip()) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        at = datetime.fromtimestamp(int(body["at"]), tz=UTC)
        fingerprint = str(body["q"])
    except (ValueError, TypeError, KeyError, OverflowError, OSError, binascii.Error):
        raise bad from None
    if fingerprint != query.fingerprint():
        raise InvalidInput(
            "page belongs to another query: keep start_time, end_time, bucket_width, "
            "group_by and the filters as they were when next_page was returned",
            param="page",
        )
    if not query.start <= at < query.end or bucket_floor(at, query.width) != at:
        raise bad
    return at


def _page_bounds(query: Query) -> tuple[list[tuple[datetime, datetime]], str | None]:
    bounds: list[tuple[datetime, datetime]] = []
    at = query.page_start
    while at < query.end and len(bounds) < query.limit:
        after = bucket_next(at, query.width)
        bounds.append((at, after))
        at = after
    return bounds, (_cursor(query, at) if at < query.end else None)


# --- reading -----------------------------------------------------------------------------


def _trunc(width: str) -> Any:
    if width == HOUR:
        return TruncHour("hour", tzinfo=UTC)
    if width == DAY:
        return TruncDay("hour", tzinfo=UTC)
    return TruncMonth("hour", tzinfo=UTC)


def _columns(query: Query) -> list[str]:
    return [c for d in query.group_by if (c := DIMENSIONS[d]) is not None]


def _rows(query: Query, start: datetime, end: datetime) -> Any:
    rows = UsageRollup.objects.filter(
        organization_id=query.organization_id, hour__gte=start, hour__lt=end
    )
    for column, values in query.filters:
        rows = rows.filter(**{f"{column}__in": values})
    return rows


def _result(query: Query, kind_name: str, group: Mapping[str, Any]) -> dict[str, Any]:
    """A result's group fields: each dimension's value where grouped by it, else None."""
    out: dict[str, Any] = {"object": f"organization.{kind_name}.result"}
    for name in ("model", "project_id", "api_key_id", "endpoint_id", "service_class"):
        out[name] = group.get(name)
    return out


def _key(group: Mapping[str, Any], names: Sequence[str]) -> tuple[Any, ...]:
    return tuple(group.get(n) for n in names)


def _group_of(row: Mapping[str, Any], query: Query) -> dict[str, Any]:
    return {d: row[c] for d in query.group_by if (c := DIMENSIONS[d]) is not None}


def usage_page(query: Query) -> Page:
    """One page of usage buckets: requests, tokens and compute time, summed in the database."""
    bounds, next_page = _page_bounds(query)
    if not bounds:
        return Page([], None)
    columns = _columns(query)
    rows = (
        _rows(query, bounds[0][0], bounds[-1][1])
        .annotate(bucket=_trunc(query.width))
        .values("bucket", *columns)
        .annotate(**USAGE_SUMS)
        .order_by("bucket", *columns)
    )
    by_bucket: dict[datetime, list[dict[str, Any]]] = defaultdict(list)
    by_class = "service_class" in query.group_by
    for row in rows:
        group = _group_of(row, query)
        # The online class's sums are every request's; each part's is within them.
        totals = {name: int(row[f"u_online_{name}"] or 0) for name in USAGE_FIELDS}
        parts = {
            cls: {name: int(row[f"u_{cls}_{name}"] or 0) for name in USAGE_FIELDS}
            for cls in PART_CLASSES
        }
        classes = {"online": {n: totals[n] - sum(p[n] for p in parts.values()) for n in totals}}
        classes.update(parts)
        bucket = by_bucket[row["bucket"]]
        if by_class:
            for cls in SERVICE_CLASSES:
                if any(classes[cls].values()):
                    bucket.append(
                        _result(query, "usage", group | {"service_class": cls}) | classes[cls]
                    )
        elif any(totals.values()):
            bucket.append(_result(query, "usage", group) | totals)
    return Page([Bucket(s, e, by_bucket.get(s, [])) for s, e in bounds], next_page)


def service_class_of(line: str) -> str:
    """The service class an invoice line kind bills: `batch_input` -> batch, and so on."""
    if line in BATCH_UNITS:
        return "batch"
    if line in TIER_OF:
        return TIER_OF[line][0]
    return "online"


def _rated(
    query: Query, start: datetime, end: datetime
) -> Iterator[tuple[Mapping[str, Any], Rating]]:
    """(group, Rating) of each (model, hour, grouped columns): the invoice's path."""
    columns = [c for c in _columns(query) if c != "model_name"]
    rows = _rows(query, start, end)
    kinds = model_kinds(rows.values_list("model_name", flat=True).distinct().order_by())
    book = PriceBook.load(query.organization_id, model_names=list(kinds))
    grouped = (
        rows.values("model_name", "hour", *columns)
        .annotate(**ROLLUP_SUMS)
        .order_by("hour", "model_name", *columns)
    )
    yield from book.rate_rollups(grouped.iterator(chunk_size=2000), kinds=kinds)


def _unit_hour_charges(
    query: Query, bounds: Sequence[tuple[datetime, datetime]], now: datetime
) -> Iterator[tuple[datetime, dict[str, Any], Decimal]]:
    """(bucket, group, exact amount) of provisioned throughput's unit-hours: each
    commitment's hours begun in each bucket (`provisioned.unit_hours`, what the invoice's
    provisioned lines bill; commitments start and end on whole hours, so the buckets'
    hours add up to the month's), at its unit-hour price. A commitment belongs to an
    endpoint and its model, not to a project or key."""
    if not provisioned.unit_hours(query.organization_id, bounds[0][0], bounds[-1][1], now=now):
        return
    for start, end in bounds:
        for billed in provisioned.unit_hours(query.organization_id, start, end, now=now):
            c = billed.commitment
            if not _kept(query, model_name=c.model_name, endpoint_id=c.endpoint_id):
                continue
            dimensions = {
                "model": c.model_name,
                "project_id": None,
                "api_key_id": None,
                "endpoint_id": c.endpoint_id,
                "service_class": "provisioned",
                "token_kind": UNIT_HOURS,
            }
            group = {d: dimensions[d] for d in query.group_by}
            yield start, group, Decimal(billed.quantity) * c.unit_hour_price


def _kept(query: Query, **columns: str) -> bool:
    """Whether a unit-hours charge passes the filters: never one by project or key (the
    units belong to neither), else one by model or endpoint naming its own."""
    for column, values in query.filters:
        if column not in columns or columns[column] not in values:
            return False
    return True


def cost_page(query: Query, *, now: datetime | None = None) -> Page:
    """One page of cost buckets: each charge's exact amount at the price of its hour,
    summed per bucket and group, and provisioned throughput's unit-hours. Unpriced usage
    costs nothing here (the invoice holds it for the operator rather than billing it)."""
    bounds, next_page = _page_bounds(query)
    if not bounds:
        return Page([], None)
    names = [*query.group_by]
    sums: dict[datetime, dict[tuple[Any, ...], Decimal]] = defaultdict(dict)
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}

    def add(bucket: datetime, group: dict[str, Any], amount: Decimal) -> None:
        key = _key(group, names)
        groups[key] = group
        sums[bucket][key] = sums[bucket].get(key, Decimal(0)) + amount

    for row, rating in _rated(query, bounds[0][0], bounds[-1][1]):
        bucket = bucket_floor(row["hour"], query.width)
        base = _group_of(row, query)
        for charge in rating.charges:
            amount = charge.amount
            if amount is None:
                continue
            group = dict(base)
            if "token_kind" in query.group_by:
                group["token_kind"] = charge.unit
            if "service_class" in query.group_by:
                group["service_class"] = service_class_of(charge.unit)
            add(bucket, group, amount)
    for bucket, group, amount in _unit_hour_charges(query, bounds, now or timezone.now()):
        add(bucket, group, amount)
    currency = settings.MANTLE_BILLING_CURRENCY.lower()
    buckets = []
    for start, end in bounds:
        results = []
        for key in sorted(sums.get(start, {}), key=lambda k: tuple(str(v) for v in k)):
            group = groups[key]
            result = _result(query, "costs", group)
            result["line_item"] = group.get("token_kind")
            result["amount"] = {"value": money_text(sums[start][key]), "currency": currency}
            results.append(result)
        buckets.append(Bucket(start, end, results))
    return Page(buckets, next_page)


def money_text(amount: Decimal) -> str:
    """An exact amount as a decimal string: never rounded (the invoice rounds each line to
    cents), never in exponent form, with at least cents' places."""
    text = format(amount.normalize(), "f")
    whole, _, places = text.partition(".")
    return f"{whole}.{places.ljust(2, '0')}"
