"""Reads of the back office: the customer page, the usage explorer and its CSV, dashboards."""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from itertools import groupby, islice
from operator import itemgetter
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from accounts.models import ApiKey, AuditLog, Membership, Organization
from billing.budgets import budget_spend, budgets
from billing.credit_notes import credit_notes
from billing.credits import credit_entries
from billing.held_usage import held_usage_for
from billing.metering.lag import drain_lag_history, drain_lag_now
from billing.models import (
    Budget,
    CreditLedgerEntry,
    CreditNote,
    HeldUsage,
    Invoice,
    PriceOverride,
    ProvisionedCommitment,
    StripeCustomer,
    UsageRollup,
)
from billing.money import nanos_amount
from billing.periods import month_start
from billing.pricing import (
    ROLLUP_SUMS,
    UNIT_COLUMNS,
    PriceBook,
    model_kinds,
    split_quantities,
)
from billing.provisioned import Utilization, utilization
from billing.selectors import Balance, balance_summary, invoices
from catalog.models import Endpoint
from core.csv_export import csv_writer
from core.errors import InvalidInput

logger = logging.getLogger(__name__)

ZERO = Decimal(0)
NANO = Decimal("0.000000001")


def nano_text(amount: Decimal) -> str:
    """An amount as CSV writes it: to the nano, in plain digits (0.000000000, not 0E-9)."""
    return f"{amount.quantize(NANO, rounding=ROUND_HALF_EVEN):f}"


CSV_COLUMNS = (
    "hour",
    "organization_id",
    "project_id",
    "api_key_id",
    "endpoint_id",
    "model_name",
    "requests",
    "input_tokens",
    "output_tokens",
)
CSV_AMOUNT_COLUMNS = ("amount", "currency")
"""Each row rated at its organization's prices for that hour (list prices with its rate
overrides and discounts), exact to the nano; blank when nothing prices the model. Commit
tiers and credits apply to a month's totals, so they are on invoices, not here."""
CSV_LATER_COLUMNS = (
    "cached_input_tokens",
    "batch_requests",
    "batch_input_tokens",
    "batch_output_tokens",
    "batch_cached_input_tokens",
    "priority_requests",
    "priority_input_tokens",
    "priority_output_tokens",
    "priority_cached_input_tokens",
    "flex_requests",
    "flex_input_tokens",
    "flex_output_tokens",
    "flex_cached_input_tokens",
    "provisioned_requests",
    "provisioned_input_tokens",
    "provisioned_output_tokens",
    "provisioned_cached_input_tokens",
)
"""Columns added since, at the end so that none of the earlier ones moves: of
input_tokens, those the prefix cache served; then the part of requests, input, output and
cached input tokens that batch lines made (billed at batch prices); then the same parts of
the priority and flex service tiers (billed at the online prices times the tier's
multiplier), and of provisioned throughput (0 per token: its units are billed per
unit-hour)."""
CSV_COST_COLUMNS = ("cost_of_goods", "estimated_requests")
"""Last (added for upstream providers, docs/providers.md): what the providers charged for
the row's relayed requests (cost of goods, in the currency, exact to the nano; 0 for a
pool's), and how many of its requests had counts the gateway estimated."""
# What a CSV row reads: its columns, then each class's compute_ms, which only its amount
# uses (tensor models bill them), then the later columns, then the relayed sums.
_CSV_READ = (
    *CSV_COLUMNS,
    "compute_ms",
    "batch_compute_ms",
    "priority_compute_ms",
    "flex_compute_ms",
    "provisioned_compute_ms",
    *CSV_LATER_COLUMNS,
    "cost_nanos",
    "estimated_requests",
)
# Rows per database round trip while streaming: memory stays at one chunk.
CSV_CHUNK_ROWS = 2000


# --- Customer page -------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRow:
    key: ApiKey
    status: str  # active | revoked | expired


@dataclass(frozen=True)
class BudgetRow:
    budget: Budget
    spend: Decimal


@dataclass(frozen=True)
class ModelUsage:
    model_name: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0  # of input_tokens, those the prefix cache served
    # Of requests, input and output tokens, the batch lines' part (billed at batch prices).
    batch_requests: int = 0
    batch_input_tokens: int = 0
    batch_output_tokens: int = 0


@dataclass(frozen=True)
class CustomerOverview:
    org: Organization
    balance: Balance
    members: list[Membership]
    keys: list[KeyRow]
    endpoints: list[Endpoint]
    ledger: list[CreditLedgerEntry]
    budgets: list[BudgetRow]
    usage: list[ModelUsage]
    invoices: list[Invoice]
    credit_notes: list[CreditNote]
    overrides: list[PriceOverride]
    audit: list[AuditLog]
    stripe_customer_id: str | None
    stripe_url: str | None
    held_usage: list[HeldUsage] = field(default_factory=list)
    # Provisioned throughput: every commitment, newest first, and the use of those in effect.
    commitments: list[ProvisionedCommitment] = field(default_factory=list)
    utilization: list[Utilization] = field(default_factory=list)


def key_status(key: ApiKey, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def stripe_dashboard_url(customer_id: str) -> str:
    # Test-mode objects live under /test/ in Stripe's dashboard.
    mode = "test/" if settings.STRIPE_API_KEY.startswith(("sk_test_", "rk_test_")) else ""
    return f"https://dashboard.stripe.com/{mode}customers/{customer_id}"


def customer_overview(org: Organization, *, now: datetime | None = None) -> CustomerOverview:
    """Everything staff need about one organization, for one page. Secrets never included."""
    now = now or timezone.now()
    month = month_start(now)
    stripe = StripeCustomer.objects.filter(organization=org).first()
    usage = (
        UsageRollup.objects.filter(organization_id=org.id, hour__gte=month)
        .values("model_name")
        .annotate(**_MODEL_SUMS)
        .order_by("model_name")
    )
    return CustomerOverview(
        org=org,
        balance=balance_summary(org, now=now),
        members=list(
            Membership.objects.filter(organization=org).select_related("user").order_by("role")
        ),
        keys=[
            KeyRow(k, key_status(k, now))
            for k in ApiKey.objects.filter(organization=org)
            .select_related("project")
            .only(
                "id",
                "name",
                "prefix",
                "scopes",
                "created_at",
                "expires_at",
                "revoked_at",
                "last_used_at",
                "project__name",
            )
            .order_by("-created_at")
        ],
        endpoints=list(
            Endpoint.objects.filter(organization=org)
            .select_related("model_version__model", "pool")
            .order_by("name")
        ),
        ledger=list(credit_entries(org)[:50]),
        budgets=[BudgetRow(b, budget_spend(b, month)) for b in budgets(org)],
        usage=[_model_usage(u) for u in usage],
        invoices=list(invoices(org)[:24]),
        credit_notes=list(credit_notes(org).select_related("invoice")[:24]),
        overrides=list(
            PriceOverride.objects.filter(organization=org).order_by("-effective_from", "-id")
        ),
        audit=list(AuditLog.objects.filter(organization=org).order_by("-created_at", "-id")[:20]),
        stripe_customer_id=stripe.stripe_customer_id if stripe else None,
        stripe_url=stripe_dashboard_url(stripe.stripe_customer_id) if stripe else None,
        held_usage=list(held_usage_for(org)[:50]),
        commitments=list(
            ProvisionedCommitment.objects.filter(organization=org)
            .select_related("endpoint")
            .order_by("-starts_at", "-id")[:50]
        ),
        utilization=utilization(org, now=now),
    )


# --- Usage explorer ------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageFilter:
    """A range of hourly rollups; empty strings match everything."""

    start: datetime
    end: datetime
    organization_id: str = ""
    project_id: str = ""
    api_key_id: str = ""
    endpoint_id: str = ""
    model_name: str = ""

    def as_params(self) -> dict[str, str]:
        params = {
            "org": self.organization_id,
            "project": self.project_id,
            "key": self.api_key_id,
            "endpoint": self.endpoint_id,
            "model": self.model_name,
            "start": self.start.strftime("%Y-%m-%dT%H:%M"),
            "end": self.end.strftime("%Y-%m-%dT%H:%M"),
        }
        return {k: v for k, v in params.items() if v}


FILTER_FIELDS = {
    "org": "organization_id",
    "project": "project_id",
    "key": "api_key_id",
    "endpoint": "endpoint_id",
    "model": "model_name",
}


def _parse_instant(value: str, *, param: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(
            f"{param} must be a date or date and time (YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC)",
            param=param,
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def usage_filter_parse(params: Mapping[str, str], *, now: datetime | None = None) -> UsageFilter:
    """The explorer's query string, validated; defaults to this month so far."""
    now = now or timezone.now()
    values: dict[str, Any] = {}
    for param, name in FILTER_FIELDS.items():
        value = (params.get(param) or "").strip()
        if len(value) > 200:
            raise InvalidInput(f"{param} must be at most 200 characters", param=param)
        values[name] = value
    org_id = values["organization_id"]
    if org_id and not Organization.objects.filter(id=org_id).exists():
        raise InvalidInput(f"organization {org_id!r} does not exist", param="org")
    start_raw, end_raw = params.get("start") or "", params.get("end") or ""
    start = _parse_instant(start_raw, param="start") if start_raw.strip() else month_start(now)
    end = (
        _parse_instant(end_raw, param="end")
        if end_raw.strip()
        else now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    )
    if end <= start:
        raise InvalidInput("end must be after start", param="end")
    return UsageFilter(start=start, end=end, **values)


def usage_rows(f: UsageFilter) -> QuerySet[UsageRollup]:
    rows = UsageRollup.objects.filter(hour__gte=f.start, hour__lt=f.end)
    for name in FILTER_FIELDS.values():
        value = getattr(f, name)
        if value:
            rows = rows.filter(**{name: value})
    return rows


@dataclass(frozen=True)
class UsageTotals:
    rows: int
    requests: int
    input_tokens: int
    output_tokens: int
    by_model: list[ModelUsage] = field(default_factory=list)
    # Usage charges (exact, before discounts and credits); only for one organization,
    # whose own prices and contract terms apply.
    charges: Decimal | None = None
    cached_input_tokens: int = 0  # of input_tokens, those the prefix cache served
    # Of requests, input and output tokens, the batch lines' part (billed at batch prices).
    batch_requests: int = 0
    batch_input_tokens: int = 0
    batch_output_tokens: int = 0
    # What upstream providers charged for the relayed requests (cost of goods, exact), and
    # how many requests had estimated counts.
    cost: Decimal = ZERO
    estimated_requests: int = 0


_MODEL_SUMS = {
    "r": Sum("requests"),
    "i": Sum("input_tokens"),
    "o": Sum("output_tokens"),
    "ci": Sum("cached_input_tokens"),
    "br": Sum("batch_requests"),
    "bi": Sum("batch_input_tokens"),
    "bo": Sum("batch_output_tokens"),
}


# Of relayed requests: the providers' charges (nanos) and the requests with estimated counts.
_RELAYED_SUMS = {"cn": Sum("cost_nanos"), "er": Sum("estimated_requests")}


def _model_usage(row: Mapping[str, Any]) -> ModelUsage:
    return ModelUsage(
        row["model_name"],
        *(row[key] or 0 for key in ("r", "i", "o", "ci", "br", "bi", "bo")),
    )


def usage_totals(f: UsageFilter) -> UsageTotals:
    rows = usage_rows(f)
    agg = rows.aggregate(n=Count("id"), **_MODEL_SUMS, **_RELAYED_SUMS)
    by_model = [
        _model_usage(m)
        for m in rows.values("model_name").annotate(**_MODEL_SUMS).order_by("model_name")
    ]
    charges = None
    if f.organization_id:
        charges = _charges(rows, f.organization_id)
    return UsageTotals(
        rows=agg["n"] or 0,
        requests=agg["r"] or 0,
        input_tokens=agg["i"] or 0,
        output_tokens=agg["o"] or 0,
        by_model=by_model,
        charges=charges,
        cached_input_tokens=agg["ci"] or 0,
        batch_requests=agg["br"] or 0,
        batch_input_tokens=agg["bi"] or 0,
        batch_output_tokens=agg["bo"] or 0,
        cost=nanos_amount(agg["cn"] or 0),
        estimated_requests=agg["er"] or 0,
    )


def _charges(rows: QuerySet[UsageRollup], organization_id: str) -> Decimal:
    book = PriceBook.load(organization_id)
    grouped = rows.values("model_name", "hour").annotate(**ROLLUP_SUMS).order_by()
    return sum((rating.amount or ZERO for _, rating in book.rate_rollups(grouped)), ZERO)


def usage_recent(f: UsageFilter, limit: int = 50) -> list[UsageRollup]:
    return list(usage_rows(f).order_by("-hour", "-id")[:limit])


def _csv_values(f: UsageFilter) -> QuerySet[UsageRollup, tuple[Any, ...]]:
    return usage_rows(f).order_by("hour", "id").values_list(*_CSV_READ)


def usage_csv(f: UsageFilter) -> Iterator[str]:
    """The rows as CSV text, CSV_CHUNK_ROWS rows per chunk, read through a server-side
    cursor on PostgreSQL: memory holds one chunk, whatever the range."""
    header: tuple[str, ...] = (
        *CSV_COLUMNS,
        *CSV_AMOUNT_COLUMNS,
        *CSV_LATER_COLUMNS,
        *CSV_COST_COLUMNS,
    )
    rated = _RowRater()
    rows = _csv_values(f).iterator(chunk_size=CSV_CHUNK_ROWS)
    later_at = len(_CSV_READ) - len(CSV_LATER_COLUMNS) - 2
    while True:
        chunk = list(islice(rows, CSV_CHUNK_ROWS))
        # A new buffer per chunk: a StringIO only ever written to keeps ASCII text at a
        # byte a character; one reused (seek, truncate) holds four, a fifth of the peak.
        buffer = io.StringIO()
        # Model names (and any text column added later) may be a customer's: formulas
        # defused.
        writer = csv_writer(buffer, lineterminator="\n")
        if header:
            writer.writerow(header)
            header = ()
        for row in chunk:
            written = row[1 : len(CSV_COLUMNS)]
            later = row[later_at:-2]
            writer.writerow(
                (
                    row[0].strftime("%Y-%m-%dT%H:%M:%SZ"),
                    *written,
                    *rated(row),
                    *later,
                    nano_text(nanos_amount(row[-2])),  # cost_of_goods
                    row[-1],  # estimated_requests
                )
            )
        text = buffer.getvalue()
        if text:
            yield text
        if len(chunk) < CSV_CHUNK_ROWS:
            return


class _RowRater:
    """A CSV row's amount: list prices loaded once, each organization's overrides once."""

    _AT = {name: i for i, name in enumerate(_CSV_READ)}
    _AT_UNIT = {unit: _CSV_READ.index(column) for unit, column in UNIT_COLUMNS.items()}

    def __init__(self) -> None:
        self._list = PriceBook.load(None)
        self._books: dict[str, PriceBook] = {}
        self._kinds: dict[str, str] = {}  # model -> kind, one query per model, not per row
        self._currency = str(settings.MANTLE_BILLING_CURRENCY)

    def __call__(self, row: tuple[Any, ...]) -> tuple[str, str]:
        at = self._AT
        organization_id = row[at["organization_id"]]
        book = self._books.get(organization_id)
        if book is None:
            book = self._books[organization_id] = self._list.for_organization(organization_id)
        model_name = row[at["model_name"]]
        kind = self._kinds.get(model_name)
        if kind is None:
            kind = self._kinds[model_name] = model_kinds([model_name])[model_name]
        totals = {unit: row[i] for unit, i in self._AT_UNIT.items()}
        amount = book.rate(model_name, row[at["hour"]], split_quantities(totals, kind)).amount
        if amount is None:
            return "", ""
        return nano_text(amount), self._currency


async def usage_csv_async(f: UsageFilter) -> AsyncIterator[str]:
    """The same CSV for ASGI servers, which would otherwise read a sync iterator whole.

    Django serves a sync iterator under ASGI by reading it into a list first, exactly what
    a large export must not do. Each chunk is produced by the sync generator in Django's
    thread for sync code (thread-sensitive), so its cursor stays on one connection.
    """
    chunks = usage_csv(f)

    def next_chunk() -> str | None:
        return next(chunks, None)

    while (chunk := await sync_to_async(next_chunk)()) is not None:
        yield chunk


# --- Margin ----------------------------------------------------------------------------------

HUNDRED = Decimal(100)
PERCENT = Decimal("0.01")
MARGIN_CSV_COLUMNS = (
    "organization_id",
    "organization_name",
    "model_name",
    "requests",
    "estimated_requests",
    "revenue",
    "cost_of_goods",
    "margin",
    "margin_percent",
    "currency",
    "unpriced_requests",
)
"""One row per (organization, model) of the period. Revenue is usage charges at the
organization's prices (the invoice's rating, exact to the nano, before commit tiers and
credits); cost of goods what upstream providers charged for its relayed requests; margin
= revenue - cost of goods; margin_percent of revenue (blank without revenue);
unpriced_requests those whose usage no price covered (held, not in revenue)."""


@dataclass
class MarginLine:
    """Revenue and cost of goods of one model, one organization, one of each, or all."""

    organization_id: str = ""
    organization_name: str = ""
    model_name: str = ""
    requests: int = 0
    estimated_requests: int = 0  # of requests, those whose counts the gateway estimated
    unpriced_requests: int = 0  # of requests, those in hours some unit had no price
    revenue: Decimal = ZERO
    cost_nanos: int = 0

    @property
    def cost(self) -> Decimal:
        return nanos_amount(self.cost_nanos)

    @property
    def margin(self) -> Decimal:
        return self.revenue - self.cost

    @property
    def margin_percent(self) -> Decimal | None:
        """The margin as a percentage of revenue, to 0.01; None without revenue."""
        if not self.revenue:
            return None
        return (self.margin * HUNDRED / self.revenue).quantize(PERCENT, rounding=ROUND_HALF_EVEN)

    def add(self, other: MarginLine) -> None:
        self.requests += other.requests
        self.estimated_requests += other.estimated_requests
        self.unpriced_requests += other.unpriced_requests
        self.revenue += other.revenue
        self.cost_nanos += other.cost_nanos


@dataclass(frozen=True)
class Margin:
    start: datetime
    end: datetime
    currency: str
    total: MarginLine
    by_model: list[MarginLine]  # by revenue, highest first
    by_organization: list[MarginLine]  # by revenue, highest first
    lines: list[MarginLine]  # per (organization, model), by organization id and model


def margin(f: UsageFilter) -> Margin:
    """Revenue, cost of goods and margin of the filtered rollups, per model, organization
    and both.

    Revenue is rated through `PriceBook.rate_rollups`, the invoices' rating path: each
    organization's hours at its own prices (list prices, rates, discounts), exact; invoices
    then round per line and apply commit tiers and credits. One pass over the rollups
    grouped by (organization, model, hour), list prices loaded once and each
    organization's overrides once. Cost of goods is the rollups' `cost_nanos`: what the
    providers charge for relayed requests (a pool's requests cost none here).
    """
    rows = usage_rows(f)
    grouped = (
        rows.values("organization_id", "model_name", "hour")
        .annotate(**ROLLUP_SUMS, **_RELAYED_SUMS)
        .order_by("organization_id", "hour")
    )
    kinds = model_kinds(rows.order_by().values_list("model_name", flat=True).distinct())
    list_book = PriceBook.load(None)
    pairs: dict[tuple[str, str], MarginLine] = {}
    streamed: Iterator[Mapping[str, Any]] = grouped.iterator(chunk_size=5000)
    for organization_id, groups in groupby(streamed, key=itemgetter("organization_id")):
        book = list_book.for_organization(organization_id)
        for g, rating in book.rate_rollups(groups, kinds=kinds):
            key = (organization_id, g["model_name"])
            line = pairs.get(key)
            if line is None:
                line = pairs[key] = MarginLine(organization_id, "", g["model_name"])
            requests = int(g["r"] or 0)
            line.requests += requests
            line.estimated_requests += int(g["er"] or 0)
            line.cost_nanos += int(g["cn"] or 0)
            line.revenue += rating.amount or ZERO
            if rating.unpriced:
                line.unpriced_requests += requests
    names = dict(
        Organization.objects.filter(id__in={org for org, _ in pairs}).values_list("id", "name")
    )
    total = MarginLine()
    by_model: dict[str, MarginLine] = {}
    by_org: dict[str, MarginLine] = {}
    for (organization_id, model_name), line in pairs.items():
        line.organization_name = names.get(organization_id, "")
        total.add(line)
        by_model.setdefault(model_name, MarginLine(model_name=model_name)).add(line)
        by_org.setdefault(organization_id, MarginLine(organization_id, line.organization_name)).add(
            line
        )

    def ranked(lines: Iterable[MarginLine]) -> list[MarginLine]:
        return sorted(
            lines, key=lambda m: (-m.revenue, -m.requests, m.model_name, m.organization_id)
        )

    return Margin(
        start=f.start,
        end=f.end,
        currency=str(settings.MANTLE_BILLING_CURRENCY),
        total=total,
        by_model=ranked(by_model.values()),
        by_organization=ranked(by_org.values()),
        lines=[pairs[key] for key in sorted(pairs)],
    )


def margin_csv(m: Margin) -> str:
    """The margin's (organization, model) lines as CSV (MARGIN_CSV_COLUMNS). Amounts exact
    to the nano; margin is written as revenue - cost of goods of the written figures, so
    the columns add up in a spreadsheet."""
    buffer = io.StringIO()
    # Organization and model names are customers': formulas defused.
    writer = csv_writer(buffer, lineterminator="\n")
    writer.writerow(MARGIN_CSV_COLUMNS)
    for line in m.lines:
        revenue = line.revenue.quantize(NANO, rounding=ROUND_HALF_EVEN)
        percent = line.margin_percent
        writer.writerow(
            (
                line.organization_id,
                line.organization_name,
                line.model_name,
                line.requests,
                line.estimated_requests,
                nano_text(revenue),
                nano_text(line.cost),
                nano_text(revenue - line.cost),
                "" if percent is None else f"{percent:f}",
                m.currency,
                line.unpriced_requests,
            )
        )
    return buffer.getvalue()


# --- Dashboards ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DayPoint:
    day: date
    input_tokens: int
    output_tokens: int
    revenue: Decimal
    cached_input_tokens: int = 0  # of input_tokens, those the prefix cache served


@dataclass(frozen=True)
class ModelPoint:
    model_name: str
    input_tokens: int
    output_tokens: int
    revenue: Decimal
    cached_input_tokens: int = 0


@dataclass(frozen=True)
class CustomerPoint:
    organization_id: str
    name: str
    revenue: Decimal
    tokens: int


@dataclass(frozen=True)
class Dashboard:
    start: datetime
    end: datetime
    days: list[DayPoint]
    models: list[ModelPoint]
    top_customers: list[CustomerPoint]
    drain_lag_now: float
    drain_lag_history: list[tuple[float, float]]  # (unix seconds, lag seconds)
    open_drafts: int
    unpaid_invoices: int
    unpaid_total: Decimal
    suspended_organizations: int


def dashboard(*, now: datetime | None = None, days: int = 30, top: int = 10) -> Dashboard:
    """Tokens and revenue per day and per model over `days` days, top customers by revenue.

    Revenue is usage charges: each organization's hours at its own effective prices,
    exact (invoices round per line and apply tiers and credits on top). One pass over the
    rollups grouped by (organization, model, hour); one organization's price book at a time.
    """
    now = now or timezone.now()
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = (end - timedelta(days=days)).replace(hour=0)
    per_day: dict[date, list[Any]] = {}
    day = start.date()
    while day <= end.date():
        per_day[day] = [0, 0, ZERO, 0]
        day += timedelta(days=1)
    per_model: dict[str, list[Any]] = defaultdict(lambda: [0, 0, ZERO, 0])
    per_org: dict[str, list[Any]] = defaultdict(lambda: [ZERO, 0])
    rows = UsageRollup.objects.filter(hour__gte=start, hour__lt=end)
    grouped = (
        rows.values("organization_id", "model_name", "hour")
        .annotate(**ROLLUP_SUMS)
        .order_by("organization_id", "hour")
    )
    kinds = model_kinds(rows.order_by().values_list("model_name", flat=True).distinct())
    # Mapping[str, Any]: django-stubs' values() row types leave **ROLLUP_SUMS out.
    streamed: Iterator[Mapping[str, Any]] = grouped.iterator(chunk_size=5000)
    for organization_id, groups in groupby(streamed, key=itemgetter("organization_id")):
        book = PriceBook.load(organization_id)
        for g, rating in book.rate_rollups(groups, kinds=kinds):
            revenue = rating.amount or ZERO
            d = g["hour"].astimezone(UTC).date()
            bucket = per_day.setdefault(d, [0, 0, ZERO, 0])
            bucket[0] += g["i"]
            bucket[1] += g["o"]
            bucket[2] += revenue
            bucket[3] += g["ci"]
            m = per_model[g["model_name"]]
            m[0] += g["i"]
            m[1] += g["o"]
            m[2] += revenue
            m[3] += g["ci"]
            o = per_org[organization_id]
            o[0] += revenue
            o[1] += g["i"] + g["o"]
    ranked = sorted(per_org.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))[:top]
    names = dict(
        Organization.objects.filter(id__in=[org_id for org_id, _ in ranked]).values_list(
            "id", "name"
        )
    )
    unpaid = Invoice.objects.filter(status=Invoice.Status.FINALIZED).aggregate(
        n=Count("id"), s=Sum("total")
    )
    return Dashboard(
        start=start,
        end=end,
        days=[DayPoint(d, v[0], v[1], v[2], v[3]) for d, v in sorted(per_day.items())],
        models=[
            ModelPoint(name, v[0], v[1], v[2], v[3])
            for name, v in sorted(per_model.items(), key=lambda item: (-item[1][2], item[0]))
        ],
        top_customers=[
            CustomerPoint(org_id, names.get(org_id, org_id), v[0], v[1]) for org_id, v in ranked
        ],
        drain_lag_now=drain_lag_now(),
        drain_lag_history=drain_lag_history(),
        open_drafts=Invoice.objects.filter(status=Invoice.Status.DRAFT).count(),
        unpaid_invoices=unpaid["n"] or 0,
        unpaid_total=unpaid["s"] or ZERO,
        suspended_organizations=Organization.objects.filter(
            ~Q(status=Organization.Status.ACTIVE)
        ).count(),
    )
