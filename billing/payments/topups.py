"""Prepaid top-ups through Stripe: a Checkout payment started in the console, and the
credit granted once Stripe confirms a payment (a console top-up's or an auto-recharge's).

Exactly once: only a webhook handler (billing/payments/stripe_events.py) credits, never the
customer's return from Stripe. `topup_settle` re-reads the PaymentIntent from Stripe, locks
the top-up row, and grants the credit only to a top-up not yet paid, in the transaction
that marks it paid; `TopUp.credit` is one-to-one, so a second grant for one top-up cannot
be written at all. Two deliveries of one event are serialized by the StripeEvent row lock
(stripe_events.stripe_event_process); two events of one payment
(`checkout.session.completed`, `payment_intent.succeeded`) by the top-up's row lock.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import SYSTEM, Principal
from accounts.services import audit_record
from billing import checks, jobs
from billing.alerts.events import alert_emit
from billing.credits import credit_grant
from billing.models import (
    AlertEvent,
    AutoRecharge,
    CreditLedgerEntry,
    StripeCustomer,
    TopUp,
    TopUpReversal,
)
from billing.money import check_places, parse_decimal
from billing.payments.stripe_sync import stripe_customer_ensure, stripe_required
from billing.payments.stripe_types import (
    Charge,
    Dispute,
    PaymentIntent,
    StripeError,
    TopUpCharge,
    minor_unit_exponent,
    to_minor_units,
)
from core.errors import Conflict, InvalidInput

logger = logging.getLogger(__name__)

# How long a console top-up counts as waiting for payment: a Checkout session expires
# after 24 hours.
PENDING_WINDOW = timedelta(hours=24)
HISTORY_LIMIT = 50


# --- Reads ----------------------------------------------------------------------------------


def topups(org: Organization, *, limit: int = HISTORY_LIMIT) -> QuerySet[TopUp]:
    """The organization's top-ups, newest first."""
    return TopUp.objects.filter(organization=org).order_by("-created_at", "-id")[:limit]


def topup_bounds() -> tuple[Decimal, Decimal]:
    return Decimal(settings.MANTLE_TOPUP_MIN), Decimal(settings.MANTLE_TOPUP_MAX)


def topup_check_amount(value: Decimal | str, *, param: str = "amount") -> Decimal:
    """A top-up amount: a decimal with at most 2 places, within the configured bounds."""
    amount = check_places(parse_decimal(value, param=param), 2, param=param)
    low, high = topup_bounds()
    currency = settings.MANTLE_BILLING_CURRENCY
    if amount < low or amount > high:
        raise InvalidInput(f"{param} must be between {low} and {high} {currency}", param=param)
    return amount


# --- Console top-ups ----------------------------------------------------------------------


def topup_checkout_start(
    *,
    principal: Principal,
    org: Organization,
    amount: Decimal | str,
    success_url: str,
    cancel_url: str,
) -> tuple[TopUp, str]:
    """A pending top-up and the Stripe Checkout page (its URL) where it is paid.

    Nothing is credited here: the `checkout.session.completed` webhook does that. At most
    MANTLE_TOPUP_PENDING_MAX top-ups of an organization wait for payment at once (each is
    a Checkout session at Stripe). If Stripe refuses, the top-up is not kept.
    """
    value = topup_check_amount(amount)
    currency: str = settings.MANTLE_BILLING_CURRENCY
    backend = stripe_required()
    customer = stripe_customer_ensure(org=org)
    with transaction.atomic():
        # Counted and added under the organization's lock: racing clicks stay in budget.
        checks.lock_organization(org)
        waiting = TopUp.objects.filter(
            organization=org,
            source=TopUp.Source.CHECKOUT,
            status=TopUp.Status.PENDING,
            created_at__gte=timezone.now() - PENDING_WINDOW,
        ).count()
        limit: int = settings.MANTLE_TOPUP_PENDING_MAX
        if waiting >= limit:
            raise Conflict(
                f"{waiting} top-ups are already waiting for payment (at most {limit}): pay "
                "one of them, or wait until their Checkout pages expire (24 hours)",
                param="amount",
            )
        topup = TopUp.objects.create(
            organization=org,
            source=TopUp.Source.CHECKOUT,
            amount=value,
            currency=currency,
            created_by=principal.user,
        )
    charge = TopUpCharge(
        organization_id=org.id,
        topup_id=topup.id,
        customer_id=customer.stripe_customer_id,
        amount=to_minor_units(value, currency),
        currency=currency,
        description=f"Mantle prepaid credit for {org.name}",
    )
    try:
        session = backend.checkout_payment_session_create(
            charge, success_url=success_url, cancel_url=cancel_url
        )
    except StripeError:
        topup.delete()
        raise
    with transaction.atomic():
        topup.stripe_checkout_session_id = session.id
        topup.save(update_fields=["stripe_checkout_session_id"])
        audit_record(
            principal=principal,
            action="billing.topup_started",
            target=topup,
            organization=org,
            metadata={"amount": str(value), "currency": currency, "session": session.id},
        )
    logger.info("top-up %s of %s %s started for %s", topup.id, value, currency, org.id)
    return topup, session.url or ""


# --- What the webhooks do ------------------------------------------------------------------


def topup_settle(*, topup_id: str, payment_intent_id: str, event_id: str) -> bool:
    """Credits a top-up whose payment Stripe confirms; True if it was credited now.

    Idempotent: a top-up already paid is left alone. The intent is re-read from Stripe
    (an event's snapshot may be stale or out of order) and must have succeeded, name this
    top-up, and carry exactly its amount and currency.
    """
    intent = stripe_required().payment_intent_retrieve(payment_intent_id)
    with transaction.atomic():
        topup = (
            TopUp.objects.select_for_update()
            .select_related("organization")
            .filter(id=topup_id)
            .first()
        )
        if topup is None:
            logger.warning("payment %s names an unknown top-up %s", payment_intent_id, topup_id)
            return False
        if topup.status == TopUp.Status.PAID or intent.status != "succeeded":
            return False
        if not _matches(topup, intent):
            return False
        entry = credit_grant(
            principal=SYSTEM,
            org=topup.organization,
            kind=CreditLedgerEntry.Kind.PREPAID_PURCHASE,
            amount=topup.amount,
            currency=topup.currency,
            reason=f"{_label(topup)} paid through Stripe ({intent.id}, event {event_id})",
            reference=topup.id,
        )
        topup.status = TopUp.Status.PAID
        topup.paid_at = timezone.now()
        topup.credit = entry
        topup.stripe_payment_intent_id = intent.id
        # Shown as a link in the console: Stripe's https address, nothing else.
        receipt = intent.receipt_url or ""
        topup.receipt_url = receipt[:500] if receipt.startswith("https://") else ""
        topup.failure_code = ""
        topup.failure_message = ""
        topup.save()
    logger.info("top-up %s paid (%s): %s credited", topup.id, intent.id, topup.amount)
    return True


def topup_expire(*, topup_id: str, session_id: str) -> bool:
    """A console top-up whose Checkout session expired unpaid; True if it was pending."""
    return bool(
        TopUp.objects.filter(
            id=topup_id, stripe_checkout_session_id=session_id, status=TopUp.Status.PENDING
        ).update(status=TopUp.Status.EXPIRED)
    )


def topup_fail(
    *, topup_id: str, code: str, message: str, payment_intent_id: str | None = None
) -> bool:
    """A pending top-up whose payment failed (an auto-recharge declined, needing its
    holder, or without a saved method; a console top-up's delayed bank payment refused):
    recorded, and the failed-payment alert raised, once; True if it was pending.

    Never retried: an auto-recharge's next charge needs a new threshold crossing.
    """
    with transaction.atomic():
        topup = TopUp.objects.select_for_update().filter(id=topup_id).first()
        if topup is None or topup.status != TopUp.Status.PENDING:
            return False
        topup.status = TopUp.Status.FAILED
        topup.failure_code = code[:100]
        topup.failure_message = message[:500]
        if payment_intent_id and not topup.stripe_payment_intent_id:
            topup.stripe_payment_intent_id = payment_intent_id
        topup.save()
        alert_emit(
            org=topup.organization_id,
            kind=AlertEvent.Kind.PAYMENT_FAILED,
            dedupe_key=f"payment_failed:topup:{topup.id}",
            data={
                "stripe_invoice_id": None,
                "invoice_id": None,
                "number": None,
                "topup_id": topup.id,
                "stripe_payment_intent_id": topup.stripe_payment_intent_id,
                "total": str(topup.amount),
                "currency": topup.currency,
                "decline_code": topup.failure_code,
                "failed_at": timezone.now().isoformat(),
            },
        )
    logger.warning("top-up %s failed: %s (%s)", topup_id, code, message)
    return True


# --- Refunds and disputes: credit taken back, once per Stripe object ------------------------

# A dispute in these states leaves the money with the platform: nothing is taken back.
DISPUTE_KEPT = frozenset({"won", "warning_closed"})


def topup_of_charge(charge: Charge) -> TopUp | None:
    """The paid top-up a charge paid (by its PaymentIntent), if the charge is of that
    top-up's organization's Stripe customer; None (logged) for any other charge."""
    topup = (
        TopUp.objects.filter(stripe_payment_intent_id=charge.payment_intent_id).first()
        if charge.payment_intent_id
        else None
    )
    if topup is None:
        logger.info("Stripe charge %s is not of a top-up: ignored", charge.id)
        return None
    return topup_of_customer(topup.id, charge.customer_id)


def topup_refunds_record(*, topup_id: str, charge: Charge, event_id: str) -> int:
    """Takes back from the organization's credit each succeeded refund of the top-up's
    charge not taken back yet (one TopUpReversal per refund id); returns how many."""
    with transaction.atomic():
        topup = _locked_paid(topup_id)
        if topup is None or not _same_currency(topup, charge.currency, charge.id):
            return 0
        done = set(topup.reversals.values_list("stripe_object_id", flat=True))
        count = 0
        for refund in charge.refunds:
            if refund.status != "succeeded" or refund.id in done or refund.amount <= 0:
                continue
            _reverse(
                topup,
                kind=TopUpReversal.Kind.REFUND,
                object_id=refund.id,
                amount=-_major(refund.amount, topup.currency),
                reason=f"{_label(topup)} refunded in Stripe ({refund.id} of {charge.id}, "
                f"event {event_id})",
                metadata={"refund": refund.id, "charge": charge.id},
            )
            count += 1
        refunded = sum(
            (-r.amount for r in topup.reversals.filter(kind=TopUpReversal.Kind.REFUND)),
            Decimal(0),
        )
        if refunded != topup.refunded_amount:
            topup.refunded_amount = refunded
            topup.save(update_fields=["refunded_amount"])
    return count


def topup_dispute_record(*, topup_id: str, dispute: Dispute, event_id: str) -> bool:
    """A dispute of the top-up's charge: its amount taken back once when first seen
    undecided or lost (Stripe debits the platform's balance when the dispute opens), and
    given back once if the platform wins it; the failed-payment alert is raised once.
    Records the dispute's status on the top-up; True if credit moved now."""
    moved = False
    with transaction.atomic():
        topup = _locked_paid(topup_id)
        if topup is None or not _same_currency(topup, dispute.currency, dispute.id):
            return False
        done = set(topup.reversals.values_list("stripe_object_id", flat=True))
        amount = _major(dispute.amount, topup.currency)
        taken = dispute.id in done
        if not taken and dispute.status not in DISPUTE_KEPT and amount > 0:
            _reverse(
                topup,
                kind=TopUpReversal.Kind.DISPUTE,
                object_id=dispute.id,
                amount=-amount,
                reason=f"{_label(topup)} disputed by the cardholder ({dispute.id}, "
                f"{dispute.reason}, event {event_id})",
                metadata={"dispute": dispute.id, "reason": dispute.reason},
            )
            taken = moved = True
            _auto_recharge_stop(topup, dispute)
            alert_emit(
                org=topup.organization_id,
                kind=AlertEvent.Kind.PAYMENT_FAILED,
                dedupe_key=f"payment_failed:dispute:{dispute.id}",
                data={
                    "stripe_invoice_id": None,
                    "invoice_id": None,
                    "number": None,
                    "topup_id": topup.id,
                    "stripe_payment_intent_id": topup.stripe_payment_intent_id,
                    "stripe_dispute_id": dispute.id,
                    "total": str(amount),
                    "currency": topup.currency,
                    "decline_code": f"dispute_{dispute.reason}"[:100],
                    "failed_at": timezone.now().isoformat(),
                },
            )
        won_id = f"{dispute.id}:won"
        if taken and dispute.status == "won" and won_id not in done:
            taken_back = topup.reversals.get(stripe_object_id=dispute.id)
            _reverse(
                topup,
                kind=TopUpReversal.Kind.DISPUTE_WON,
                object_id=won_id,
                amount=-taken_back.amount,
                reason=f"{_label(topup)}'s dispute {dispute.id} won (event {event_id})",
                metadata={"dispute": dispute.id},
            )
            moved = True
        if topup.dispute_status != dispute.status[:32]:
            topup.dispute_status = dispute.status[:32]
            topup.save(update_fields=["dispute_status"])
    return moved


def _auto_recharge_stop(topup: TopUp, dispute: Dispute) -> None:
    """A cardholder disputing a top-up's charge is not charged again automatically: the
    organization's auto-recharge is turned off (audited); its members may turn it on again
    in the console, as when they first enabled it."""
    row = AutoRecharge.objects.select_for_update().filter(organization_id=topup.organization_id)
    stopped = row.filter(enabled=True).first()
    if stopped is None:
        return
    stopped.enabled = False
    stopped.save(update_fields=["enabled", "updated_at"])
    audit_record(
        principal=SYSTEM,
        action="billing.auto_recharge_set",
        target=stopped,
        organization=topup.organization,
        metadata={
            "enabled": False,
            "reason": f"charge of top-up {topup.id} disputed ({dispute.id})",
        },
    )


def _locked_paid(topup_id: str) -> TopUp | None:
    topup = (
        TopUp.objects.select_for_update(of=("self",))
        .select_related("organization", "credit")
        .filter(id=topup_id)
        .first()
    )
    if topup is None or topup.status != TopUp.Status.PAID or topup.credit is None:
        logger.warning("top-up %s is not paid: nothing to take back", topup_id)
        return None
    return topup


def _same_currency(topup: TopUp, currency: str, object_id: str) -> bool:
    if currency.lower() != topup.currency.lower():
        logger.error(
            "Stripe %s is in %s, top-up %s in %s", object_id, currency, topup.id, topup.currency
        )
        return False
    return True


def _major(minor: int, currency: str) -> Decimal:
    return Decimal(minor).scaleb(-minor_unit_exponent(currency))


def _reverse(
    topup: TopUp,
    *,
    kind: str,
    object_id: str,
    amount: Decimal,
    reason: str,
    metadata: dict[str, str],
) -> None:
    """One adjustment of the top-up's own grant (either sign), its TopUpReversal (unique
    per Stripe object) and an audit entry, in the caller's transaction. The grant's
    remainder may go below zero when its credit was already spent: a debt that lowers
    what the organization can spend (credits.credit_available)."""
    assert topup.credit is not None
    checks.lock_organization(topup.organization)
    entry = CreditLedgerEntry.objects.create(
        organization=topup.organization,
        kind=CreditLedgerEntry.Kind.ADJUSTMENT,
        amount=amount,
        currency=topup.currency,
        grant=topup.credit,
        reason=reason[:500],
        reference=topup.id,
    )
    TopUpReversal.objects.create(
        stripe_object_id=object_id, topup=topup, kind=kind, amount=amount, entry=entry
    )
    audit_record(
        principal=SYSTEM,
        action=f"billing.topup_{kind}",
        target=topup,
        organization=topup.organization,
        metadata={**metadata, "amount": str(amount), "currency": topup.currency},
    )
    jobs.queue_wallet_sync(topup.organization_id)
    logger.warning("top-up %s: %s %s (%s)", topup.id, kind, amount, object_id)


def topup_of_customer(topup_id: str, customer_id: str | None) -> TopUp | None:
    """The top-up a Stripe object's metadata names, if that object is of the top-up's own
    organization's Stripe customer (metadata is ours, but check the pair anyway)."""
    topup = TopUp.objects.filter(id=topup_id).first()
    if topup is None or customer_id is None:
        return None
    owner = StripeCustomer.objects.filter(organization_id=topup.organization_id).first()
    if owner is None or owner.stripe_customer_id != customer_id:
        logger.warning("top-up %s is not of Stripe customer %s", topup_id, customer_id)
        return None
    return topup


def topup_has_session(topup: TopUp, session_id: str) -> bool:
    """Whether the Checkout session is the top-up's. A console top-up that lost its
    session's id (the process stopped between Stripe's answer and the save) adopts the
    session that names it: the customer paid it, and the amount is checked at settling."""
    if topup.stripe_checkout_session_id is None and topup.source == TopUp.Source.CHECKOUT:
        TopUp.objects.filter(id=topup.id, stripe_checkout_session_id=None).update(
            stripe_checkout_session_id=session_id
        )
        topup.refresh_from_db(fields=["stripe_checkout_session_id"])
    return topup.stripe_checkout_session_id == session_id


def _matches(topup: TopUp, intent: PaymentIntent) -> bool:
    expected = to_minor_units(topup.amount, topup.currency)
    problems = []
    if intent.topup_id != topup.id:
        problems.append(f"it names top-up {intent.topup_id}")
    if intent.amount != expected or intent.currency != topup.currency.lower():
        problems.append(f"it is {intent.amount} {intent.currency}, not {expected}")
    if topup.stripe_payment_intent_id not in (None, intent.id):
        problems.append(f"the top-up was charged as {topup.stripe_payment_intent_id}")
    if problems:
        logger.error("payment %s not credited to %s: %s", intent.id, topup.id, "; ".join(problems))
        return False
    return True


def _label(topup: TopUp) -> str:
    return "auto-recharge" if topup.source == TopUp.Source.AUTO_RECHARGE else "top-up"
