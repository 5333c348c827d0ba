"""Reads for console pages: usage reports, the model catalog with prices, endpoint health,
batches."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.core.paginator import Page, Paginator
from django.db.models import Count, Q, Sum
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from accounts.models import ApiKey, Organization, Project
from accounts.permissions import Scope
from billing.models import TokenKind, UsageRollup
from billing.pricing import (
    BATCH_UNITS,
    ROLLUP_SUMS,
    TIER_OF,
    TIERS,
    TOKEN_UNITS,
    EffectivePrice,
    PriceBook,
)
from catalog.models import Endpoint, Model, ModelVersion
from catalog.selectors import endpoints_visible_to
from core.csv_export import csv_writer
from core.errors import InvalidInput, NotFound
from core.redis import get_redis
from gateway import batches, files
from gateway.models import Batch
from gateway.protocol_batches import BatchError
from workers.contract import HEARTBEAT_TTL_S, pool_live_key

ZERO = Decimal(0)
MAX_RANGE_DAYS = 366
DIMENSIONS = ("day", "model", "key", "project")


# --- Usage ---------------------------------------------------------------------------------


@dataclass
class UsageRow:
    """Sums for one value of the chosen dimension (a day, a model, a key or a project)."""

    key: str
    label: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = ZERO
    unpriced_tokens: int = 0
    compute_ms: int = 0  # tensor models are billed per request and compute millisecond
    cached_input_tokens: int = 0  # of input_tokens, those the prefix cache served
    # Of each figure above, the part of batch lines (the Batch API), billed at batch prices.
    batch_requests: int = 0
    batch_input_tokens: int = 0
    batch_output_tokens: int = 0
    batch_cached_input_tokens: int = 0
    batch_cost: Decimal = ZERO
    # Of the totals, the priority and flex service tiers' part (billed at the online price
    # times the tier's multiplier) and what they cost.
    priority_requests: int = 0
    priority_tokens: int = 0
    priority_cost: Decimal = ZERO
    flex_requests: int = 0
    flex_tokens: int = 0
    flex_cost: Decimal = ZERO

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def batch_tokens(self) -> int:
        return self.batch_input_tokens + self.batch_output_tokens


@dataclass
class UsageReport:
    start: date
    end: date  # inclusive
    dimension: str
    rows: list[UsageRow]
    total: UsageRow
    currency: str = "USD"
    notes: list[str] = field(default_factory=list)

    def chart_data(self) -> dict[str, object]:
        return {
            "labels": [r.label for r in self.rows],
            "input": [r.input_tokens for r in self.rows],
            "output": [r.output_tokens for r in self.rows],
            "cost": [float(r.cost) for r in self.rows],  # for drawing only; tables use Decimal
        }


def usage_range(
    start: date | None, end: date | None, *, today: date | None = None
) -> tuple[date, date]:
    """The range to report on (inclusive UTC days); the last 7 days when not given."""
    today = today or timezone.now().date()
    end = end or today
    start = start or end - timedelta(days=6)
    if start > end:
        raise InvalidInput("the start date must not be after the end date", param="start")
    if (end - start).days + 1 > MAX_RANGE_DAYS:
        raise InvalidInput(f"a range may span at most {MAX_RANGE_DAYS} days", param="start")
    return start, end


def _bounds(start: date, end: date) -> tuple[datetime, datetime]:
    return (
        datetime.combine(start, time.min, tzinfo=UTC),
        datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC),
    )


def usage_report(
    org: Organization, *, start: date, end: date, dimension: str, project_id: str | None = None
) -> UsageReport:
    """Tokens and cost of [start, end] (UTC days) by day, model, key or project.

    Read from the hourly rollups (what invoices read), each hour at the organization's
    price in effect at its start, unrounded: a table of many small requests must not
    round every row to zero cents. Days without usage appear as zero rows.
    """
    if dimension not in DIMENSIONS:
        raise InvalidInput(f"group by must be one of {list(DIMENSIONS)}", param="group")
    lo, hi = _bounds(start, end)
    qs = UsageRollup.objects.filter(organization_id=org.id, hour__gte=lo, hour__lt=hi)
    if project_id:
        qs = qs.filter(project_id=project_id)
    # Sequence[Mapping[str, Any]]: django-stubs' values() row types leave **ROLLUP_SUMS out.
    grouped: Sequence[Mapping[str, Any]] = list(
        qs.values("hour", "model_name", "api_key_id", "project_id").annotate(**ROLLUP_SUMS)
    )
    book = PriceBook.load(org.id)
    labels = _labels(org, dimension)
    rows: dict[str, UsageRow] = {}
    if dimension == "day":
        day = start
        while day <= end:
            rows[day.isoformat()] = UsageRow(key=day.isoformat(), label=day.isoformat())
            day += timedelta(days=1)
    total = UsageRow(key="total", label="Total")
    unpriced_models: set[str] = set()
    for g, rating in book.rate_rollups(grouped):
        hour: datetime = g["hour"]
        key = {
            "day": hour.date().isoformat(),
            "model": g["model_name"],
            "key": g["api_key_id"],
            "project": g["project_id"],
        }[dimension]
        row = rows.get(key)
        if row is None:
            row = rows[key] = UsageRow(key=key, label=labels.get(key, key))
        cost = rating.amount or ZERO
        # Batch lines' charges keep their `batch_` unit whatever price applies.
        batch_cost = sum((c.amount or ZERO for c in rating.charges if c.unit in BATCH_UNITS), ZERO)
        tier_costs = {
            tier: sum(
                (c.amount or ZERO for c in rating.charges if TIER_OF.get(c.unit, ("",))[0] == tier),
                ZERO,
            )
            for tier in TIERS
        }
        unpriced = 0
        for charge in rating.unpriced:
            if charge.unit in TOKEN_UNITS:
                unpriced += charge.quantity
            unpriced_models.add(g["model_name"])
        for target in (row, total):
            target.requests += g["r"]
            target.input_tokens += g["i"]
            target.output_tokens += g["o"]
            target.compute_ms += g["c"] or 0
            target.cached_input_tokens += g["ci"] or 0
            target.batch_requests += g["br"] or 0
            target.batch_input_tokens += g["bi"] or 0
            target.batch_output_tokens += g["bo"] or 0
            target.batch_cached_input_tokens += g["bci"] or 0
            target.cost += cost
            target.batch_cost += batch_cost
            target.priority_requests += g["s_priority_request"] or 0
            target.priority_tokens += (g["s_priority_input"] or 0) + (g["s_priority_output"] or 0)
            target.priority_cost += tier_costs["priority"]
            target.flex_requests += g["s_flex_request"] or 0
            target.flex_tokens += (g["s_flex_input"] or 0) + (g["s_flex_output"] or 0)
            target.flex_cost += tier_costs["flex"]
            target.unpriced_tokens += unpriced
    ordered = list(rows.values())
    if dimension != "day":
        ordered.sort(key=lambda r: (-r.total_tokens, r.label))
    notes = [
        f"{name} has no price yet: its usage is counted, not charged"
        for name in sorted(unpriced_models)
    ]
    return UsageReport(
        start=start, end=end, dimension=dimension, rows=ordered, total=total, notes=notes
    )


def _labels(org: Organization, dimension: str) -> dict[str, str]:
    if dimension == "key":
        return {
            k.id: f"{k.name} ({k.prefix}…)"
            for k in ApiKey.objects.filter(organization=org).only("id", "name", "prefix")
        }
    if dimension == "project":
        return dict(Project.objects.filter(organization=org).values_list("id", "name"))
    return {}


def usage_csv(report: UsageReport) -> str:
    """The report's table as CSV; costs at full precision (nine decimals, like prices).

    Columns are only ever added at the end, so a customer's script that reads them by
    position keeps working: `cached_input_tokens` (a part of `input_tokens`), then the
    batch lines' part of requests, tokens and cost (`batch_*`, billed at batch prices).
    """
    out = io.StringIO()
    writer = csv_writer(out)  # names are the customer's: formula cells are defused
    currency = report.currency.lower()
    writer.writerow(
        [report.dimension, "id", "requests", "input_tokens", "output_tokens", "total_tokens",
         f"cost_{currency}", "unpriced_tokens", "cached_input_tokens", "batch_requests",
         "batch_input_tokens", "batch_output_tokens", "batch_cached_input_tokens",
         f"batch_cost_{currency}", "priority_requests", "priority_tokens",
         f"priority_cost_{currency}", "flex_requests", "flex_tokens", f"flex_cost_{currency}"]
    )  # fmt: skip
    for r in [*report.rows, report.total]:
        writer.writerow(
            [r.label, r.key, r.requests, r.input_tokens, r.output_tokens, r.total_tokens,
             f"{r.cost:.9f}", r.unpriced_tokens, r.cached_input_tokens, r.batch_requests,
             r.batch_input_tokens, r.batch_output_tokens, r.batch_cached_input_tokens,
             f"{r.batch_cost:.9f}", r.priority_requests, r.priority_tokens,
             f"{r.priority_cost:.9f}", r.flex_requests, r.flex_tokens, f"{r.flex_cost:.9f}"]
        )  # fmt: skip
    return out.getvalue()


def requests_last_hour(org: Organization) -> int:
    since = timezone.now() - timedelta(hours=1)
    found = UsageRollup.objects.filter(
        organization_id=org.id, hour__gte=since.replace(minute=0, second=0, microsecond=0)
    ).aggregate(n=Sum("requests"))["n"]
    return int(found or 0)


# --- Catalog ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogEntry:
    model: Model
    endpoint_id: str | None
    endpoint_name: str | None
    input_price: Decimal | None  # per million tokens, what this organization pays
    output_price: Decimal | None
    # per million prompt tokens the prefix cache served; None: billed as input tokens
    cached_input_price: Decimal | None = None
    # per million tokens of batch lines (the Batch API); None: the online price
    batch_input_price: Decimal | None = None
    batch_output_price: Decimal | None = None


def model_catalog(org: Organization, *, at: datetime | None = None) -> list[CatalogEntry]:
    """Public models (and the organization's own), with its prices per million tokens now."""
    at = at or timezone.now()
    models = list(
        Model.objects.filter(Q(organization__isnull=True) | Q(organization=org)).order_by(
            "kind", "name"
        )
    )
    book = PriceBook.load(org.id, model_names=[m.name for m in models])
    public = {
        e.model_version.model_id: e
        for e in Endpoint.objects.filter(organization__isnull=True).select_related("model_version")
    }
    out = []
    for m in models:
        endpoint = public.get(m.id)
        prices = [book.effective(m.name, kind, at) for kind in (TokenKind.INPUT, TokenKind.OUTPUT)]
        cached = book.cached_input_price(m.name, at)
        batch = [
            _below(book.billed(m.name, kind, at)[1], online)
            for kind, online in zip(
                (TokenKind.BATCH_INPUT, TokenKind.BATCH_OUTPUT), prices, strict=True
            )
        ]
        out.append(
            CatalogEntry(
                model=m,
                endpoint_id=endpoint.id if endpoint else None,
                endpoint_name=endpoint.name if endpoint else None,
                input_price=prices[0].unit_price if prices[0] else None,
                output_price=prices[1].unit_price if prices[1] else None,
                cached_input_price=cached.unit_price if cached else None,
                batch_input_price=batch[0],
                batch_output_price=batch[1],
            )
        )
    return out


def _below(price: EffectivePrice | None, online: EffectivePrice | None) -> Decimal | None:
    """A batch price worth showing: one below the online price of the same unit."""
    if price is None or online is None or price.unit_price >= online.unit_price:
        return None
    return price.unit_price


# --- Endpoints ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointRow:
    endpoint: Endpoint
    live_workers: int

    @property
    def public(self) -> bool:
        return self.endpoint.organization_id is None


def endpoint_rows(org: Organization, *, kinds: tuple[str, ...] | None = None) -> list[EndpointRow]:
    """Endpoints the organization may call, with the live workers of each one's pool."""
    endpoints = list(endpoints_visible_to(org.id))
    if kinds is not None:
        endpoints = [e for e in endpoints if e.model_version.model.kind in kinds]
    pools = sorted({e.pool.name for e in endpoints})
    live = _live_workers(pools)
    return [EndpointRow(endpoint=e, live_workers=live.get(e.pool.name, 0)) for e in endpoints]


def _live_workers(pools: list[str]) -> dict[str, int]:
    if not pools:
        return {}
    now = timezone.now().timestamp()
    pipe = get_redis().pipeline(transaction=False)
    for pool in pools:
        # Members are scored by their last heartbeat (workers/heartbeat.py), as admission reads.
        pipe.zcount(pool_live_key(pool), now - HEARTBEAT_TTL_S, "+inf")
    try:
        counts = pipe.execute()
    except Exception:  # health is informative here: a Redis hiccup must not break the page
        return {}
    return {pool: int(n) for pool, n in zip(pools, counts, strict=True)}


def endpoint_visible_get(org: Organization, endpoint_id: str) -> Endpoint | None:
    return endpoints_visible_to(org.id).filter(id=endpoint_id).first()


def key_counts(org: Organization) -> dict[str, int]:
    return dict(
        ApiKey.objects.filter(organization=org, revoked_at__isnull=True)
        .values_list("project_id")
        .annotate(n=Count("id"))
        .values_list("project_id", "n")
    )


def servable_versions(org: Organization) -> list[tuple[str, str]]:
    """(id, label) of the ready model versions the organization may put on an endpoint."""
    rows = (
        ModelVersion.objects.filter(
            Q(model__organization__isnull=True) | Q(model__organization=org),
            status=ModelVersion.Status.READY,
        )
        .select_related("model")
        .order_by("model__name", "-version")
    )
    return [(v.id, f"{v.model.name} v{v.version} ({v.model.kind})") for v in rows]


# --- Batches -------------------------------------------------------------------------------

BATCHES_PER_PAGE = 20
BATCH_FILES_OFFERED = 100


@dataclass(frozen=True)
class BatchRow:
    """A batch as the Batches page shows it."""

    batch: Batch
    key_label: str  # the key it runs under: name and prefix ("" once the key is deleted)
    errors: list[BatchError]  # why validation failed (line numbers and messages)

    @property
    def total(self) -> int:
        return self.batch.request_total

    @property
    def done(self) -> int:
        return self.batch.request_completed + self.batch.request_failed

    @property
    def percent(self) -> int:
        return 100 * self.done // self.total if self.total else 0

    @property
    def active(self) -> bool:
        """A runner still has work for it: the page refreshes while one is shown."""
        return self.batch.status in batches.ACTIVE

    @property
    def cancellable(self) -> bool:
        return self.batch.status in (batches.Status.VALIDATING, batches.Status.IN_PROGRESS)

    @property
    def description(self) -> str:
        return (batches.user_metadata(self.batch) or {}).get("description", "")


def _key_labels(org: Organization, key_ids: set[str]) -> dict[str, str]:
    rows = ApiKey.objects.filter(organization=org, id__in=key_ids).values_list(
        "id", "name", "prefix"
    )
    return {key_id: f"{name} ({prefix}…)" for key_id, name, prefix in rows}


def batch_rows(org: Organization, page_number: str | int | None) -> tuple[list[BatchRow], Page]:
    """A page of the organization's batches, newest first (an unusable page number is the
    nearest page there is)."""
    listed = Batch.objects.filter(organization=org).order_by("-created_at", "-id")
    shown = Paginator(listed, BATCHES_PER_PAGE).get_page(page_number)
    found: list[Batch] = list(shown.object_list)
    labels = _key_labels(org, {b.api_key_id for b in found})
    rows = [BatchRow(b, labels.get(b.api_key_id, ""), batches.line_errors(b)) for b in found]
    return rows, shown


def batch_row(org: Organization, batch_id: str) -> BatchRow:
    """The organization's batch; NotFound for another's (or none)."""
    found = Batch.objects.filter(organization=org, id=batch_id).first()
    if found is None:
        raise NotFound(f"batch {batch_id!r} not found", param="batch_id")
    labels = _key_labels(org, {found.api_key_id})
    return BatchRow(found, labels.get(found.api_key_id, ""), batches.line_errors(found))


def batch_input_files(org: Organization) -> list[tuple[str, str]]:
    """(id, label) of the organization's newest files a batch may read (purpose `batch`)."""
    listed = files.list_files(org.id, purpose=files.PURPOSE_BATCH, limit=BATCH_FILES_OFFERED)
    return [
        (f.id, f"{f.filename} · {filesizeformat(f.bytes)} · {f.created_at:%Y-%m-%d %H:%M} UTC")
        for f in listed.files
    ]


def batch_keys(org: Organization, *, now: datetime | None = None) -> list[tuple[str, str]]:
    """(id, label) of the keys a batch may run under: the organization's usable keys with
    the `inference` scope (a batch's lines are requests of its key, and billed as such)."""
    now = now or timezone.now()
    usable = (
        ApiKey.objects.filter(organization=org, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .select_related("project")
        .order_by("-created_at")
    )
    choices = []
    for key in usable:
        if Scope.INFERENCE not in key.scopes:
            continue
        label = f"{key.name} ({key.prefix}…) · {key.project.name}"
        if key.expires_at is not None:
            label += f" · expires {key.expires_at:%Y-%m-%d %H:%M} UTC"
        choices.append((key.id, label))
    return choices
