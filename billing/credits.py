"""The credit ledger: grants, their application to invoices in a fixed priority, expiry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.db.models import Case, F, IntegerField, Q, QuerySet, Sum, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import SYSTEM, Principal
from accounts.services import audit_record
from billing import checks, jobs
from billing.models import CreditLedgerEntry, Invoice
from billing.money import MAX_AMOUNT, check_places, parse_decimal
from core.errors import InvalidInput

logger = logging.getLogger(__name__)

Kind = CreditLedgerEntry.Kind
ZERO = Decimal(0)


@dataclass(frozen=True)
class GrantRemainder:
    grant: CreditLedgerEntry
    remaining: Decimal


# --- Reads ---------------------------------------------------------------------------------


def credit_balance(org: Organization) -> Decimal:
    """The sum of the ledger: the only definition of the balance."""
    total = CreditLedgerEntry.objects.filter(organization=org).aggregate(s=Sum("amount"))["s"]
    return total if total is not None else ZERO


def credit_entries(org: Organization) -> QuerySet[CreditLedgerEntry]:
    return CreditLedgerEntry.objects.filter(organization=org).order_by("-created_at", "-id")


def grants_with_remainder(org: Organization) -> list[GrantRemainder]:
    """Every grant of the organization and what is left of it (amount + its movements)."""
    grants = (
        CreditLedgerEntry.objects.filter(organization=org, kind__in=CreditLedgerEntry.GRANT_KINDS)
        .annotate(moved=Coalesce(Sum("movements__amount"), Value(ZERO)))
        .order_by("created_at", "id")
    )
    return [GrantRemainder(g, g.amount + g.moved) for g in grants]


def credit_available(org: Organization, at: datetime | None = None) -> Decimal:
    """What can still be spent: remainders of grants not expired at `at`, less any grant's
    negative remainder (a debt: a top-up refunded or disputed after its credit was spent,
    billing/payments/topups.py).

    Equal to the balance except for grants past their expiry whose write-off (an expiry
    entry, hourly) has not been recorded yet: those are not spendable.
    """
    at = at or timezone.now()
    return sum(
        (
            r.remaining
            for r in grants_with_remainder(org)
            if r.remaining < 0
            or (r.remaining > 0 and (r.grant.expires_at is None or r.grant.expires_at > at))
        ),
        ZERO,
    )


def application_order(org: Organization, at: datetime) -> list[GrantRemainder]:
    """Grants that can pay an invoice at `at`, in the order they are drawn on.

    Promotional before prepaid (promotions are use-it-or-lose-it and were free; prepaid
    money was paid for and may be refunded), then the earliest expiry first (so as
    little as possible expires unused), grants without expiry last, then the oldest.
    """
    grants = (
        CreditLedgerEntry.objects.filter(organization=org, kind__in=CreditLedgerEntry.GRANT_KINDS)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=at))
        .annotate(
            moved=Coalesce(Sum("movements__amount"), Value(ZERO)),
            kind_rank=Case(
                When(kind=Kind.PROMOTIONAL, then=Value(0)),
                default=Value(1),
                output_field=IntegerField(),
            ),
        )
        .order_by("kind_rank", F("expires_at").asc(nulls_last=True), "created_at", "id")
    )
    result = []
    for g in grants:
        remaining = g.amount + g.moved
        if remaining > 0:
            result.append(GrantRemainder(g, remaining))
    return result


# --- Writes ----------------------------------------------------------------------------------


def credit_grant(
    *,
    principal: Principal,
    org: Organization,
    kind: str,
    amount: Decimal | str,
    reason: str,
    expires_at: datetime | None = None,
    reference: str = "",
    currency: str = "USD",
) -> CreditLedgerEntry:
    """Adds prepaid (bought) or promotional credit to an organization's ledger."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    currency = checks.check_currency(currency)
    if kind not in CreditLedgerEntry.STAFF_GRANT_KINDS:
        raise InvalidInput(
            f"kind must be one of {list(CreditLedgerEntry.STAFF_GRANT_KINDS)}", param="kind"
        )
    value = _check_amount(amount, param="amount")
    if value <= 0:
        raise InvalidInput("amount must be positive", param="amount")
    if expires_at is not None:
        checks.check_aware(expires_at, param="expires_at")
        if expires_at <= timezone.now():
            raise InvalidInput("expires_at must be in the future", param="expires_at")
    reference = _check_reference(reference)
    with transaction.atomic():
        checks.lock_organization(org)
        entry = CreditLedgerEntry.objects.create(
            organization=org,
            kind=kind,
            amount=value,
            currency=currency,
            expires_at=expires_at,
            reason=reason,
            reference=reference,
            created_by=principal.user,
        )
        audit_record(
            principal=principal,
            action="billing.credit_granted",
            target=entry,
            organization=org,
            metadata={
                "kind": kind,
                "amount": str(value),
                "currency": currency,
                "expires_at": expires_at.isoformat() if expires_at else None,
                "reference": reference,
                "reason": reason,
            },
        )
        jobs.queue_wallet_sync(org.id)
    logger.info("credit %s %s granted to %s", kind, value, org.id)
    return entry


def credit_adjust(
    *, principal: Principal, grant: CreditLedgerEntry, amount: Decimal | str, reason: str
) -> CreditLedgerEntry:
    """Corrects one grant by `amount` (either sign); a grant never goes below zero."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    value = _check_amount(amount, param="amount")
    if value == 0:
        raise InvalidInput("amount must not be zero", param="amount")
    if grant.kind not in CreditLedgerEntry.GRANT_KINDS:
        raise InvalidInput("only a grant can be adjusted", param="grant_id")
    org = grant.organization
    with transaction.atomic():
        checks.lock_organization(org)
        remaining = _remaining(grant)
        if remaining + value < 0:
            raise InvalidInput(
                f"amount would take the grant below zero (remaining {remaining})", param="amount"
            )
        entry = CreditLedgerEntry.objects.create(
            organization=org,
            kind=Kind.ADJUSTMENT,
            amount=value,
            currency=grant.currency,
            grant=grant,
            reason=reason,
            created_by=principal.user,
        )
        audit_record(
            principal=principal,
            action="billing.credit_adjusted",
            target=entry,
            organization=org,
            metadata={"grant_id": grant.id, "amount": str(value), "reason": reason},
        )
        jobs.queue_wallet_sync(org.id)
    return entry


def credits_expire(
    *, now: datetime | None = None, org: Organization | None = None
) -> list[CreditLedgerEntry]:
    """Writes off what is left of every grant past its expiry. Idempotent (hourly task)."""
    now = now or timezone.now()
    due = CreditLedgerEntry.objects.filter(
        kind__in=CreditLedgerEntry.GRANT_KINDS, expires_at__lte=now
    )
    if org is not None:
        due = due.filter(organization=org)
    org_ids = sorted(set(due.values_list("organization_id", flat=True)))
    written: list[CreditLedgerEntry] = []
    for org_id in org_ids:
        with transaction.atomic():
            locked = checks.lock_organization(Organization(pk=org_id))
            for r in grants_with_remainder(locked):
                g = r.grant
                if g.expires_at is None or g.expires_at > now or r.remaining <= 0:
                    continue
                entry = CreditLedgerEntry.objects.create(
                    organization=locked,
                    kind=Kind.EXPIRY,
                    amount=-r.remaining,
                    currency=g.currency,
                    grant=g,
                    reason=f"grant expired at {g.expires_at.isoformat()}",
                    created_at=now,
                )
                audit_record(
                    principal=SYSTEM,
                    action="billing.credit_expired",
                    target=entry,
                    organization=locked,
                    metadata={"grant_id": g.id, "amount": str(-r.remaining)},
                )
                written.append(entry)
            jobs.queue_wallet_sync(org_id)
    return written


def credits_apply_to_invoice(
    *, org: Organization, invoice: Invoice, amount: Decimal, at: datetime
) -> Decimal:
    """Draws up to `amount` from the grants, in application order; returns what was drawn.

    Precondition: inside the finalization's transaction, with the organization locked.
    """
    assert transaction.get_connection().in_atomic_block
    left = amount
    for r in application_order(org, at):
        if left <= 0:
            break
        take = min(left, r.remaining)
        CreditLedgerEntry.objects.create(
            organization=org,
            kind=Kind.CONSUMPTION,
            amount=-take,
            currency=r.grant.currency,
            grant=r.grant,
            reason=f"applied to invoice {invoice.number or invoice.id}",
            reference=invoice.id,
            created_at=at,
        )
        left -= take
    return amount - left


def credits_return_for_invoice(
    *, principal: Principal, invoice: Invoice, reason: str
) -> list[CreditLedgerEntry]:
    """Gives back what a voided invoice consumed, to the same grants (adjustment entries).

    A grant that has expired meanwhile gets it back too, and the next expiry run writes
    it off again: the ledger keeps the whole story.
    """
    assert transaction.get_connection().in_atomic_block
    consumed = CreditLedgerEntry.objects.filter(
        organization_id=invoice.organization_id, kind=Kind.CONSUMPTION, reference=invoice.id
    ).order_by("id")
    returned = []
    for entry in consumed:
        returned.append(
            CreditLedgerEntry.objects.create(
                organization_id=invoice.organization_id,
                kind=Kind.ADJUSTMENT,
                amount=-entry.amount,
                currency=entry.currency,
                grant_id=entry.grant_id,
                reason=f"invoice {invoice.number} voided: {reason}",
                reference=invoice.id,
                created_by=principal.user,
            )
        )
    return returned


def _remaining(grant: CreditLedgerEntry) -> Decimal:
    moved = grant.movements.aggregate(s=Sum("amount"))["s"]
    return grant.amount + (moved if moved is not None else ZERO)


def _check_amount(value: Decimal | str, *, param: str) -> Decimal:
    amount = check_places(parse_decimal(value, param=param), 2, param=param)
    if abs(amount) > MAX_AMOUNT:
        raise InvalidInput(f"{param} must be at most {MAX_AMOUNT}", param=param)
    return amount


def _check_reference(reference: str) -> str:
    cleaned = (reference or "").strip()
    if len(cleaned) > 100:
        raise InvalidInput("reference must be at most 100 characters", param="reference")
    return cleaned
