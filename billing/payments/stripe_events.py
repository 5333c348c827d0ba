"""Stripe webhook events: stored once, processed once by id, in any order; dunning."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import SYSTEM
from accounts.services import organization_set_status
from billing.alerts.events import alert_emit
from billing.invoicing import invoice_mark_paid
from billing.models import AlertEvent, Invoice, StripeCustomer, StripeEvent, StripePaymentFailure
from billing.payments import stripe_types, topups
from billing.payments.stripe_sync import stripe_required
from billing.payments.stripe_types import Event, event_from_payload

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 20  # of the retry task; Stripe's own redeliveries are not capped here


class Outcome(StrEnum):
    PROCESSED = "processed"
    IGNORED = "ignored"  # stored, but no handler for its type
    DUPLICATE = "duplicate"  # already processed: a replay or Stripe's redelivery
    FAILED = "failed"  # the handler raised; Stripe will redeliver, or a retry picks it up


def stripe_event_receive(event: Event) -> Outcome:
    """Stores a verified event (once) and processes it (once).

    Only call with an event whose signature was checked. The row is committed before
    processing, so a crash mid-handler leaves it stored and unprocessed for a retry.
    """
    row, created = StripeEvent.objects.get_or_create(
        id=event.id,
        defaults={
            "type": event.type,
            "created": event.created_at,
            "livemode": event.livemode,
            "payload": dict(event.payload),
        },
    )
    if not created and row.processed_at is not None:
        return Outcome.DUPLICATE
    return stripe_event_process(event.id)


def stripe_event_process(event_id: str) -> Outcome:
    """Runs the handler of a stored event, at most once (row lock + processed_at).

    The handler and the `processed_at` mark commit together: either both happen or,
    on an error, neither, and the error is recorded on the row.
    """
    try:
        with transaction.atomic():
            row = StripeEvent.objects.select_for_update().get(id=event_id)
            if row.processed_at is not None:
                return Outcome.DUPLICATE
            handler = HANDLERS.get(row.type)
            if handler is not None:
                handler(_event_of(row))
            row.processed_at = timezone.now()
            row.attempts += 1
            row.error = ""
            row.save(update_fields=["processed_at", "attempts", "error"])
    except Exception as exc:
        logger.exception("Stripe event %s failed", event_id)
        StripeEvent.objects.filter(id=event_id).update(
            attempts=F("attempts") + 1, error=f"{type(exc).__name__}: {exc}"[:2000]
        )
        return Outcome.FAILED
    return Outcome.PROCESSED if handler is not None else Outcome.IGNORED


def stripe_events_retry(*, older_than: timedelta = timedelta(minutes=5)) -> int:
    """Processes stored events still unprocessed (a failed handler, a crash); returns count.

    An event that failed MAX_ATTEMPTS times is left for a person (its `error` says why).
    """
    cutoff = timezone.now() - older_than
    ids = list(
        StripeEvent.objects.filter(
            processed_at__isnull=True, received_at__lt=cutoff, attempts__lt=MAX_ATTEMPTS
        )
        .order_by("created")
        .values_list("id", flat=True)[:500]
    )
    return sum(stripe_event_process(event_id) == Outcome.PROCESSED for event_id in ids)


# --- Handlers: each re-reads the object from Stripe, so the order of events never matters -


def _on_invoice(event: Event) -> None:
    """Any invoice event: act on the invoice's current state, not on the event's snapshot."""
    if not event.object_id:
        return
    current = stripe_required().invoice_retrieve(event.object_id)
    customer = (
        StripeCustomer.objects.select_related("organization")
        .filter(stripe_customer_id=current.customer_id)
        .first()
    )
    if customer is None:
        logger.warning("Stripe invoice %s belongs to no organization of ours", current.id)
        return
    if current.status == "paid":
        _record_invoice_paid(current, event)
        # When the payment happened, by Stripe's clock: whichever event brought the news.
        paid_at = _paid_at(current) or event.created_at
        if customer.last_paid_at is None or customer.last_paid_at < paid_at:
            customer.last_paid_at = paid_at
            customer.save(update_fields=["last_paid_at"])
    new_failure = False
    if event.type == "invoice.payment_failed" and current.status in ("open", "uncollectible"):
        # Still unpaid now, so the failure stands (a stale one, paid since, does not).
        _, new_failure = StripePaymentFailure.objects.get_or_create(
            event_id=event.id,
            defaults={
                "organization": customer.organization,
                "stripe_invoice_id": current.id,
                "failed_at": event.created_at,
            },
        )
    if new_failure:
        ours = Invoice.objects.filter(stripe_invoice_id=current.id).first()
        alert_emit(
            org=customer.organization,
            kind=AlertEvent.Kind.PAYMENT_FAILED,
            dedupe_key=f"payment_failed:{event.id}",
            data={
                "stripe_invoice_id": current.id,
                "invoice_id": ours.pk if ours else None,
                "number": ours.number if ours else None,
                "total": str(ours.total) if ours else None,
                "currency": ours.currency if ours else None,
                "failed_at": event.created_at.isoformat(),
            },
        )
    _dunning_evaluate(customer, event, new_failure=new_failure)


def _on_setup_intent_succeeded(event: Event) -> None:
    """A saved card becomes the one Stripe charges for invoices."""
    if not event.object_id:
        return
    backend = stripe_required()
    intent, payment_method_id = backend.setup_intent_retrieve(event.object_id)
    customer_id = (event.payload.get("data", {}).get("object") or {}).get("customer")
    if intent.status != "succeeded" or payment_method_id is None or not customer_id:
        return
    if not StripeCustomer.objects.filter(stripe_customer_id=customer_id).exists():
        return
    backend.customer_set_default_payment_method(
        customer_id=customer_id, payment_method_id=payment_method_id
    )


def _on_checkout_session(event: Event) -> None:
    """A top-up's Checkout session: credited once Stripe says it is complete and paid (a
    delayed method, a bank debit, completes unpaid and pays later:
    `async_payment_succeeded`, or fails: `async_payment_failed`); expired, it is closed.
    Setup-mode sessions (saving a card) carry no top-up and are left to setup_intent."""
    if not event.object_id:
        return
    session = stripe_required().checkout_session_retrieve(event.object_id)
    if session.topup_id is None:
        return
    topup = topups.topup_of_customer(session.topup_id, session.customer_id)
    if topup is None or not topups.topup_has_session(topup, session.id):
        return
    if session.status == "complete" and session.payment_status == "paid":
        if session.payment_intent_id is None:
            raise stripe_types.StripeInvalidRequest(
                f"checkout session {session.id} is paid but names no PaymentIntent"
            )
        topups.topup_settle(
            topup_id=topup.id, payment_intent_id=session.payment_intent_id, event_id=event.id
        )
    elif session.status == "expired":
        topups.topup_expire(topup_id=topup.id, session_id=session.id)
    elif event.type == "checkout.session.async_payment_failed" and session.payment_intent_id:
        intent = stripe_required().payment_intent_retrieve(session.payment_intent_id)
        if intent.status != "succeeded":
            topups.topup_fail(
                topup_id=topup.id,
                code=intent.failure_code or "async_payment_failed",
                message=intent.failure_message or "the delayed payment failed",
                payment_intent_id=intent.id,
            )


def _on_payment_intent(event: Event) -> None:
    """A top-up's payment: credited when it succeeded (an auto-recharge's charge, or a
    Checkout payment whose session event is late); a failure fails a pending
    auto-recharge (the charging task normally records it first)."""
    if not event.object_id:
        return
    intent = stripe_required().payment_intent_retrieve(event.object_id)
    if intent.topup_id is None:
        return
    topup = topups.topup_of_customer(intent.topup_id, intent.customer_id)
    if topup is None:
        return
    if intent.status == "succeeded":
        topups.topup_settle(topup_id=topup.id, payment_intent_id=intent.id, event_id=event.id)
    elif (
        event.type == "payment_intent.payment_failed" and topup.source == topup.Source.AUTO_RECHARGE
    ):
        topups.topup_fail(
            topup_id=topup.id,
            code=intent.failure_code or "payment_failed",
            message=intent.failure_message or "the payment failed",
            payment_intent_id=intent.id,
        )


def _on_charge_refunded(event: Event) -> None:
    """A top-up's charge refunded (in full or in part, in Stripe's dashboard): each
    refund taken back once. The charge is re-read, with its refunds."""
    if not event.object_id:
        return
    charge = stripe_required().charge_retrieve(event.object_id)
    topup = topups.topup_of_charge(charge)
    if topup is not None:
        topups.topup_refunds_record(topup_id=topup.id, charge=charge, event_id=event.id)


def _on_dispute(event: Event) -> None:
    """A top-up's charge disputed by the cardholder (taken back, alerted) or the dispute
    closed (won: given back). The dispute and its charge are re-read."""
    if not event.object_id:
        return
    backend = stripe_required()
    dispute = backend.dispute_retrieve(event.object_id)
    charge = backend.charge_retrieve(dispute.charge_id)
    topup = topups.topup_of_charge(charge)
    if topup is not None:
        topups.topup_dispute_record(topup_id=topup.id, dispute=dispute, event_id=event.id)


HANDLERS: Mapping[str, Callable[[Event], None]] = {
    "invoice.paid": _on_invoice,
    "invoice.payment_succeeded": _on_invoice,
    "invoice.payment_failed": _on_invoice,
    "invoice.finalized": _on_invoice,
    "invoice.voided": _on_invoice,
    "invoice.marked_uncollectible": _on_invoice,
    "setup_intent.succeeded": _on_setup_intent_succeeded,
    "checkout.session.completed": _on_checkout_session,
    "checkout.session.async_payment_succeeded": _on_checkout_session,
    "checkout.session.async_payment_failed": _on_checkout_session,
    "checkout.session.expired": _on_checkout_session,
    "payment_intent.succeeded": _on_payment_intent,
    "payment_intent.payment_failed": _on_payment_intent,
    "charge.refunded": _on_charge_refunded,
    "charge.dispute.created": _on_dispute,
    "charge.dispute.closed": _on_dispute,
}


# --- Dunning ------------------------------------------------------------------------------


def dunning_failures(customer: StripeCustomer) -> int:
    """Failed payments that count: after the latest payment, within the window that ends
    at the latest failure (event times, so delivery order does not matter)."""
    failures = StripePaymentFailure.objects.filter(organization_id=customer.organization_id)
    if customer.last_paid_at is not None:
        failures = failures.filter(failed_at__gt=customer.last_paid_at)
    latest = failures.order_by("-failed_at").values_list("failed_at", flat=True).first()
    if latest is None:
        return 0
    window = timedelta(days=settings.MANTLE_DUNNING_WINDOW_DAYS)
    return failures.filter(failed_at__gt=latest - window).count()


def _dunning_evaluate(customer: StripeCustomer, event: Event, *, new_failure: bool) -> None:
    """Suspends after repeated failures; lifts only a suspension that dunning imposed.

    Only a newly recorded failure suspends, so an operator who reactivates an
    organization by hand is not overruled by the next unrelated invoice event.
    """
    org = Organization.objects.select_for_update().get(pk=customer.organization_id)
    failures = dunning_failures(customer)
    limit: int = settings.MANTLE_DUNNING_MAX_FAILURES
    if new_failure and failures >= limit and org.status == Organization.Status.ACTIVE:
        organization_set_status(
            principal=SYSTEM,
            org=org,
            status=Organization.Status.SUSPENDED,
            reason=f"{failures} failed Stripe payments within "
            f"{settings.MANTLE_DUNNING_WINDOW_DAYS} days (latest event {event.id})",
        )
        customer.suspended_for_nonpayment = True
        customer.save(update_fields=["suspended_for_nonpayment"])
        logger.warning("organization %s suspended for non-payment", org.id)
    elif failures < limit and customer.suspended_for_nonpayment:
        if org.status == Organization.Status.SUSPENDED:
            organization_set_status(
                principal=SYSTEM,
                org=org,
                status=Organization.Status.ACTIVE,
                reason=f"Stripe payment received (event {event.id})",
            )
            logger.info("organization %s reactivated after payment", org.id)
        customer.suspended_for_nonpayment = False
        customer.save(update_fields=["suspended_for_nonpayment"])


def _record_invoice_paid(current: stripe_types.Invoice, event: Event) -> None:
    """Marks our invoice paid through the invoicing service (audited, wallet synced)."""
    invoice = Invoice.objects.filter(stripe_invoice_id=current.id).first()
    if invoice is None or invoice.status != Invoice.Status.FINALIZED:
        return  # not ours, or already settled (paid, or voided in the back office)
    # Stripe's clock may run a little ahead of ours; a payment is never in the future.
    paid_at = min(_paid_at(current) or event.created_at, timezone.now())
    invoice_mark_paid(
        principal=SYSTEM,
        invoice=invoice,
        payment_reference=f"stripe:{current.id}",
        reason=f"paid through Stripe (event {event.id})",
        paid_at=paid_at,
    )
    logger.info("invoice %s paid through Stripe %s", invoice.number, current.id)


def _paid_at(invoice: stripe_types.Invoice) -> datetime | None:
    return datetime.fromtimestamp(invoice.paid_at, tz=UTC) if invoice.paid_at else None


def _event_of(row: StripeEvent) -> Event:
    return event_from_payload(row.payload)
