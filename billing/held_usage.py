"""Held usage: what an invoice could not price, released at an operator's price or written off.

An invoice never fails for an unpriced model (billing/invoicing.py, `compute_invoice`): the
unpriced quantities are held as HeldUsage rows with the invoice that found them. Once that
invoice is issued, staff decide: `held_usage_release` prices the usage (it is billed once, as
a `released` line on the organization's next drafted invoice), `held_usage_write_off` drops
it. Both are audited with a reason; a row is decided once.
"""

from __future__ import annotations

from decimal import Decimal

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from billing import checks
from billing.models import HeldUsage, Invoice
from billing.pricing import check_unit_price
from core.errors import Conflict

Status = HeldUsage.Status


def held_usage_for(org: Organization) -> QuerySet[HeldUsage]:
    """The organization's held usage, newest usage month first (back office)."""
    return (
        HeldUsage.objects.filter(organization=org)
        .select_related("invoice", "billed_invoice")
        .order_by("-usage_month", "model_name", "token_kind", "id")
    )


def _locked_undecided(held: HeldUsage) -> HeldUsage:
    row = HeldUsage.objects.select_for_update().select_related("invoice").get(pk=held.pk)
    if row.status != Status.HELD:
        raise Conflict(
            f"this held usage is already {row.status}", param="status", code="invalid_state"
        )
    if row.invoice.status == Invoice.Status.DRAFT:
        # A draft's held rows are recomputed with its lines: decide once it is issued.
        raise Conflict(
            "the invoice holding this usage is still a draft: finalize it first",
            param="status",
            code="invalid_state",
        )
    return row


def held_usage_release(
    *, principal: Principal, held: HeldUsage, unit_price: Decimal | str, reason: str
) -> HeldUsage:
    """Prices held usage (per million units): billed on the next drafted invoice."""
    checks.check_staff(principal)
    reason = checks.check_reason(reason)
    price = check_unit_price(unit_price, param="unit_price")
    return _decide(principal, held, Status.RELEASED, reason, unit_price=price)


def held_usage_write_off(*, principal: Principal, held: HeldUsage, reason: str) -> HeldUsage:
    """Drops held usage: it is never billed."""
    checks.check_staff(principal)
    return _decide(principal, held, Status.WRITTEN_OFF, checks.check_reason(reason))


def _decide(
    principal: Principal,
    held: HeldUsage,
    status: str,
    reason: str,
    *,
    unit_price: Decimal | None = None,
) -> HeldUsage:
    """Decides an undecided row once, under the organization's lock, audited (the
    principal and the reason already checked)."""
    with transaction.atomic():
        checks.lock_organization(held.organization)
        row = _locked_undecided(held)
        row.status = status
        row.reason = reason
        row.resolved_by = principal.user
        row.resolved_at = timezone.now()
        fields = ["status", "reason", "resolved_by", "resolved_at"]
        metadata: dict[str, object] = {
            "held_usage": row.pk,
            "model_name": row.model_name,
            "token_kind": row.token_kind,
            "quantity": row.quantity,
        }
        if unit_price is not None:
            row.unit_price = unit_price
            fields.append("unit_price")
            metadata["unit_price"] = str(unit_price)
        row.save(update_fields=fields)
        audit_record(
            principal=principal,
            action=f"billing.held_usage_{status}",
            target=row.invoice,
            organization=row.organization,
            metadata={**metadata, "reason": reason},
        )
    return row
