"""Mantle's side of Stripe: the backend in use, customers, payment setup, invoice/meter pushes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import Membership, Organization
from accounts.permissions import Role
from billing.models import Invoice, StripeCustomer, UsageRollup
from billing.models import InvoiceLine as InvoiceLineRow
from billing.payments import stripe_types
from billing.payments.stripe_types import (
    CheckoutSession,
    InvoiceLine,
    InvoicePush,
    MeterEvent,
    PaymentMethod,
    SetupIntent,
    StripeBackend,
    StripeDisabled,
    hour_floor,
)
from billing.pricing import ROLLUP_SUMS, PriceBook, billed_quantities, model_kinds
from core.errors import Conflict, InvalidInput

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_backends: dict[tuple[object, ...], StripeBackend] = {}


# --- The backend --------------------------------------------------------------------------


def stripe_backend() -> StripeBackend | None:
    """The configured backend, or None when Stripe is disabled (no API key).

    `MANTLE_STRIPE_BACKEND = "fake"` selects one in-memory FakeStripe per process (tests).
    The real adapter is built once per configuration and reused (its HTTP session too).
    """
    kind = settings.MANTLE_STRIPE_BACKEND
    if kind == "fake":
        key: tuple[object, ...] = (
            "fake",
            settings.STRIPE_WEBHOOK_SECRET,
            settings.MANTLE_STRIPE_FAKE_CHECKOUT_URL,
            settings.MANTLE_STRIPE_FAKE_WEBHOOK_URL,
        )
    elif kind == "stripe":
        if not settings.STRIPE_API_KEY:
            return None
        key = (
            "stripe",
            settings.STRIPE_API_KEY,
            settings.STRIPE_MAX_NETWORK_RETRIES,
            settings.STRIPE_TIMEOUT_S,
            settings.STRIPE_COLLECTION_METHOD,
            settings.STRIPE_DAYS_UNTIL_DUE,
            settings.STRIPE_METER_EVENT_NAME,
        )
    else:
        raise ValueError(f"MANTLE_STRIPE_BACKEND must be 'stripe' or 'fake', not {kind!r}")
    with _lock:
        backend = _backends.get(key)
        if backend is None:
            backend = _backends[key] = _build(kind)
        return backend


def stripe_required() -> StripeBackend:
    backend = stripe_backend()
    if backend is None:
        raise StripeDisabled(
            "Stripe is not configured (STRIPE_API_KEY is empty): invoices are paid by bank "
            "transfer and recorded in the back office"
        )
    return backend


def stripe_backend_reset() -> None:
    """Forgets the built backends (tests: a fresh FakeStripe; settings changed)."""
    with _lock:
        _backends.clear()


def _build(kind: str) -> StripeBackend:
    # Imported here: the SDK is only loaded when Stripe is actually used.
    if kind == "fake":
        from billing.payments.stripe_fake import CHECKOUT_URL, FakeStripe

        return FakeStripe(
            webhook_secret=settings.STRIPE_WEBHOOK_SECRET or "whsec_fake",
            meter_event_name=settings.STRIPE_METER_EVENT_NAME,
            checkout_url=settings.MANTLE_STRIPE_FAKE_CHECKOUT_URL or CHECKOUT_URL,
            deliver_to=settings.MANTLE_STRIPE_FAKE_WEBHOOK_URL or None,
        )
    from billing.payments.stripe_client import StripeApi, StripeConfig

    return StripeApi(
        StripeConfig(
            api_key=settings.STRIPE_API_KEY,
            max_network_retries=settings.STRIPE_MAX_NETWORK_RETRIES,
            timeout_s=settings.STRIPE_TIMEOUT_S,
            collection_method=settings.STRIPE_COLLECTION_METHOD,
            days_until_due=settings.STRIPE_DAYS_UNTIL_DUE,
            meter_event_name=settings.STRIPE_METER_EVENT_NAME,
        )
    )


# --- Customers and payment methods --------------------------------------------------------


def stripe_customer_ensure(*, org: Organization, email: str | None = None) -> StripeCustomer:
    """The organization's Stripe customer, created once (the key is derived from its id)."""
    existing = StripeCustomer.objects.filter(organization=org).first()
    if existing is not None:
        return existing
    customer = stripe_required().customer_create(
        organization_id=org.id, name=org.name, email=email or _billing_email(org)
    )
    try:
        with transaction.atomic():
            row = StripeCustomer.objects.create(organization=org, stripe_customer_id=customer.id)
    except IntegrityError:
        # A concurrent call won; the idempotency key gave it the same Stripe customer.
        row = StripeCustomer.objects.get(organization=org)
    logger.info("organization %s is Stripe customer %s", org.id, row.stripe_customer_id)
    return row


def stripe_checkout_setup(
    *, org: Organization, success_url: str, cancel_url: str
) -> CheckoutSession:
    """A Stripe-hosted page where the organization saves a payment method."""
    customer = stripe_customer_ensure(org=org)
    return stripe_required().checkout_setup_session_create(
        customer_id=customer.stripe_customer_id,
        currency=_currency(),
        success_url=success_url,
        cancel_url=cancel_url,
    )


def stripe_setup_intent(*, org: Organization) -> SetupIntent:
    """A SetupIntent for saving a payment method with Stripe Elements in the console."""
    customer = stripe_customer_ensure(org=org)
    return stripe_required().setup_intent_create(customer_id=customer.stripe_customer_id)


def stripe_payment_methods(*, org: Organization) -> tuple[PaymentMethod, ...]:
    row = StripeCustomer.objects.filter(organization=org).first()
    if row is None:
        return ()
    return stripe_required().payment_methods_list(customer_id=row.stripe_customer_id)


# --- Invoices -----------------------------------------------------------------------------


def stripe_invoice_push(*, invoice_id: str) -> stripe_types.Invoice:
    """Mirrors one of our finalized invoices in Stripe, which then collects it.

    Safe to repeat: the Stripe draft's id is recorded before any line is added, each
    request carries an idempotency key derived from the invoice id (and line index),
    and an invoice Stripe already finalized is left alone.
    """
    invoice = Invoice.objects.select_related("organization").get(id=invoice_id)
    if invoice.status != Invoice.Status.FINALIZED:
        raise Conflict(
            f"invoice {invoice.number or invoice.id} is {invoice.status}; only finalized "
            "invoices are pushed to Stripe",
            param="invoice_id",
        )
    if not invoice.number:
        raise Conflict(f"invoice {invoice.id} has no number", param="invoice_id")
    lines = [
        InvoiceLine(
            description=line.label,
            amount=line.amount,
            metadata=_line_metadata(line),
        )
        for line in invoice.lines.order_by("position")
    ]
    # Our tax lines as items of their own (Stripe Tax is not used: the tax is ours, computed
    # at finalization), so the Stripe invoice adds up to our total.
    lines += [
        InvoiceLine(description=t.label, amount=t.amount, metadata={"kind": "tax"})
        for t in invoice.tax_lines.order_by("position")
        if t.amount
    ]
    if invoice.credits_applied:
        lines.append(InvoiceLine(description="Credits applied", amount=-invoice.credits_applied))
    return stripe_invoice_push_lines(
        organization=invoice.organization,
        invoice_id=invoice.id,
        number=invoice.number,
        currency=invoice.currency,
        lines=lines,
        total=invoice.total,
        stripe_invoice_id=invoice.stripe_invoice_id,
    )


def _line_metadata(line: InvoiceLineRow) -> dict[str, str]:
    """What a line is made of, for Stripe's dashboard; empty values are left out (an
    empty string means "unset" to Stripe)."""
    price = "" if line.unit_price is None else str(line.unit_price)
    quantity = str(line.quantity) if line.quantity else ""
    if line.kind == "provisioned":  # unit-hours of provisioned throughput, at a price each
        values = {
            "kind": line.kind,
            "model": line.model_name,
            "unit_hours": quantity,
            "unit_hour_price": price,
        }
    else:
        values = {
            "kind": line.kind,
            "model": line.model_name,
            "token_kind": line.token_kind,
            "tokens": quantity,
            "unit_price_per_million": price,
        }
    return {key: value for key, value in values.items() if value}


def stripe_invoices_pending(*, since: timedelta = timedelta(days=7)) -> list[str]:
    """Finalized invoices with something to collect that were never pushed (newest last).

    Only recent ones: enabling Stripe does not send a customer its whole history.
    """
    return list(
        Invoice.objects.filter(
            status=Invoice.Status.FINALIZED,
            stripe_invoice_id__isnull=True,
            total__gt=0,
            finalized_at__gte=timezone.now() - since,
        )
        .order_by("finalized_at")
        .values_list("id", flat=True)
    )


def stripe_invoice_push_lines(
    *,
    organization: Organization,
    invoice_id: str,
    number: str,
    currency: str,
    lines: Sequence[InvoiceLine],
    total: Decimal,
    stripe_invoice_id: str | None,
) -> stripe_types.Invoice:
    """The push itself, from plain values; records the Stripe id on our invoice."""
    if sum((line.amount for line in lines), Decimal(0)) != total:
        raise InvalidInput(
            f"the lines of invoice {number} do not add up to its total {total}", param="lines"
        )
    backend = stripe_required()
    customer = stripe_customer_ensure(org=organization)
    push = InvoicePush(
        invoice_id=invoice_id,
        number=number,
        currency=currency,
        customer_id=customer.stripe_customer_id,
        lines=tuple(lines),
        stripe_invoice_id=stripe_invoice_id,
    )

    def record_draft(draft_id: str) -> None:
        Invoice.objects.filter(id=invoice_id, stripe_invoice_id__isnull=True).update(
            stripe_invoice_id=draft_id
        )

    pushed = stripe_types.invoice_push(backend, push, on_draft=record_draft)
    logger.info("invoice %s is Stripe invoice %s (%s)", number, pushed.id, pushed.status)
    return pushed


# --- Meter events -------------------------------------------------------------------------


def stripe_meter_push(
    *, org: Organization, model: str, kind: str, hour: datetime, quantity: int
) -> MeterEvent:
    customer = stripe_customer_ensure(org=org)
    return stripe_required().meter_event_send(
        customer_id=customer.stripe_customer_id,
        model=model,
        kind=kind,
        hour=hour,
        quantity=quantity,
    )


def stripe_meter_push_hour(*, hour: datetime) -> int:
    """Sends one closed hour of usage as meter events (org, model, token kind); returns
    how many. Repeating an hour is harmless: identifiers are stable, so Stripe counts
    each once. Usage that reaches the rollups after an hour was sent is not resent
    (meter mode trades that for real-time billing; invoice mode is exact)."""
    start = hour_floor(hour)
    if start + timedelta(hours=1) > timezone.now():
        raise InvalidInput("only a closed hour can be sent to Stripe", param="hour")
    rows = sorted(
        UsageRollup.objects.filter(hour=start)
        .values("organization_id", "model_name")
        .annotate(**ROLLUP_SUMS),
        key=lambda row: (row["organization_id"], row["model_name"]),
    )
    orgs = Organization.objects.in_bulk({row["organization_id"] for row in rows})
    # Each model's own units: tokens for text models, requests and compute for tensors.
    kinds = model_kinds(row["model_name"] for row in rows)
    books: dict[str, PriceBook] = {}
    sent = 0
    for row in rows:
        org = orgs.get(row["organization_id"])
        if org is None:
            continue
        model = row["model_name"]
        book = books.get(org.id)
        if book is None:
            book = books[org.id] = PriceBook.load(org.id)
        # In the units the invoice would bill: cached input tokens apart only where the
        # organization's book prices them then, else counted as input tokens.
        rating = book.rate(model, start, billed_quantities(row, kinds[model]))
        for charge in rating.charges:
            stripe_meter_push(
                org=org, model=model, kind=charge.unit, hour=start, quantity=charge.quantity
            )
            sent += 1
    return sent


def _currency() -> str:
    return str(settings.MANTLE_BILLING_CURRENCY)


def _billing_email(org: Organization) -> str | None:
    """The first owner's email: where Stripe sends receipts and invoices."""
    owner = (
        Membership.objects.filter(organization=org, role=Role.OWNER)
        .select_related("user")
        .order_by("created_at")
        .first()
    )
    return owner.user.email if owner is not None else None
