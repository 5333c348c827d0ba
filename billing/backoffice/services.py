"""Invoice actions of the back office: idempotent wrappers around billing.invoicing."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from accounts.principal import Principal
from billing.invoicing import invoice_finalize, invoice_mark_paid, invoice_void
from billing.models import Invoice
from core.errors import Conflict

logger = logging.getLogger(__name__)

Status = Invoice.Status
# What invoice_finalize writes when it settles a zero total at once.
NOTHING_DUE = "nothing due"


@dataclass(frozen=True)
class Outcome:
    invoice: Invoice
    changed: bool  # False: the action had already been done; nothing was written
    message: str


def backoffice_invoice_finalize(*, principal: Principal, invoice: Invoice, reason: str) -> Outcome:
    """Finalizes a draft; a repeat on the invoice it finalized changes nothing."""

    def done(inv: Invoice) -> bool:
        return inv.status == Status.FINALIZED or (
            inv.status == Status.PAID and inv.payment_reference == NOTHING_DUE
        )

    return _idempotent(
        invoice,
        done=done,
        act=lambda: invoice_finalize(principal=principal, invoice=invoice, reason=reason),
        changed_message=lambda inv: f"invoice finalized as {inv.number}, total {inv.total}",
        done_message=lambda inv: f"invoice {inv.number} was already finalized",
    )


def backoffice_invoice_mark_paid(
    *, principal: Principal, invoice: Invoice, payment_reference: str, reason: str
) -> Outcome:
    """Records a bank transfer; a repeat with the same reference changes nothing.

    Paid with another reference is refused: that is a second payment, not a repeat.
    """
    reference = (payment_reference or "").strip()
    return _idempotent(
        invoice,
        done=lambda inv: inv.status == Status.PAID and inv.payment_reference == reference,
        act=lambda: invoice_mark_paid(
            principal=principal, invoice=invoice, payment_reference=reference, reason=reason
        ),
        changed_message=lambda inv: f"invoice {inv.number} marked paid ({reference})",
        done_message=lambda inv: f"invoice {inv.number} was already paid ({reference})",
    )


def backoffice_invoice_void(*, principal: Principal, invoice: Invoice, reason: str) -> Outcome:
    """Voids a finalized invoice; a repeat on a void invoice changes nothing."""
    return _idempotent(
        invoice,
        done=lambda inv: inv.status == Status.VOID,
        act=lambda: invoice_void(principal=principal, invoice=invoice, reason=reason),
        changed_message=lambda inv: f"invoice {inv.number} voided",
        done_message=lambda inv: f"invoice {inv.number} was already void",
    )


def _idempotent(
    invoice: Invoice,
    *,
    done: Callable[[Invoice], bool],
    act: Callable[[], Invoice],
    changed_message: Callable[[Invoice], str],
    done_message: Callable[[Invoice], str],
) -> Outcome:
    current = Invoice.objects.get(pk=invoice.pk)
    if done(current):
        return Outcome(current, False, done_message(current))
    try:
        result = act()
    except Conflict as exc:
        # Two submissions racing: the other one did it between our read and our lock.
        current = Invoice.objects.get(pk=invoice.pk)
        if exc.code == "invalid_state" and done(current):
            return Outcome(current, False, done_message(current))
        raise
    return Outcome(result, True, changed_message(result))
