"""Rating hourly usage into invoice lines, and monthly invoices: draft, finalize, pay, void."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q, Sum
from django.db.models.functions import TruncMonth
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import SYSTEM, Principal
from accounts.services import audit_record
from billing import checks, jobs, provisioned, tax
from billing.alerts.events import alert_emit
from billing.credits import credits_apply_to_invoice, credits_return_for_invoice
from billing.models import (
    AlertEvent,
    HeldUsage,
    Invoice,
    InvoiceLine,
    InvoiceNumberSequence,
    InvoiceTaxLine,
    TokenKind,
    UsageRollup,
)
from billing.money import CENT, exact_amount, line_amount, round_cents
from billing.periods import month_bounds, month_label, month_start
from billing.pricing import (
    ROLLUP_SUMS,
    PriceBook,
    Unpriced,
    billed_quantities,
    commit_discount,
    counted_as,
    model_kinds,
)
from core.errors import Conflict, InvalidInput

logger = logging.getLogger(__name__)

Status = Invoice.Status
LineKind = InvoiceLine.Kind
# Invoices whose lines count as billed: voiding writes an invoice off, it does not
# put its usage back up for billing.
ISSUED = (Status.FINALIZED, Status.PAID, Status.VOID)
ZERO = Decimal(0)

# (usage month, model, unit, unit price per million): the grain of invoice lines.
LineKey = tuple[date, str, str, Decimal]
# (usage month, model, unit): the grain of held (unpriced) usage.
HeldKey = tuple[date, str, str]

# How a line names its unit: "input tokens", "requests", "compute milliseconds".
UNIT_LABELS = {
    TokenKind.INPUT.value: "input tokens",
    TokenKind.CACHED_INPUT.value: "cached input tokens",
    TokenKind.OUTPUT.value: "output tokens",
    TokenKind.REQUEST.value: "requests",
    TokenKind.COMPUTE_MS.value: "compute milliseconds",
    TokenKind.BATCH_INPUT.value: "batch input tokens",
    TokenKind.BATCH_CACHED_INPUT.value: "batch cached input tokens",
    TokenKind.BATCH_OUTPUT.value: "batch output tokens",
    TokenKind.BATCH_REQUEST.value: "batch requests",
    TokenKind.BATCH_COMPUTE_MS.value: "batch compute milliseconds",
    **{
        f"{tier}_{unit}": f"{tier} {label}"
        for tier in ("priority", "flex", "provisioned")
        for unit, label in (
            ("input", "input tokens"),
            ("cached_input", "cached input tokens"),
            ("output", "output tokens"),
            ("request", "requests"),
            ("compute_ms", "compute milliseconds"),
        )
    },
}


@dataclass
class Rated:
    quantity: int
    first_hour: datetime


@dataclass(frozen=True)
class LineDraft:
    kind: str
    label: str
    amount: Decimal
    usage_month: date | None = None
    model_name: str = ""
    token_kind: str = ""
    quantity: int = 0
    unit_price: Decimal | None = None


# --- Rating ---------------------------------------------------------------------------------


def rate_rollups(
    organization_id: str,
    start: datetime,
    end: datetime,
    *,
    book: PriceBook,
    project_id: str | None = None,
    strict: bool = True,
    unpriced: dict[HeldKey, int] | None = None,
    api_key_id: str | None = None,
) -> dict[LineKey, Rated]:
    """Billed quantities of [start, end) by line key, each hour at its own price.

    A price change inside the range (prices change on whole hours) splits a model's
    quantities into one key per unit price. `strict`: unpriced usage raises Unpriced;
    otherwise it is left out: summed into `unpriced` when given (the invoice holds it),
    else logged (the wallet and budgets must not stop).
    """
    rows = UsageRollup.objects.filter(
        organization_id=organization_id, hour__gte=start, hour__lt=end
    )
    if project_id is not None:
        rows = rows.filter(project_id=project_id)
    if api_key_id is not None:
        rows = rows.filter(api_key_id=api_key_id)
    grouped = (
        rows.values("model_name", "hour").annotate(**ROLLUP_SUMS).order_by("hour", "model_name")
    )
    rated: dict[LineKey, Rated] = {}
    for row, rating in book.rate_rollups(grouped):
        hour: datetime = row["hour"]
        for charge in rating.charges:
            kind, qty, price = charge.unit, charge.quantity, charge.price
            if price is None:
                message = f"no price for {row['model_name']} {kind} at {hour.isoformat()}"
                if strict:
                    raise Unpriced(message, param="model_name")
                if unpriced is None:
                    logger.error("unpriced usage of %s: %s", organization_id, message)
                else:
                    held_key = (month_start(hour).date(), row["model_name"], kind)
                    unpriced[held_key] = unpriced.get(held_key, 0) + qty
                continue
            key = (month_start(hour).date(), row["model_name"], str(kind), price.unit_price)
            if key in rated:
                rated[key].quantity += qty
            else:
                rated[key] = Rated(qty, hour)
    return rated


def issued_quantities(organization_id: str) -> dict[LineKey, int]:
    """Tokens already on issued invoices (own-month and adjustment lines), by line key."""
    rows = (
        InvoiceLine.objects.filter(
            invoice__organization_id=organization_id,
            invoice__status__in=ISSUED,
            kind__in=(LineKind.USAGE, LineKind.ADJUSTMENT),
        )
        .values("usage_month", "model_name", "token_kind", "unit_price")
        .annotate(q=Sum("quantity"))
    )
    result: dict[LineKey, int] = {}
    for r in rows:
        month, unit_price = r["usage_month"], r["unit_price"]
        # Usage and adjustment lines always have both.
        assert month is not None and unit_price is not None
        result[(month, r["model_name"], r["token_kind"], unit_price)] = r["q"]
    return result


def held_quantities(
    organization_id: str, *, exclude_invoice: str | None = None
) -> dict[HeldKey, int]:
    """Usage already held (in any state) by key; `exclude_invoice`: a draft being recomputed."""
    rows = HeldUsage.objects.filter(organization_id=organization_id)
    if exclude_invoice is not None:
        rows = rows.exclude(invoice_id=exclude_invoice)
    found = rows.values("usage_month", "model_name", "token_kind").annotate(q=Sum("quantity"))
    return {(r["usage_month"], r["model_name"], r["token_kind"]): int(r["q"]) for r in found}


def uninvoiced_quantities(
    organization_id: str,
    *,
    book: PriceBook,
    until: datetime,
    since: datetime | None = None,
    skip_months: Iterable[date] = (),
    strict: bool = True,
    unpriced: dict[HeldKey, int] | None = None,
    draft_id: str | None = None,
) -> dict[LineKey, Rated]:
    """Usage of [since, until) that no issued invoice carries yet, by line key.

    The issued lines are the snapshot of what was billed: what is left to bill is the
    rollups now minus the issued quantities, key by key. Unpriced usage is likewise the
    unpriced rollups minus what is already held (HeldUsage; the rows of `draft_id`, being
    recomputed, excepted), summed into `unpriced` when given. Months whose billed totals
    match what was issued and held are not rated again, so this stays cheap over a long
    history. The comparison counts cached input tokens with input tokens, and batch lines'
    usage with its online unit (`counted_as`): which line a quantity was billed on depends
    on the prices of its hours, not on the usage.
    """
    issued = issued_quantities(organization_id)
    held = held_quantities(organization_id, exclude_invoice=draft_id)
    accounted: dict[HeldKey, int] = defaultdict(int)
    for (month, model, kind, _), qty in issued.items():
        accounted[(month, model, counted_as(kind))] += qty
    for (month, model, kind), qty in held.items():
        accounted[(month, model, counted_as(kind))] += qty
    rollups = UsageRollup.objects.filter(organization_id=organization_id, hour__lt=until)
    if since is not None:
        rollups = rollups.filter(hour__gte=since)
    totals = list(
        rollups.annotate(month=TruncMonth("hour", tzinfo=UTC))
        .values("month", "model_name")
        .annotate(**ROLLUP_SUMS)
        .order_by("month", "model_name")
    )
    kinds = model_kinds(row["model_name"] for row in totals)
    skip = set(skip_months)
    months: set[date] = set()
    for row in totals:
        month = month_start(row["month"]).date()
        if month in skip or month in months:
            continue
        used: dict[str, int] = defaultdict(int)
        for unit, qty in billed_quantities(row, kinds[row["model_name"]]):
            used[counted_as(unit)] += qty
        if any(qty != accounted[(month, row["model_name"], unit)] for unit, qty in used.items()):
            months.add(month)
    left: dict[LineKey, Rated] = {}
    for month in sorted(months):
        start, end = month_bounds(month)
        start, end = max(start, since or start), min(end, until)
        found: dict[HeldKey, int] | None = None if unpriced is None else {}
        for key, rated in rate_rollups(
            organization_id, start, end, book=book, strict=strict, unpriced=found
        ).items():
            diff = rated.quantity - issued.get(key, 0)
            if diff > 0:
                left[key] = Rated(diff, rated.first_hour)
            elif diff < 0:
                logger.error("billed more than used for %s %s: %d", organization_id, key, diff)
        for held_key, qty in (found or {}).items():
            diff = qty - held.get(held_key, 0)
            if diff > 0 and unpriced is not None:
                unpriced[held_key] = unpriced.get(held_key, 0) + diff
            elif diff < 0:
                logger.error("held more than used for %s %s: %d", organization_id, held_key, diff)
    return left


@dataclass(frozen=True)
class InvoiceContent:
    """What an invoice carries: its lines, the unpriced usage it holds, and the ids of
    the released held usage that its `released` lines bill."""

    lines: list[LineDraft]
    held: dict[HeldKey, int]
    released: list[int]


def compute_invoice(
    org: Organization, start: datetime, end: datetime, *, draft_id: str | None = None
) -> InvoiceContent:
    """The invoice for [start, end): own usage, commit discount, late usage, released
    held usage; and the unpriced usage it holds instead of billing.

    Unpriced usage never stops an invoice: it is held for the operator (HeldUsage), and
    the priced lines are billed. `draft_id`: the draft being recomputed, whose held rows
    are replaced. Precondition: the organization is locked (checks.lock_organization),
    so no other invoice of it changes status while the issued quantities are read.
    """
    book = PriceBook.load(org.id)
    held: dict[HeldKey, int] = {}
    own = uninvoiced_quantities(
        org.id, book=book, since=start, until=end, strict=False, unpriced=held, draft_id=draft_id
    )
    lines = _usage_lines(own, LineKind.USAGE)
    usage_subtotal = sum((line.amount for line in lines), ZERO)
    # Provisioned throughput: each commitment's unit-hours of the period so far, used or
    # not (not usage: no committed-spend discount applies to them).
    lines.extend(_provisioned_lines(org, start, end))
    # The tiers in effect in the period's last hour apply to the whole month.
    tiers = book.commit_tiers(end - timedelta(hours=1))
    discount = round_cents(commit_discount(usage_subtotal, tiers))
    if discount > 0:
        bands = ", ".join(f"{t.percent}% above {t.threshold}" for t in tiers)
        lines.append(
            LineDraft(
                kind=LineKind.DISCOUNT,
                label=f"committed-spend discount ({bands})",
                amount=-discount,
            )
        )
    # Earlier months that still have a draft keep their usage on their own invoice.
    drafts = [
        month_start(d).date()
        for d in Invoice.objects.filter(
            organization=org, status=Status.DRAFT, period_start__lt=start
        ).values_list("period_start", flat=True)
    ]
    late = uninvoiced_quantities(
        org.id,
        book=book,
        until=start,
        skip_months=drafts,
        strict=False,
        unpriced=held,
        draft_id=draft_id,
    )
    lines.extend(_usage_lines(late, LineKind.ADJUSTMENT))
    # Held usage the operator priced since: billed once, on the first invoice drafted.
    released = list(
        HeldUsage.objects.filter(organization=org, status=HeldUsage.Status.RELEASED)
        .filter(Q(billed_invoice__isnull=True) | Q(billed_invoice_id=draft_id))
        .order_by("usage_month", "model_name", "token_kind", "id")
    )
    for row in released:
        assert row.unit_price is not None  # released rows always carry their price
        lines.append(
            LineDraft(
                kind=LineKind.RELEASED,
                label=f"held usage released for {month_label(row.usage_month)}: "
                f"{row.model_name} {UNIT_LABELS.get(row.token_kind, row.token_kind)}",
                amount=line_amount(row.quantity, row.unit_price),
                usage_month=row.usage_month,
                model_name=row.model_name,
                token_kind=row.token_kind,
                quantity=row.quantity,
                unit_price=row.unit_price,
            )
        )
    return InvoiceContent(lines=lines, held=held, released=[row.pk for row in released])


def _provisioned_lines(org: Organization, start: datetime, end: datetime) -> list[LineDraft]:
    lines = []
    for billed in provisioned.unit_hours(org.id, start, end, now=timezone.now()):
        c = billed.commitment
        plural = "s" if c.units != 1 else ""
        since = max(c.starts_at, start)
        lines.append(
            LineDraft(
                kind=LineKind.PROVISIONED,
                label=(
                    f"provisioned throughput: {c.model_name} ({c.endpoint.name}), {c.units} "
                    f"unit{plural} x {billed.hours} h from {since:%Y-%m-%d %H:%M} UTC"
                ),
                amount=round_cents(Decimal(billed.quantity) * c.unit_hour_price),
                usage_month=start.date(),
                model_name=c.model_name,
                quantity=billed.quantity,
                unit_price=c.unit_hour_price,
            )
        )
    return lines


def _usage_lines(rated: Mapping[LineKey, Rated], kind: str) -> list[LineDraft]:
    per_model_kind: dict[tuple[date, str, str], int] = defaultdict(int)
    for month, model, token_kind, _ in rated:
        per_model_kind[(month, model, token_kind)] += 1
    lines = []
    for key in sorted(rated, key=lambda k: (k[0], k[1], k[2], rated[k].first_hour)):
        month, model, token_kind, unit_price = key
        r = rated[key]
        label = f"{model} {UNIT_LABELS.get(token_kind, token_kind)}"
        if per_model_kind[(month, model, token_kind)] > 1:
            label += f" from {r.first_hour:%Y-%m-%d %H:%M} UTC"
        if kind == LineKind.ADJUSTMENT:
            label = f"adjustment: late usage for {month_label(month)}: {label}"
        lines.append(
            LineDraft(
                kind=kind,
                label=label,
                amount=line_amount(r.quantity, unit_price),
                usage_month=month,
                model_name=model,
                token_kind=token_kind,
                quantity=r.quantity,
                unit_price=unit_price,
            )
        )
    return lines


def unbilled_usage(org: Organization) -> Decimal:
    """Usage charges (exact, before rounding and commit discounts) on no issued invoice.

    Prepaid credit is consumed at finalization, so this is the usage that the ledger
    does not reflect yet: drafts, months without an invoice, and late usage. Read it
    BEFORE the ledger: a finalization committing in between is then counted twice
    (conservative), never missed.
    """
    book = PriceBook.load(org.id)
    far = timezone.now() + timedelta(days=400)
    left = uninvoiced_quantities(org.id, book=book, until=far, strict=False)
    usage = sum((exact_amount(r.quantity, key[3]) for key, r in left.items()), ZERO)
    # Held usage an operator released is owed too until an issued invoice bills it.
    released = HeldUsage.objects.filter(organization=org, status=HeldUsage.Status.RELEASED)
    # And provisioned throughput's unit-hours begun since the last issued invoice's period.
    issued_until = (
        Invoice.objects.filter(organization=org, status__in=ISSUED)
        .order_by("-period_end")
        .values_list("period_end", flat=True)
        .first()
    )
    units = sum(
        _unit_hours_amounts(org, issued_until or datetime.min.replace(tzinfo=UTC), far), ZERO
    )
    return (
        usage
        + units
        + sum(
            (exact_amount(h.quantity, h.unit_price) for h in released if h.unit_price is not None),
            ZERO,
        )
    )


def _unit_hours_amounts(org: Organization, start: datetime, end: datetime) -> list[Decimal]:
    """Each commitment's unit-hours begun in [start, end), in money (exact, unrounded)."""
    return [
        Decimal(b.quantity) * b.commitment.unit_hour_price
        for b in provisioned.unit_hours(org.id, start, end, now=timezone.now())
    ]


def month_spend(
    org: Organization,
    month: datetime | date,
    *,
    project_id: str | None = None,
    exact: bool = False,
    api_key_id: str | None = None,
) -> Decimal:
    """A month's usage charges (before discounts and credits), with the organization's
    provisioned throughput unit-hours begun in it (for the organization, not a project or
    an API key).

    As its invoice lines would round them, or `exact` (unrounded, for the wallet, which
    must never count less than was used).
    """
    start, end = month_bounds(month)
    book = PriceBook.load(org.id)
    rated = rate_rollups(
        org.id, start, end, book=book, project_id=project_id, strict=False, api_key_id=api_key_id
    )
    # The organization's provisioned throughput (not a project's): its unit-hours so far.
    whole = project_id is None and api_key_id is None
    units = _unit_hours_amounts(org, start, end) if whole else []
    if exact:
        return sum(units, ZERO) + sum(
            (exact_amount(r.quantity, key[3]) for key, r in rated.items()), ZERO
        )
    usage = sum((line_amount(r.quantity, key[3]) for key, r in rated.items()), ZERO)
    return (usage + sum((round_cents(u) for u in units), ZERO)).quantize(CENT)


# --- Invoices ---------------------------------------------------------------------------------


def invoice_refresh_draft(*, org: Organization, month: datetime | date) -> Invoice | None:
    """Recomputes the month's draft from the rollups; creates it when there is usage.

    Returns None when there is neither a draft nor anything to bill. A month whose
    invoice is already issued is refused: its late usage goes on the next draft.
    """
    start, end = month_bounds(month)
    with transaction.atomic():
        checks.lock_organization(org)
        invoice = (
            Invoice.objects.select_for_update().filter(organization=org, period_start=start).first()
        )
        if invoice is not None and invoice.status != Status.DRAFT:
            raise Conflict(
                f"the invoice for {month_label(start)} is {invoice.status}: it no longer "
                "changes (late usage goes on the next invoice)",
                param="month",
                code="invalid_state",
            )
        content = compute_invoice(org, start, end, draft_id=invoice.pk if invoice else None)
        if invoice is None:
            if not content.lines and not content.held:
                return None
            invoice = Invoice.objects.create(
                organization=org,
                period_start=start,
                period_end=end,
                currency=settings.MANTLE_BILLING_CURRENCY,
            )
        _write_lines(invoice, content.lines)
        _write_held(invoice, content)
        invoice.save(update_fields=["subtotal", "credits_applied", "total", "refreshed_at"])
    return invoice


def invoice_finalize(
    *,
    principal: Principal,
    invoice: Invoice,
    now: datetime | None = None,
    reason: str | None = None,
) -> Invoice:
    """Freezes the lines, applies credits, numbers the invoice. Draft only, period over.

    All in one transaction with the organization locked: the number is taken from the
    year's sequence row in the same transaction, so a failure leaves no gap. `reason`
    (the back office always gives one) goes into the audit entry.
    """
    checks.check_staff(principal)
    if reason is not None:
        reason = checks.check_reason(reason)
    now = now or timezone.now()
    with transaction.atomic():
        org = checks.lock_organization(invoice.organization)
        inv = _locked(invoice, "finalize", allowed=(Status.DRAFT,))
        if inv.period_end > now:
            raise Conflict(
                f"the period {month_label(inv.period_start)} has not ended yet",
                param="invoice_id",
            )
        content = compute_invoice(org, inv.period_start, inv.period_end, draft_id=inv.pk)
        _write_lines(inv, content.lines)
        _write_held(inv, content)
        # Its released held usage is billed now; its own held usage waits for the operator.
        HeldUsage.objects.filter(billed_invoice=inv, status=HeldUsage.Status.RELEASED).update(
            status=HeldUsage.Status.BILLED
        )
        inv.number = _next_number(now.year)
        # Who sells to whom, frozen now: the PDF of this invoice shows these forever.
        seller, buyer = tax.seller_now(), tax.buyer_of(org)
        inv.seller, inv.buyer = seller.as_json(), buyer.as_json()
        _write_tax_lines(
            inv, tax.tax_lines_for(taxable=inv.subtotal, seller=seller, buyer=buyer, at=now)
        )
        # Credits pay the invoice (tax included), like money received before: grants are
        # whole cents and so are the subtotal and the tax, so this is exact, not a rounding.
        gross = inv.subtotal + inv.tax
        inv.credits_applied = round_cents(
            credits_apply_to_invoice(org=org, invoice=inv, amount=gross, at=now)
        )
        inv.total = gross - inv.credits_applied
        inv.status = Status.FINALIZED
        inv.finalized_at = now
        if inv.total == 0:
            # Nothing to collect: settled at once, like Stripe's zero-amount invoices.
            inv.status = Status.PAID
            inv.paid_at = now
            inv.payment_reference = "nothing due"
        inv.save()
        audit_record(
            principal=principal,
            action="billing.invoice_finalized",
            target=inv,
            organization=org,
            metadata={
                "number": inv.number,
                "subtotal": str(inv.subtotal),
                "tax": str(inv.tax),
                "credits_applied": str(inv.credits_applied),
                "total": str(inv.total),
                **({"reason": reason} if reason is not None else {}),
            },
        )
        alert_emit(
            org=org,
            kind=AlertEvent.Kind.INVOICE_FINALIZED,
            dedupe_key=f"invoice_finalized:{inv.pk}",
            data={
                "invoice_id": inv.pk,
                "number": inv.number,
                "period": month_label(inv.period_start),
                "status": inv.status,
                "subtotal": str(inv.subtotal),
                "tax": str(inv.tax),
                "credits_applied": str(inv.credits_applied),
                "total": str(inv.total),
                "currency": inv.currency,
            },
            now=now,
        )
        jobs.queue_wallet_sync(org.id)
    logger.info("invoice %s finalized for %s: total %s", inv.number, org.id, inv.total)
    return inv


def invoice_mark_paid(
    *,
    principal: Principal,
    invoice: Invoice,
    payment_reference: str,
    reason: str,
    paid_at: datetime | None = None,
) -> Invoice:
    """Records the payment of a finalized invoice (a bank transfer, or Stripe's webhook)."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    reference = (payment_reference or "").strip()
    if not reference:
        raise InvalidInput("payment_reference must not be empty", param="payment_reference")
    if len(reference) > 200:
        raise InvalidInput(
            "payment_reference must be at most 200 characters", param="payment_reference"
        )
    paid_at = paid_at or timezone.now()
    checks.check_aware(paid_at, param="paid_at")
    if paid_at > timezone.now():
        raise InvalidInput("paid_at must not be in the future", param="paid_at")
    with transaction.atomic():
        checks.lock_organization(invoice.organization)
        inv = _locked(invoice, "mark paid", allowed=(Status.FINALIZED,))
        inv.status = Status.PAID
        inv.paid_at = paid_at
        inv.payment_reference = reference
        inv.save(update_fields=["status", "paid_at", "payment_reference"])
        audit_record(
            principal=principal,
            action="billing.invoice_paid",
            target=inv,
            organization=inv.organization,
            metadata={"number": inv.number, "payment_reference": reference, "reason": reason},
        )
        jobs.queue_wallet_sync(inv.organization_id)
    return inv


def invoice_void(*, principal: Principal, invoice: Invoice, reason: str) -> Invoice:
    """Writes a finalized (unpaid) invoice off; the credits it consumed are given back."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    with transaction.atomic():
        checks.lock_organization(invoice.organization)
        inv = _locked(invoice, "void", allowed=(Status.FINALIZED,))
        if inv.credit_notes.exists():
            # Writing off a bill that already gave money back would give it back twice.
            raise Conflict(
                "cannot void an invoice that has credit notes: credit the rest instead",
                param="status",
                code="invalid_state",
            )
        inv.status = Status.VOID
        inv.voided_at = timezone.now()
        inv.void_reason = reason
        inv.save(update_fields=["status", "voided_at", "void_reason"])
        returned = credits_return_for_invoice(principal=principal, invoice=inv, reason=reason)
        audit_record(
            principal=principal,
            action="billing.invoice_voided",
            target=inv,
            organization=inv.organization,
            metadata={
                "number": inv.number,
                "reason": reason,
                "credits_returned": str(sum((e.amount for e in returned), ZERO)),
            },
        )
        jobs.queue_wallet_sync(inv.organization_id)
    return inv


def invoices_refresh_open(*, now: datetime | None = None) -> int:
    """Refreshes the drafts of every organization with recent usage (hourly task)."""
    now = now or timezone.now()
    current = month_start(now)
    previous = month_start(current - timedelta(days=1))
    org_ids = _orgs_with_usage_since(previous)
    refreshed = 0
    for org in Organization.objects.filter(id__in=org_ids).order_by("id"):
        for month in (previous, current):
            issued = Invoice.objects.filter(
                organization=org, period_start=month, status__in=ISSUED
            ).exists()
            if issued:
                continue
            try:
                if invoice_refresh_draft(org=org, month=month) is not None:
                    refreshed += 1
            except Unpriced:
                logger.exception("cannot refresh the %s draft of %s", month_label(month), org.id)
    return refreshed


def invoices_finalize_due(*, now: datetime | None = None) -> list[Invoice]:
    """Finalizes the drafts whose period ended more than the grace delay ago (hourly task).

    The delay (MANTLE_INVOICE_FINALIZE_DELAY_HOURS) lets the drain catch up with the
    month's last events, so fewer of them become adjustments on the next invoice.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(hours=settings.MANTLE_INVOICE_FINALIZE_DELAY_HOURS)
    current = month_start(now)
    previous = month_start(current - timedelta(days=1))
    if current <= cutoff:
        # A month with usage may have no draft yet (nothing refreshed it): make one first.
        for org in Organization.objects.filter(id__in=_orgs_with_usage_since(previous)):
            if not Invoice.objects.filter(organization=org, period_start=previous).exists():
                try:
                    invoice_refresh_draft(org=org, month=previous)
                except Unpriced:
                    logger.exception("cannot draft %s for %s", month_label(previous), org.id)
    finalized = []
    for inv in Invoice.objects.filter(status=Status.DRAFT, period_end__lte=cutoff).order_by(
        "period_start", "id"
    ):
        try:
            finalized.append(invoice_finalize(principal=SYSTEM, invoice=inv, now=now))
        except (Unpriced, Conflict):
            logger.exception("cannot finalize invoice %s", inv.id)
    return finalized


def _orgs_with_usage_since(start: datetime) -> list[str]:
    """Organizations with usage since `start`, or a provisioned commitment then (billed
    whether used or not)."""
    used = set(
        UsageRollup.objects.filter(hour__gte=start)
        .values_list("organization_id", flat=True)
        .distinct()
        .order_by()
    )
    far = timezone.now() + timedelta(days=400)
    return sorted(used | set(provisioned.organizations_with_commitments(start, far)))


def _locked(invoice: Invoice, action: str, *, allowed: Iterable[str]) -> Invoice:
    inv = Invoice.objects.select_for_update().get(pk=invoice.pk)
    if inv.status not in allowed:
        raise Conflict(
            f"cannot {action} an invoice that is {inv.status}", param="status", code="invalid_state"
        )
    return inv


def _write_lines(invoice: Invoice, lines: Iterable[LineDraft]) -> None:
    """Replaces a draft's lines and totals (the caller saves the invoice)."""
    assert invoice.status == Status.DRAFT, "only a draft's lines change"
    invoice.lines.all().delete()
    rows = [
        InvoiceLine(
            invoice=invoice,
            position=i,
            kind=line.kind,
            usage_month=line.usage_month,
            model_name=line.model_name,
            token_kind=line.token_kind,
            quantity=line.quantity,
            unit_price=line.unit_price,
            amount=line.amount,
            label=line.label,
        )
        for i, line in enumerate(lines, start=1)
    ]
    InvoiceLine.objects.bulk_create(rows)
    invoice.subtotal = sum((row.amount for row in rows), ZERO)
    invoice.credits_applied = ZERO
    invoice.total = invoice.subtotal
    invoice.refreshed_at = timezone.now()


def _write_tax_lines(invoice: Invoice, lines: Iterable[tax.TaxLineDraft]) -> None:
    """Writes a finalizing invoice's tax lines and their sum (the caller saves it)."""
    assert invoice.status == Status.DRAFT, "tax lines are written once, at finalization"
    invoice.tax_lines.all().delete()
    rows = [
        InvoiceTaxLine(
            invoice=invoice,
            position=i,
            label=line.label,
            country=line.country,
            rate=line.rate,
            taxable_amount=line.taxable_amount,
            amount=line.amount,
            reverse_charge=line.reverse_charge,
            note=line.note,
        )
        for i, line in enumerate(lines, start=1)
    ]
    InvoiceTaxLine.objects.bulk_create(rows)
    invoice.tax = sum((row.amount for row in rows), ZERO)


def _write_held(invoice: Invoice, content: InvoiceContent) -> None:
    """Replaces a draft's held usage and claims the released usage its lines bill."""
    assert invoice.status == Status.DRAFT, "only a draft's held usage changes"
    HeldUsage.objects.filter(invoice=invoice, status=HeldUsage.Status.HELD).delete()
    HeldUsage.objects.bulk_create(
        HeldUsage(
            organization_id=invoice.organization_id,
            invoice=invoice,
            usage_month=month,
            model_name=model,
            token_kind=unit,
            quantity=qty,
        )
        for (month, model, unit), qty in sorted(content.held.items())
    )
    HeldUsage.objects.filter(billed_invoice=invoice, status=HeldUsage.Status.RELEASED).exclude(
        pk__in=content.released
    ).update(billed_invoice=None)
    HeldUsage.objects.filter(pk__in=content.released).update(billed_invoice=invoice)
    if content.held:
        logger.warning(
            "invoice %s of %s holds unpriced usage: %s",
            invoice.pk,
            invoice.organization_id,
            ", ".join(
                f"{m} {model} {unit}: {q}" for (m, model, unit), q in sorted(content.held.items())
            ),
        )


def _next_number(year: int) -> str:
    """The next number of the year's gap-free sequence, e.g. MAN-2026-000123."""
    InvoiceNumberSequence.objects.get_or_create(year=year)
    seq = InvoiceNumberSequence.objects.select_for_update().get(year=year)
    seq.last_number += 1
    seq.save(update_fields=["last_number"])
    return f"{settings.MANTLE_INVOICE_PREFIX}-{year}-{seq.last_number:06d}"
