"""Provisioned throughput: commitments sold, changed and ended, what the gateway is told,
and their unit-hours on invoices (docs/provisioned.md).

An operator sells an organization `units` of one of its endpoints (its own or a public one)
from a whole UTC hour on, at a price per unit-hour, with what happens past the units
(`spill` to pay-as-you-go or `refuse` with a 429). Rows are never edited: a change ends the
current row at an hour and starts a new one there; an end sets `ends_at`. The gateway reads
the commitments in effect from Redis (`provisioned_sync`, on every change and every minute),
so a commitment takes effect without a database read on the request path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from billing import checks
from billing.models import ProvisionedCommitment
from billing.money import check_places, parse_decimal
from billing.periods import hour_start, is_whole_hour
from catalog.models import Endpoint
from core.errors import Conflict, InvalidInput, NotFound
from core.redis import get_redis

logger = logging.getLogger(__name__)

MAX_UNITS = 10_000
Overflow = ProvisionedCommitment.Overflow


# --- What the gateway reads ------------------------------------------------------------------


def endpoint_key(endpoint_id: str) -> str:
    """organization id -> `<units>:<overflow>:<starts epoch>:<ends epoch or 0>`."""
    return f"mantle:provisioned:{endpoint_id}"


def pool_key(pool: str) -> str:
    """`<endpoint id>:<organization id>` -> the commitment (as in `endpoint_key`): the units
    it reserves on the pool while in effect, which other requests must leave free."""
    return f"mantle:provisioned-pool:{pool}"


def inflight_key(endpoint_id: str, organization_id: str) -> str:
    """The organization's provisioned requests in flight on the endpoint, scored by deadline."""
    return f"mantle:provisioned-inflight:{endpoint_id}:{organization_id}"


INDEX_KEY = "mantle:provisioned-index"
"""The endpoint and pool keys the last sync wrote: the next one deletes those it no longer
writes."""


@dataclass(frozen=True)
class Entitlement:
    """A commitment as the gateway sees it."""

    units: int
    overflow: str
    starts_at: float
    ends_at: float  # 0: open-ended

    def active(self, now: float) -> bool:
        return self.starts_at <= now and (not self.ends_at or now < self.ends_at)

    def encode(self) -> str:
        return f"{self.units}:{self.overflow}:{self.starts_at:.0f}:{self.ends_at:.0f}"

    @classmethod
    def decode(cls, raw: str | bytes) -> Entitlement | None:
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            units, overflow, starts, ends = text.split(":")
            return cls(int(units), overflow, float(starts), float(ends))
        except ValueError:
            return None


def _live(now: datetime) -> list[ProvisionedCommitment]:
    """Commitments in effect now or starting within the hour (written ahead, so that one
    starting on the hour takes effect on time between syncs)."""
    return list(
        ProvisionedCommitment.objects.filter(starts_at__lt=now + timedelta(hours=1))
        .filter(Q(ends_at__isnull=True) | Q(ends_at__gt=now))
        .select_related("endpoint__pool")
        .order_by("starts_at", "id")
    )


def provisioned_sync(*, now: datetime | None = None) -> int:
    """Writes every commitment in effect (or starting within the hour) to Redis for the
    gateway and removes the rest; returns how many. On every change (after commit) and
    every minute (beat), so ends and starts take effect within a minute even with no change
    (the gateway also checks each entitlement's times itself)."""
    now = now or timezone.now()
    by_endpoint: dict[str, dict[str, str]] = {}
    by_pool: dict[str, dict[str, str]] = {}
    rows = _live(now)
    for row in rows:
        entitlement = Entitlement(
            units=row.units,
            overflow=row.overflow,
            starts_at=row.starts_at.timestamp(),
            ends_at=row.ends_at.timestamp() if row.ends_at else 0.0,
        )
        # One row per (organization, endpoint) at a time: the later start wins the hour
        # a change takes effect in (the earlier row ends then).
        by_endpoint.setdefault(row.endpoint_id, {})[row.organization_id] = entitlement.encode()
        on_pool = by_pool.setdefault(row.endpoint.pool.name, {})
        on_pool[f"{row.endpoint_id}:{row.organization_id}"] = entitlement.encode()
    client = get_redis()
    written = {endpoint_key(e) for e in by_endpoint} | {pool_key(p) for p in by_pool}
    stale = {k.decode() if isinstance(k, bytes) else k for k in client.smembers(INDEX_KEY)}
    pipe = client.pipeline(transaction=True)
    for key in stale - written:
        pipe.delete(key)
    for endpoint_id, entries in by_endpoint.items():
        pipe.delete(endpoint_key(endpoint_id))
        pipe.hset(endpoint_key(endpoint_id), mapping=dict(entries.items()))
    for pool_name, entries in by_pool.items():
        pipe.delete(pool_key(pool_name))
        pipe.hset(pool_key(pool_name), mapping=dict(entries.items()))
    pipe.delete(INDEX_KEY)
    if written:
        pipe.sadd(INDEX_KEY, *sorted(written))
    pipe.execute()
    return len(rows)


def _sync_after_commit() -> None:
    def run() -> None:
        try:
            provisioned_sync()
        except Exception:  # the minute's beat task writes it again
            logger.exception("provisioned sync failed")

    transaction.on_commit(run)


# --- Operator actions -----------------------------------------------------------------------


def _check_start(at: datetime, *, param: str) -> datetime:
    checks.check_aware(at, param=param)
    if not is_whole_hour(at):
        raise InvalidInput(f"{param} must be a whole UTC hour (hh:00:00)", param=param)
    if at < hour_start(timezone.now()):
        raise InvalidInput(
            f"{param} must not be in the past: hours billed stay billed", param=param
        )
    return at


def _check_units(units: int) -> int:
    if not isinstance(units, int) or isinstance(units, bool) or not 1 <= units <= MAX_UNITS:
        raise InvalidInput(f"units must be a whole number from 1 to {MAX_UNITS}", param="units")
    return units


def _check_overflow(overflow: str) -> str:
    if overflow not in Overflow.values:
        raise InvalidInput(f"overflow must be one of {sorted(Overflow.values)}", param="overflow")
    return overflow


def _check_price(value: Decimal | str) -> Decimal:
    price = check_places(parse_decimal(value, param="unit_hour_price"), 9, param="unit_hour_price")
    if price < 0 or price > Decimal(1_000_000):
        raise InvalidInput("unit_hour_price must be from 0 to 1000000", param="unit_hour_price")
    return price


def unit_tokens_per_minute(model_name: str) -> int:
    """The guaranteed tokens per minute of one unit of `model_name`, as measured for its
    pool (MANTLE_PROVISIONED_UNIT_TPM, from bench/provisioned.py), else the default."""
    table: dict[str, int] = settings.MANTLE_PROVISIONED_UNIT_TPM
    return int(table.get(model_name, table.get("*", 0)))


def _overlapping(org: Organization, endpoint: Endpoint, start: datetime) -> bool:
    return (
        ProvisionedCommitment.objects.filter(organization=org, endpoint=endpoint)
        .filter(Q(ends_at__isnull=True) | Q(ends_at__gt=start))
        .exists()
    )


def commitment_create(
    *,
    principal: Principal,
    org: Organization,
    endpoint_id: str,
    units: int,
    unit_hour_price: Decimal | str,
    starts_at: datetime,
    reason: str,
    overflow: str = Overflow.SPILL,
    ends_at: datetime | None = None,
    tokens_per_minute_per_unit: int | None = None,
) -> ProvisionedCommitment:
    """Sells `units` of an endpoint the organization may call, from a whole hour on (not in
    the past), until `ends_at` (a whole hour) or open-ended. One commitment per organization
    and endpoint at a time: a change is `commitment_change`."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    units = _check_units(units)
    overflow = _check_overflow(overflow)
    price = _check_price(unit_hour_price)
    _check_start(starts_at, param="starts_at")
    if ends_at is not None:
        _check_start(ends_at, param="ends_at")
        if ends_at <= starts_at:
            raise InvalidInput("ends_at must be after starts_at", param="ends_at")
    endpoint = (
        Endpoint.objects.select_related("model_version__model", "pool")
        .filter(Q(organization=org) | Q(organization__isnull=True), pk=endpoint_id)
        .first()
    )
    if endpoint is None:
        raise NotFound(f"endpoint {endpoint_id!r} is not one this organization can call")
    model_name = endpoint.model_version.model.name
    tpm = tokens_per_minute_per_unit or unit_tokens_per_minute(model_name)
    if tpm < 1:
        raise InvalidInput(
            f"no measured tokens per minute for a unit of {model_name}: give "
            "tokens_per_minute_per_unit (bench/provisioned.py measures it)",
            param="tokens_per_minute_per_unit",
        )
    with transaction.atomic():
        checks.lock_organization(org)
        if _overlapping(org, endpoint, starts_at):
            raise Conflict(
                f"{org.id} already has a commitment on {endpoint.id} then: change or end it",
                param="endpoint_id",
            )
        row = ProvisionedCommitment.objects.create(
            organization=org,
            endpoint=endpoint,
            model_name=model_name,
            units=units,
            tokens_per_minute_per_unit=tpm,
            unit_hour_price=price,
            currency=settings.MANTLE_BILLING_CURRENCY,
            overflow=overflow,
            starts_at=starts_at,
            ends_at=ends_at,
            reason=reason,
            created_by=principal.user,
        )
        _audit(principal, "billing.provisioned_create", row)
        _sync_after_commit()
    return row


def commitment_change(
    *,
    principal: Principal,
    commitment: ProvisionedCommitment,
    at: datetime,
    reason: str,
    units: int | None = None,
    unit_hour_price: Decimal | str | None = None,
    overflow: str | None = None,
) -> ProvisionedCommitment:
    """Ends `commitment` at the whole hour `at` and starts its successor there with what
    changed (units, price, overflow); the successor keeps the end date."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    _check_start(at, param="at")
    with transaction.atomic():
        checks.lock_organization(commitment.organization)
        current = ProvisionedCommitment.objects.select_for_update().get(pk=commitment.pk)
        if current.ends_at is not None and current.ends_at <= at:
            raise Conflict(f"the commitment ends at {current.ends_at.isoformat()}", param="at")
        if at <= current.starts_at:
            raise Conflict("a change takes effect after the commitment starts", param="at")
        successor = ProvisionedCommitment.objects.create(
            organization=current.organization,
            endpoint=current.endpoint,
            model_name=current.model_name,
            units=_check_units(units) if units is not None else current.units,
            tokens_per_minute_per_unit=current.tokens_per_minute_per_unit,
            unit_hour_price=(
                _check_price(unit_hour_price)
                if unit_hour_price is not None
                else current.unit_hour_price
            ),
            currency=current.currency,
            overflow=_check_overflow(overflow) if overflow is not None else current.overflow,
            starts_at=at,
            ends_at=current.ends_at,
            reason=reason,
            created_by=principal.user,
        )
        current.ends_at = at
        current.save(update_fields=["ends_at"])
        _audit(principal, "billing.provisioned_change", successor, ended=current.pk)
        _sync_after_commit()
    return successor


def commitment_end(
    *, principal: Principal, commitment: ProvisionedCommitment, at: datetime, reason: str
) -> ProvisionedCommitment:
    """Ends the commitment at the whole hour `at` (not in the past): hours until then are
    billed, none after."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    _check_start(at, param="at")
    with transaction.atomic():
        checks.lock_organization(commitment.organization)
        current = ProvisionedCommitment.objects.select_for_update().get(pk=commitment.pk)
        if current.ends_at is not None and current.ends_at <= at:
            raise Conflict(f"the commitment ends at {current.ends_at.isoformat()}", param="at")
        current.ends_at = max(at, current.starts_at + timedelta(hours=1))
        current.save(update_fields=["ends_at"])
        _audit(principal, "billing.provisioned_end", current, reason_given=reason)
        _sync_after_commit()
    return current


def _audit(principal: Principal, action: str, row: ProvisionedCommitment, **extra: object) -> None:
    audit_record(
        principal=principal,
        action=action,
        target=row,
        organization=row.organization,
        metadata={
            "endpoint_id": row.endpoint_id,
            "units": row.units,
            "unit_hour_price": str(row.unit_hour_price),
            "overflow": row.overflow,
            "starts_at": row.starts_at.isoformat(),
            "ends_at": row.ends_at.isoformat() if row.ends_at else None,
            "reason": row.reason,
            **{k: v for k, v in extra.items()},
        },
    )


# --- Invoices and the console ---------------------------------------------------------------


@dataclass(frozen=True)
class UnitHours:
    commitment: ProvisionedCommitment
    hours: int  # whole hours billed in the period

    @property
    def quantity(self) -> int:
        return self.commitment.units * self.hours


def unit_hours(org_id: str, start: datetime, end: datetime, *, now: datetime) -> list[UnitHours]:
    """Each commitment's billed hours in [start, end): its hours in the period that have
    begun by `now` (a draft bills the hours so far, the finalized month all of them),
    whether used or not."""
    found = []
    rows = (
        ProvisionedCommitment.objects.filter(organization_id=org_id, starts_at__lt=end)
        .filter(Q(ends_at__isnull=True) | Q(ends_at__gt=start))
        .select_related("endpoint")
        .order_by("starts_at", "id")
    )
    for row in rows:
        first = max(row.starts_at, start)
        last = min(row.ends_at or end, end, now)
        if last <= first:
            continue
        hours = math.ceil((last - first).total_seconds() / 3600)
        found.append(UnitHours(row, hours))
    return found


def organizations_with_commitments(start: datetime, end: datetime) -> list[str]:
    """Organizations with a commitment overlapping [start, end) (their drafts are made
    even without usage)."""
    return list(
        ProvisionedCommitment.objects.filter(starts_at__lt=end)
        .filter(Q(ends_at__isnull=True) | Q(ends_at__gt=start))
        .values_list("organization_id", flat=True)
        .distinct()
        .order_by()
    )


@dataclass(frozen=True)
class Utilization:
    """A commitment's use, for the console: requests in flight now against its units, and
    tokens served within the units since the start of the previous hour (`minutes` of
    it, the commitment's own start at the earliest) against what the units guarantee."""

    commitment: ProvisionedCommitment
    in_flight: int
    tokens: int
    minutes: float

    @property
    def guaranteed(self) -> int:
        per_minute = self.commitment.units * self.commitment.tokens_per_minute_per_unit
        return int(per_minute * self.minutes)

    @property
    def share(self) -> float:
        return self.tokens / self.guaranteed if self.guaranteed else 0.0


def utilization(org: Organization, *, now: datetime | None = None) -> list[Utilization]:
    """The organization's commitments in effect now, with their use."""
    from django.db.models import Sum

    from billing.models import UsageRollup

    now = now or timezone.now()
    client = get_redis()
    found = []
    for row in ProvisionedCommitment.objects.filter(organization=org, starts_at__lte=now).filter(
        Q(ends_at__isnull=True) | Q(ends_at__gt=now)
    ):
        key = inflight_key(row.endpoint_id, org.id)
        client.zremrangebyscore(key, "-inf", now.timestamp())
        since = max(hour_start(now) - timedelta(hours=1), row.starts_at)
        tokens = UsageRollup.objects.filter(
            organization_id=org.id, endpoint_id=row.endpoint_id, hour__gte=since
        ).aggregate(i=Sum("provisioned_input_tokens"), o=Sum("provisioned_output_tokens"))
        found.append(
            Utilization(
                commitment=row,
                in_flight=int(client.zcard(key)),
                tokens=int(tokens["i"] or 0) + int(tokens["o"] or 0),
                minutes=max(1.0, (now - since).total_seconds() / 60),
            )
        )
    return found
