"""Credit notes: money given back on an issued invoice, as credit for the next invoices."""

from __future__ import annotations

import logging
import re
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet, Sum
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from billing import checks, jobs
from billing.models import CreditLedgerEntry, CreditNote, CreditNoteNumberSequence, Invoice
from billing.money import MAX_AMOUNT, check_places, parse_decimal
from core.errors import Conflict, InvalidInput

logger = logging.getLogger(__name__)

ZERO = Decimal(0)
# Credit notes answer a bill that was issued; a draft is still changing, a void one is
# written off already.
CREDITABLE = (Invoice.Status.FINALIZED, Invoice.Status.PAID)
_KEY = re.compile(r"[A-Za-z0-9_\-]{8,64}")


def credit_notes(org: Organization) -> QuerySet[CreditNote]:
    return CreditNote.objects.filter(organization=org).order_by("-created_at", "-id")


def credited_amount(invoice: Invoice) -> Decimal:
    """What credit notes have given back on the invoice so far."""
    total = CreditNote.objects.filter(invoice=invoice).aggregate(s=Sum("amount"))["s"]
    return total if total is not None else ZERO


def creditable_amount(invoice: Invoice) -> Decimal:
    """The most a new credit note may give back: the billed subtotal less earlier notes.

    The subtotal, not the total: credits that paid part of the invoice were the
    customer's money too.
    """
    return invoice.subtotal - credited_amount(invoice)


def credit_note_issue(
    *,
    principal: Principal,
    invoice: Invoice,
    amount: Decimal | str,
    reason: str,
    idempotency_key: str,
    now: datetime | None = None,
) -> CreditNote:
    """Issues a numbered credit note on a finalized or paid invoice (staff, audited).

    The amount becomes a `credit_note` grant in the ledger (no expiry), which the next
    invoices consume like any credit. Idempotent on `idempotency_key`: the same key with
    the same invoice and amount returns the note already issued; with anything else it
    is refused.
    """
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    key = (idempotency_key or "").strip()
    if not _KEY.fullmatch(key):
        raise InvalidInput(
            "idempotency_key must be 8 to 64 letters, digits, '-' or '_'", param="idempotency_key"
        )
    value = check_places(parse_decimal(amount, param="amount"), 2, param="amount")
    if value <= 0:
        raise InvalidInput("amount must be positive", param="amount")
    if value > MAX_AMOUNT:
        raise InvalidInput(f"amount must be at most {MAX_AMOUNT}", param="amount")
    now = now or timezone.now()
    with transaction.atomic():
        org = checks.lock_organization(invoice.organization)
        existing = CreditNote.objects.filter(idempotency_key=key).first()
        if existing is not None:
            if existing.invoice_id != invoice.pk or existing.amount != value:
                raise Conflict(
                    f"idempotency_key was already used for credit note {existing.number}",
                    param="idempotency_key",
                )
            return existing
        inv = Invoice.objects.select_for_update().get(pk=invoice.pk)
        if inv.status not in CREDITABLE:
            raise Conflict(
                f"cannot issue a credit note on an invoice that is {inv.status}",
                param="status",
                code="invalid_state",
            )
        room = creditable_amount(inv)
        if value > room:
            raise InvalidInput(
                f"amount must be at most {room}: the invoice's subtotal {inv.subtotal} "
                f"less {inv.subtotal - room} already credited",
                param="amount",
            )
        number = _next_number(now.year)
        entry = CreditLedgerEntry.objects.create(
            organization=org,
            kind=CreditLedgerEntry.Kind.CREDIT_NOTE,
            amount=value,
            currency=inv.currency,
            reason=f"credit note {number} on invoice {inv.number}: {reason}",
            reference=inv.id,
            created_by=principal.user,
            created_at=now,
        )
        note = CreditNote.objects.create(
            organization=org,
            invoice=inv,
            number=number,
            amount=value,
            currency=inv.currency,
            reason=reason,
            ledger_entry=entry,
            idempotency_key=key,
            created_by=principal.user,
            created_at=now,
        )
        audit_record(
            principal=principal,
            action="billing.credit_note_issued",
            target=note,
            organization=org,
            metadata={
                "number": number,
                "invoice_id": inv.id,
                "invoice_number": inv.number,
                "amount": str(value),
                "currency": inv.currency,
                "reason": reason,
            },
        )
        jobs.queue_wallet_sync(org.id)
    logger.info("credit note %s on %s: %s %s", number, inv.id, value, inv.currency)
    return note


def _next_number(year: int) -> str:
    """The next number of the year's gap-free sequence, e.g. CN-2026-000007."""
    CreditNoteNumberSequence.objects.get_or_create(year=year)
    seq = CreditNoteNumberSequence.objects.select_for_update().get(year=year)
    seq.last_number += 1
    seq.save(update_fields=["last_number"])
    return f"{settings.MANTLE_CREDIT_NOTE_PREFIX}-{year}-{seq.last_number:06d}"
