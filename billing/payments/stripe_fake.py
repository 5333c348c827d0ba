"""An in-memory Stripe for tests, keeping the documented rules Mantle relies on."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import httpx

from billing.payments.stripe_client import API_VERSION, webhook_sign
from billing.payments.stripe_types import (
    META_INVOICE,
    META_INVOICE_NUMBER,
    META_LINE_INDEX,
    META_ORGANIZATION,
    META_TOPUP,
    Charge,
    CheckoutPayment,
    CheckoutSession,
    Customer,
    Dispute,
    Invoice,
    InvoicePush,
    MeterEvent,
    PaymentIntent,
    PaymentMethod,
    Refund,
    SetupIntent,
    StripeCardDeclined,
    StripeIdempotencyConflict,
    StripeInvalidRequest,
    StripeObjectMissing,
    TopUpCharge,
    customer_idempotency_key,
    hour_floor,
    invoice_idempotency_key,
    meter_event_identifier,
    to_minor_units,
    topup_idempotency_key,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Stripe keeps an idempotency key's result for at least 24 hours, then forgets it.
IDEMPOTENCY_TTL_S = 24 * 3600

# Stripe's test payment methods that the fake understands: the card each one
# stands for, and the decline code charging it gets (None: the charge succeeds).
# `authentication_required` (4000 0027 6000 3184) asks its holder for 3-D Secure every
# time: paid on a Checkout page, where the holder is present, declined off-session.
AUTHENTICATION_REQUIRED = "authentication_required"
TEST_CARDS: Mapping[str, tuple[str, str, str | None]] = {
    "pm_card_visa": ("visa", "4242", None),
    "pm_card_mastercard": ("mastercard", "4444", None),
    "pm_card_chargeDeclined": ("visa", "0002", "generic_decline"),
    "pm_card_chargeDeclinedInsufficientFunds": ("visa", "9995", "insufficient_funds"),
    "pm_card_authenticationRequired": ("visa", "3184", AUTHENTICATION_REQUIRED),
}

# Stripe's smallest and largest charge in minor units (docs.stripe.com/currencies,
# "Minimum and maximum charge amounts"; 0.50 of most currencies).
MIN_CHARGE = 50
MAX_CHARGE = 99_999_999
# A Checkout session expires 24 hours after it is created unless `expires_at` says less.
CHECKOUT_TTL_S = 24 * 3600
CHECKOUT_URL = "https://checkout.stripe.com/c/pay/"

# Invoice state machine (docs.stripe.com/invoicing/overview#invoice-statuses).
_TRANSITIONS: Mapping[str, frozenset[str]] = {
    "finalize": frozenset({"draft"}),
    "pay": frozenset({"open", "uncollectible"}),
    "void": frozenset({"open", "uncollectible"}),
    "mark_uncollectible": frozenset({"open"}),
}


class FakeStripe:
    """Implements billing.payments.stripe_types.StripeBackend, plus what Stripe itself would do
    on its side (charge an invoice, complete a setup) and the webhook events it sends.

    Rules kept: idempotency keys (same key and parameters → the same object; same key,
    other parameters or another endpoint → an error; forgotten after 24 hours), the
    invoice state machine (draft → open → paid | void | uncollectible; items only on
    drafts; a zero amount due is paid on finalization), payment methods attached to a
    customer, meter events deduplicated by identifier. Every object change is an event,
    signed like Stripe's with the webhook secret.
    """

    def __init__(
        self,
        *,
        webhook_secret: str,
        meter_event_name: str = "mantle_tokens",
        start: float | None = None,
        checkout_url: str = CHECKOUT_URL,
        deliver_to: str | None = None,
    ) -> None:
        self.webhook_secret = webhook_secret
        self.meter_event_name = meter_event_name
        # Where hosted Checkout pages live (`<checkout_url><session id>`): Stripe's own
        # address, or the fake's page served by a test server (billing/payments/fake_checkout.py).
        self.checkout_url = checkout_url
        # A webhook URL the fake POSTs every event to, signed, from a thread of its own,
        # as Stripe does a moment after the change; None: tests deliver events themselves.
        self.deliver_to = deliver_to
        self._outbox: queue.Queue[dict[str, Any]] | None = None
        self._now = float(start if start is not None else time.time())
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self.customers: dict[str, dict[str, Any]] = {}
        self.payment_methods: dict[str, dict[str, Any]] = {}
        self.setup_intents: dict[str, dict[str, Any]] = {}
        self.checkout_sessions: dict[str, dict[str, Any]] = {}
        self.payment_intents: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.disputes: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.invoice_items: dict[str, dict[str, Any]] = {}
        self.meter_events: dict[str, MeterEvent] = {}
        self._meter_dimensions: dict[str, tuple[str, str]] = {}
        self.events: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []  # (method name, idempotency key or "")
        self._idempotency: dict[str, tuple[str, str, float, Any]] = {}
        self._declined: dict[str, StripeCardDeclined] = {}

    # --- Clock ---------------------------------------------------------------------------

    def now(self) -> int:
        return int(self._now)

    def advance(self, seconds: float) -> None:
        self._now += seconds

    # --- The backend Protocol ------------------------------------------------------------

    def customer_create(
        self, *, organization_id: str, name: str, email: str | None = None
    ) -> Customer:
        params = {"name": name, "email": email, "metadata": {META_ORGANIZATION: organization_id}}

        def create() -> dict[str, Any]:
            customer: dict[str, Any] = {
                "id": self._new_id("cus"),
                "object": "customer",
                "created": self.now(),
                "name": name,
                "email": email,
                "metadata": {META_ORGANIZATION: organization_id},
                "invoice_settings": {"default_payment_method": None},
            }
            self.customers[customer["id"]] = customer
            self._emit("customer.created", customer)
            return customer

        data = self._idempotent(
            customer_idempotency_key(organization_id), "POST /v1/customers", params, create
        )
        return _customer(self.customers[data["id"]])

    def customer_retrieve(self, customer_id: str) -> Customer:
        with self._lock:
            return _customer(self._get(self.customers, customer_id, "customer"))

    def customer_set_default_payment_method(
        self, *, customer_id: str, payment_method_id: str
    ) -> Customer:
        with self._lock:
            self.requests.append(("customer_update", ""))
            customer = self._get(self.customers, customer_id, "customer")
            pm = self._get(self.payment_methods, payment_method_id, "payment_method")
            if pm["customer"] != customer_id:
                raise StripeInvalidRequest(
                    f"the payment method {payment_method_id} is not attached to {customer_id}",
                    param="invoice_settings[default_payment_method]",
                )
            customer["invoice_settings"]["default_payment_method"] = payment_method_id
            self._emit("customer.updated", customer)
            return _customer(customer)

    def checkout_setup_session_create(
        self, *, customer_id: str, currency: str, success_url: str, cancel_url: str
    ) -> CheckoutSession:
        with self._lock:
            self.requests.append(("checkout_session_create", ""))
            self._get(self.customers, customer_id, "customer")
            session_id = self._new_id("cs_test")
            self.checkout_sessions[session_id] = {
                "id": session_id,
                "object": "checkout.session",
                "mode": "setup",
                "customer": customer_id,
                "currency": currency.lower(),
                "status": "open",
                "payment_status": "no_payment_required",
                "amount_total": None,
                "payment_intent": None,
                "metadata": {},
                "success_url": success_url,
                "cancel_url": cancel_url,
                "setup_intent": None,
                "url": f"{self.checkout_url}{session_id}",
            }
            return CheckoutSession(id=session_id, url=self.checkout_sessions[session_id]["url"])

    def setup_intent_create(self, *, customer_id: str) -> SetupIntent:
        with self._lock:
            self.requests.append(("setup_intent_create", ""))
            return _setup_intent(self._setup_intent_new(customer_id))

    def setup_intent_retrieve(self, setup_intent_id: str) -> tuple[SetupIntent, str | None]:
        with self._lock:
            intent = self._get(self.setup_intents, setup_intent_id, "setup_intent")
            return _setup_intent(intent), intent["payment_method"]

    def payment_methods_list(self, *, customer_id: str) -> tuple[PaymentMethod, ...]:
        with self._lock:
            self._get(self.customers, customer_id, "customer")
            return tuple(
                _payment_method(pm)
                for pm in self.payment_methods.values()
                if pm["customer"] == customer_id
            )

    def checkout_payment_session_create(
        self, charge: TopUpCharge, *, success_url: str, cancel_url: str
    ) -> CheckoutPayment:
        currency = charge.currency.lower()
        metadata = {META_ORGANIZATION: charge.organization_id, META_TOPUP: charge.topup_id}
        params = {
            "mode": "payment",
            "customer": charge.customer_id,
            "client_reference_id": charge.topup_id,
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": currency,
                        "unit_amount": charge.amount,
                        "product_data": {"name": charge.description},
                    },
                }
            ],
            "payment_intent_data": {"description": charge.description, "metadata": metadata},
            "metadata": metadata,
            "success_url": success_url,
            "cancel_url": cancel_url,
        }

        def create() -> dict[str, Any]:
            self._get(self.customers, charge.customer_id, "customer")
            _check_charge_amount(charge.amount, param="line_items[0][price_data][unit_amount]")
            session_id = self._new_id("cs_test")
            session: dict[str, Any] = {
                "id": session_id,
                "object": "checkout.session",
                "mode": "payment",
                "created": self.now(),
                "expires_at": self.now() + CHECKOUT_TTL_S,
                "customer": charge.customer_id,
                "client_reference_id": charge.topup_id,
                "currency": currency,
                "amount_subtotal": charge.amount,
                "amount_total": charge.amount,
                "line_items": copy.deepcopy(params["line_items"]),
                "payment_intent_data": copy.deepcopy(params["payment_intent_data"]),
                "metadata": dict(metadata),
                "status": "open",
                "payment_status": "unpaid",
                # Created when the customer pays (API versions since 2022-08-01).
                "payment_intent": None,
                "setup_intent": None,
                "success_url": success_url,
                "cancel_url": cancel_url,
                "url": f"{self.checkout_url}{session_id}",
            }
            self.checkout_sessions[session_id] = session
            return session

        data = self._idempotent(
            topup_idempotency_key(charge.topup_id, "checkout"),
            "POST /v1/checkout/sessions",
            params,
            create,
        )
        return _checkout_payment(self.checkout_sessions[data["id"]])

    def checkout_session_retrieve(self, session_id: str) -> CheckoutPayment:
        with self._lock:
            return _checkout_payment(
                self._get(self.checkout_sessions, session_id, "checkout.session")
            )

    def payment_intent_charge_off_session(
        self, charge: TopUpCharge, *, payment_method_id: str, idempotency_key: str
    ) -> PaymentIntent:
        currency = charge.currency.lower()
        metadata = {META_ORGANIZATION: charge.organization_id, META_TOPUP: charge.topup_id}
        params = {
            "amount": charge.amount,
            "currency": currency,
            "customer": charge.customer_id,
            "payment_method": payment_method_id,
            "off_session": True,
            "confirm": True,
            "description": charge.description,
            "metadata": metadata,
        }

        def create() -> dict[str, Any]:
            self._get(self.customers, charge.customer_id, "customer")
            pm = self._get(self.payment_methods, payment_method_id, "payment_method")
            if pm["customer"] != charge.customer_id:
                raise StripeInvalidRequest(
                    f"The provided PaymentMethod {payment_method_id} does not belong to the "
                    f"customer {charge.customer_id}",
                    param="payment_method",
                )
            _check_charge_amount(charge.amount, param="amount")
            intent = self._payment_intent_new(
                customer_id=charge.customer_id,
                amount=charge.amount,
                currency=currency,
                metadata=metadata,
                description=charge.description,
            )
            intent["payment_method"] = payment_method_id
            decline = pm["decline_code"]
            if decline is None:
                self._payment_intent_succeed(intent)
                return intent
            # Stripe keeps the intent, records the error on it, and answers 402.
            code = (
                AUTHENTICATION_REQUIRED if decline == AUTHENTICATION_REQUIRED else "card_declined"
            )
            message = (
                "This payment required an authentication action to complete, but "
                "`error_on_requires_action` was set."
                if decline == AUTHENTICATION_REQUIRED
                else "Your card was declined."
            )
            intent["status"] = "requires_payment_method"
            intent["last_payment_error"] = {
                "type": "card_error",
                "code": code,
                "decline_code": decline,
                "message": message,
                "payment_method": {"id": payment_method_id},
            }
            self._emit("payment_intent.payment_failed", intent)
            raise StripeCardDeclined(
                f"charging the saved payment method: the card was declined ({decline}): {message}",
                decline_code=decline,
                payment_intent_id=intent["id"],
            )

        data = self._idempotent(idempotency_key, "POST /v1/payment_intents", params, create)
        return _payment_intent(data, self.charges)

    def payment_intent_retrieve(self, payment_intent_id: str) -> PaymentIntent:
        with self._lock:
            intent = self._get(self.payment_intents, payment_intent_id, "payment_intent")
            return _payment_intent(intent, self.charges)

    def charge_retrieve(self, charge_id: str) -> Charge:
        with self._lock:
            charge = self._get(self.charges, charge_id, "charge")
            return _charge(charge, self.refunds)

    def dispute_retrieve(self, dispute_id: str) -> Dispute:
        with self._lock:
            return _dispute(self._get(self.disputes, dispute_id, "dispute"))

    def invoice_draft_create(self, push: InvoicePush) -> Invoice:
        with self._lock:
            self._get(self.customers, push.customer_id, "customer")
            return _invoice(self._invoice_create(push, push.currency.lower()))

    def invoice_complete(self, push: InvoicePush) -> Invoice:
        """The same steps and idempotency keys as the real adapter."""
        if push.stripe_invoice_id is None:
            raise ValueError("invoice_complete needs the Stripe draft's id")
        currency = push.currency.lower()
        with self._lock:
            invoice = self._get(self.invoices, push.stripe_invoice_id, "invoice")
            if invoice["status"] != "draft":
                return _invoice(invoice)
            present = {
                int(line["metadata"][META_LINE_INDEX])
                for line in invoice["lines"]
                if META_LINE_INDEX in line["metadata"]
            }
            for index, line in enumerate(push.lines):
                if index in present:
                    continue
                self._invoice_item_create(
                    key=invoice_idempotency_key(push.invoice_id, f"line-{index}"),
                    customer_id=push.customer_id,
                    invoice_id=invoice["id"],
                    currency=currency,
                    amount=to_minor_units(line.amount, currency),
                    description=line.description,
                    metadata={
                        **line.metadata,
                        META_INVOICE: push.invoice_id,
                        META_LINE_INDEX: str(index),
                    },
                )
            final = self._idempotent(
                invoice_idempotency_key(push.invoice_id, "finalize"),
                f"POST /v1/invoices/{invoice['id']}/finalize",
                {"auto_advance": True},
                lambda: self._transition(invoice["id"], "finalize"),
            )
            # A replayed key answers with the response first given, as Stripe does.
            return _invoice(final)

    def invoice_retrieve(self, stripe_invoice_id: str) -> Invoice:
        with self._lock:
            return _invoice(self._get(self.invoices, stripe_invoice_id, "invoice"))

    def meter_event_send(
        self, *, customer_id: str, model: str, kind: str, hour: datetime, quantity: int
    ) -> MeterEvent:
        if quantity < 0:
            raise StripeInvalidRequest("a meter event quantity cannot be negative", param="value")
        identifier = meter_event_identifier(customer_id, model, kind, hour)
        timestamp = int(hour_floor(hour).timestamp())
        if timestamp < self.now() - 35 * 86400 or timestamp > self.now() + 300:
            # Stripe accepts events from the past 35 days up to 5 minutes ahead.
            raise StripeInvalidRequest("meter event timestamp out of range", param="timestamp")
        params = {
            "event_name": self.meter_event_name,
            "identifier": identifier,
            "timestamp": timestamp,
            "payload": {
                "stripe_customer_id": customer_id,
                "value": str(quantity),
                "model": model,
                "token_kind": kind,
            },
        }

        def create() -> MeterEvent:
            self._get(self.customers, customer_id, "customer")
            existing = self.meter_events.get(identifier)
            if existing is not None:
                return existing  # the identifier is unique: a resend counts once
            event = MeterEvent(
                identifier=identifier,
                event_name=self.meter_event_name,
                customer_id=customer_id,
                value=quantity,
                timestamp=timestamp,
            )
            self.meter_events[identifier] = event
            self._meter_dimensions[identifier] = (model, kind)
            return event

        return self._idempotent(identifier, "POST /v1/billing/meter_events", params, create)

    # --- What Stripe does on its side -----------------------------------------------------

    def payment_method_attach(self, card: str, *, customer_id: str) -> PaymentMethod:
        """Attaches a new payment method made from a Stripe test card (`pm_card_visa`...)."""
        with self._lock:
            return _payment_method(self._payment_method_new(card, customer_id))

    def setup_intent_succeed(self, setup_intent_id: str, *, card: str = "pm_card_visa") -> str:
        """The customer completes the setup (Checkout or Elements): the card is attached."""
        with self._lock:
            intent = self._get(self.setup_intents, setup_intent_id, "setup_intent")
            if intent["status"] == "succeeded":
                raise StripeInvalidRequest("this SetupIntent has already succeeded")
            pm = self._payment_method_new(card, intent["customer"])
            intent["status"] = "succeeded"
            intent["payment_method"] = pm["id"]
            self._emit("setup_intent.succeeded", intent)
            return str(pm["id"])

    def checkout_complete(self, session_id: str, *, card: str = "pm_card_visa") -> str:
        """The customer completes a Checkout session with a test card; returns the payment
        method. Setup mode saves the card; payment mode charges it (a declined card raises
        StripeCardDeclined and leaves the session open, as the hosted page lets the
        customer try another)."""
        with self._lock:
            session = self._get(self.checkout_sessions, session_id, "checkout.session")
            if session["status"] != "open":
                raise StripeInvalidRequest(
                    f"checkout session {session_id} is {session['status']}", param="session"
                )
            if session["mode"] == "payment":
                return self._checkout_pay(session, card)
            intent = self._setup_intent_new(session["customer"])
            pm_id = self.setup_intent_succeed(intent["id"], card=card)
            session["status"] = "complete"
            session["setup_intent"] = intent["id"]
            self._emit("checkout.session.completed", session)
            return pm_id

    def checkout_complete_delayed(self, session_id: str) -> str:
        """The customer completes a payment session with a delayed method (a bank debit):
        the session is complete but unpaid, its PaymentIntent `processing`, until
        `checkout_delayed_settle`. Returns the PaymentIntent's id."""
        with self._lock:
            session = self._get(self.checkout_sessions, session_id, "checkout.session")
            if session["status"] != "open" or session["mode"] != "payment":
                raise StripeInvalidRequest(
                    f"checkout session {session_id} is not an open payment session",
                    param="session",
                )
            data = session["payment_intent_data"]
            intent = self._payment_intent_new(
                customer_id=session["customer"],
                amount=session["amount_total"],
                currency=session["currency"],
                metadata=data.get("metadata") or {},
                description=data.get("description"),
            )
            intent["status"] = "processing"
            session["status"] = "complete"
            session["payment_intent"] = intent["id"]
            session["url"] = None
            self._emit("checkout.session.completed", session)
            return str(intent["id"])

    def checkout_delayed_settle(self, session_id: str, *, succeed: bool) -> None:
        """The delayed payment of a completed session clears or fails
        (`checkout.session.async_payment_succeeded` / `_failed`)."""
        with self._lock:
            session = self._get(self.checkout_sessions, session_id, "checkout.session")
            intent = self.payment_intents.get(session["payment_intent"] or "")
            if intent is None or intent["status"] != "processing":
                raise StripeInvalidRequest(f"checkout session {session_id} has no payment pending")
            if succeed:
                self._payment_intent_succeed(intent)
                session["payment_status"] = "paid"
                self._emit("checkout.session.async_payment_succeeded", session)
                return
            intent["status"] = "requires_payment_method"
            intent["last_payment_error"] = {
                "type": "invalid_request_error",
                "code": "payment_method_provider_decline",
                "message": "The payment was declined by the customer's bank.",
            }
            self._emit("payment_intent.payment_failed", intent)
            self._emit("checkout.session.async_payment_failed", session)

    def checkout_expire(self, session_id: str) -> None:
        """The session's 24 hours ran out (or the platform expired it): no payment."""
        with self._lock:
            session = self._get(self.checkout_sessions, session_id, "checkout.session")
            if session["status"] != "open":
                raise StripeInvalidRequest(
                    f"checkout session {session_id} is {session['status']}", param="session"
                )
            session["status"] = "expired"
            session["url"] = None
            self._emit("checkout.session.expired", session)

    def checkout_success_url(self, session_id: str) -> str:
        """Where the hosted page sends the customer after paying (Stripe fills in the
        `{CHECKOUT_SESSION_ID}` template variable)."""
        with self._lock:
            session = self._get(self.checkout_sessions, session_id, "checkout.session")
            return str(session["success_url"]).replace("{CHECKOUT_SESSION_ID}", session_id)

    def charge_refund(self, charge_id: str, *, amount: int | None = None) -> str:
        """A refund made in Stripe's dashboard (POST /v1/refunds): all that is left of
        the charge, or `amount` of it; succeeds at once, as card refunds do. Stripe
        refuses more than is left, a non-positive amount, and a charge with a dispute
        (`charge_disputed`). Emits `charge.refunded`; returns the refund's id."""
        with self._lock:
            charge = self._get(self.charges, charge_id, "charge")
            left = charge["amount"] - charge["amount_refunded"]
            value = left if amount is None else amount
            if charge["disputed"]:
                raise StripeInvalidRequest(
                    f"Charge {charge_id} has been charged back; cannot issue a refund.",
                    param="charge",
                )
            if value <= 0 or value > left:
                raise StripeInvalidRequest(
                    f"Refund amount ({value}) is greater than unrefunded amount on charge ({left})"
                    if value > 0
                    else "Refund amount must be positive",
                    param="amount",
                )
            refund: dict[str, Any] = {
                "id": self._new_id("re"),
                "object": "refund",
                "created": self.now(),
                "amount": value,
                "currency": charge["currency"],
                "charge": charge_id,
                "payment_intent": charge["payment_intent"],
                "status": "succeeded",
                "reason": "requested_by_customer",
            }
            self.refunds[refund["id"]] = refund
            charge["refund_ids"].append(refund["id"])
            charge["amount_refunded"] += value
            charge["refunded"] = charge["amount_refunded"] == charge["amount"]
            self._emit("refund.created", refund)
            self._emit("charge.refunded", charge)
            return str(refund["id"])

    def dispute_open(
        self, charge_id: str, *, reason: str = "fraudulent", amount: int | None = None
    ) -> str:
        """The cardholder disputes the charge (a chargeback): a Dispute of what is left
        unrefunded (or `amount`), `needs_response`; the charge becomes `disputed`. At most
        one dispute per charge. Emits `charge.dispute.created`; returns the dispute's id."""
        with self._lock:
            charge = self._get(self.charges, charge_id, "charge")
            if charge["disputed"]:
                raise StripeInvalidRequest(f"charge {charge_id} is already disputed")
            left = charge["amount"] - charge["amount_refunded"]
            value = left if amount is None else amount
            if value <= 0 or value > left:
                raise StripeInvalidRequest(
                    f"a dispute of {value} on charge {charge_id} with {left} unrefunded"
                )
            dispute: dict[str, Any] = {
                "id": self._new_id("dp"),
                "object": "dispute",
                "created": self.now(),
                "amount": value,
                "currency": charge["currency"],
                "charge": charge_id,
                "payment_intent": charge["payment_intent"],
                "reason": reason,
                "status": "needs_response",
                "is_charge_refundable": False,
            }
            self.disputes[dispute["id"]] = dispute
            charge["disputed"] = True
            self._emit("charge.dispute.created", dispute)
            return str(dispute["id"])

    def dispute_close(self, dispute_id: str, *, won: bool) -> None:
        """The issuer decides an open dispute: `won` (the platform keeps the money) or
        `lost`. Emits `charge.dispute.closed`."""
        with self._lock:
            dispute = self._get(self.disputes, dispute_id, "dispute")
            if dispute["status"] not in ("needs_response", "under_review"):
                raise StripeInvalidRequest(
                    f"dispute {dispute_id} is {dispute['status']}", param="dispute"
                )
            dispute["status"] = "won" if won else "lost"
            self._emit("charge.dispute.closed", dispute)

    def attempt_payment(self, stripe_invoice_id: str) -> bool:
        """Stripe's automatic collection: charges the default payment method of the customer."""
        with self._lock:
            invoice = self._get(self.invoices, stripe_invoice_id, "invoice")
            if invoice["status"] not in _TRANSITIONS["pay"]:
                raise StripeInvalidRequest(
                    f"invoice {stripe_invoice_id} is {invoice['status']}; only open invoices "
                    "can be paid"
                )
            customer = self.customers[invoice["customer"]]
            pm_id = customer["invoice_settings"]["default_payment_method"]
            declined = pm_id is None or self.payment_methods[pm_id]["decline_code"] is not None
            invoice["attempt_count"] += 1
            invoice["attempted"] = True
            if declined:
                self._emit("invoice.payment_failed", invoice)
                return False
            self._transition(stripe_invoice_id, "pay")
            return True

    def pay_invoice(self, stripe_invoice_id: str) -> None:
        """Paid out of band (`paid_out_of_band`), e.g. a bank transfer reconciled in Stripe."""
        with self._lock:
            self._transition(stripe_invoice_id, "pay")

    def void_invoice(self, stripe_invoice_id: str) -> None:
        with self._lock:
            self._transition(stripe_invoice_id, "void")

    def mark_uncollectible(self, stripe_invoice_id: str) -> None:
        with self._lock:
            self._transition(stripe_invoice_id, "mark_uncollectible")

    # --- Webhook events -----------------------------------------------------------------------

    def events_of(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == event_type]

    def signed(
        self, event: Mapping[str, Any], *, timestamp: int | None = None
    ) -> tuple[bytes, str]:
        """The body and `Stripe-Signature` header Stripe would POST for this event."""
        body = json.dumps(event)
        header = webhook_sign(body, secret=self.webhook_secret, timestamp=timestamp or self.now())
        return body.encode(), header

    def meter_total(self, *, customer_id: str, model: str, kind: str) -> int:
        return sum(
            e.value
            for e in self.meter_events.values()
            if e.customer_id == customer_id
            and self._meter_dimensions.get(e.identifier) == (model, kind)
        )

    # --- Internals ------------------------------------------------------------------------------

    def _idempotent(
        self, key: str, endpoint: str, params: Mapping[str, Any], create: Callable[[], T]
    ) -> T:
        fingerprint = json.dumps(params, sort_keys=True, default=str)
        with self._lock:
            self.requests.append((endpoint, key))
            self._forget_expired_keys()
            seen = self._idempotency.get(key)
            if seen is not None:
                seen_endpoint, seen_fingerprint, _, result = seen
                if seen_endpoint != endpoint or seen_fingerprint != fingerprint:
                    raise StripeIdempotencyConflict(
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with. Try using a key other than "
                        f"'{key}' if you meant to execute a different request.",
                        param="Idempotency-Key",
                    )
                if isinstance(result, StripeCardDeclined):
                    raise result
                return copy.deepcopy(result)
            # Requests that ran are remembered, a decline too (Stripe answers a retry with
            # the same 402); a failed validation is not.
            try:
                value = create()
            except StripeCardDeclined as declined:
                self._idempotency[key] = (endpoint, fingerprint, self._now, declined)
                raise
            self._idempotency[key] = (endpoint, fingerprint, self._now, copy.deepcopy(value))
            return value

    def _forget_expired_keys(self) -> None:
        cutoff = self._now - IDEMPOTENCY_TTL_S
        for key in [k for k, v in self._idempotency.items() if v[2] < cutoff]:
            del self._idempotency[key]

    def _invoice_create(self, push: InvoicePush, currency: str) -> dict[str, Any]:
        metadata = {META_INVOICE: push.invoice_id, META_INVOICE_NUMBER: push.number}
        params = {
            "customer": push.customer_id,
            "currency": currency,
            "number": push.number,
            "auto_advance": True,
            "pending_invoice_items_behavior": "exclude",
            "metadata": metadata,
        }

        def create() -> dict[str, Any]:
            if any(inv["number"] == push.number for inv in self.invoices.values()):
                raise StripeInvalidRequest(
                    f"invoice number {push.number} is already in use", param="number"
                )
            invoice: dict[str, Any] = {
                "id": self._new_id("in"),
                "object": "invoice",
                "created": self.now(),
                "customer": push.customer_id,
                "currency": currency,
                "number": push.number,
                "status": "draft",
                "auto_advance": True,
                "metadata": metadata,
                "lines": [],
                "total": 0,
                "amount_due": 0,
                "amount_paid": 0,
                "amount_remaining": 0,
                "attempt_count": 0,
                "attempted": False,
                "status_transitions": {
                    "finalized_at": None,
                    "paid_at": None,
                    "voided_at": None,
                    "marked_uncollectible_at": None,
                },
            }
            self.invoices[invoice["id"]] = invoice
            self._emit("invoice.created", invoice)
            return invoice

        data = self._idempotent(
            invoice_idempotency_key(push.invoice_id, "create"), "POST /v1/invoices", params, create
        )
        return self.invoices[data["id"]]

    def _invoice_item_create(
        self,
        *,
        key: str,
        customer_id: str,
        invoice_id: str,
        currency: str,
        amount: int,
        description: str,
        metadata: Mapping[str, str],
    ) -> None:
        params = {
            "customer": customer_id,
            "invoice": invoice_id,
            "currency": currency,
            "amount": amount,
            "description": description,
            "metadata": dict(metadata),
        }

        def create() -> dict[str, Any]:
            invoice = self._get(self.invoices, invoice_id, "invoice")
            if invoice["status"] != "draft":
                raise StripeInvalidRequest(
                    f"invoice {invoice_id} is {invoice['status']}; items can only be added "
                    "to a draft invoice",
                    param="invoice",
                )
            if invoice["currency"] != currency:
                raise StripeInvalidRequest("the item's currency differs from the invoice's")
            item: dict[str, Any] = {
                "id": self._new_id("ii"),
                "object": "invoiceitem",
                "customer": customer_id,
                "invoice": invoice_id,
                "currency": currency,
                "amount": amount,
                "description": description,
                "metadata": dict(metadata),
            }
            self.invoice_items[item["id"]] = item
            invoice["lines"].append(item)
            invoice["total"] += amount
            invoice["amount_due"] = max(invoice["total"], 0)
            invoice["amount_remaining"] = invoice["amount_due"]
            return item

        self._idempotent(key, "POST /v1/invoiceitems", params, create)

    def _transition(self, invoice_id: str, action: str) -> dict[str, Any]:
        invoice = self._get(self.invoices, invoice_id, "invoice")
        if invoice["status"] not in _TRANSITIONS[action]:
            raise StripeInvalidRequest(
                f"cannot {action.replace('_', ' ')} invoice {invoice_id}: it is "
                f"{invoice['status']}",
                param="invoice",
            )
        now = self.now()
        if action == "finalize":
            invoice["status"] = "open"
            invoice["status_transitions"]["finalized_at"] = now
            self._emit("invoice.finalized", invoice)
            if invoice["amount_due"] == 0:  # nothing to collect: Stripe marks it paid
                self._transition(invoice_id, "pay")
        elif action == "pay":
            invoice["status"] = "paid"
            invoice["amount_paid"] = invoice["amount_due"]
            invoice["amount_remaining"] = 0
            invoice["status_transitions"]["paid_at"] = now
            self._emit("invoice.paid", invoice)
            self._emit("invoice.payment_succeeded", invoice)
        elif action == "void":
            invoice["status"] = "void"
            invoice["status_transitions"]["voided_at"] = now
            self._emit("invoice.voided", invoice)
        elif action == "mark_uncollectible":
            invoice["status"] = "uncollectible"
            invoice["status_transitions"]["marked_uncollectible_at"] = now
            self._emit("invoice.marked_uncollectible", invoice)
        return invoice

    def _setup_intent_new(self, customer_id: str) -> dict[str, Any]:
        self._get(self.customers, customer_id, "customer")
        intent_id = self._new_id("seti")
        intent: dict[str, Any] = {
            "id": intent_id,
            "object": "setup_intent",
            "customer": customer_id,
            "status": "requires_payment_method",
            "usage": "off_session",
            "client_secret": f"{intent_id}_secret_{secrets.token_hex(8)}",
            "payment_method": None,
        }
        self.setup_intents[intent_id] = intent
        return intent

    def _payment_method_new(self, card: str, customer_id: str | None) -> dict[str, Any]:
        if card not in TEST_CARDS:
            raise StripeInvalidRequest(f"no such test payment method: {card}")
        if customer_id is not None:
            self._get(self.customers, customer_id, "customer")
        brand, last4, decline_code = TEST_CARDS[card]
        pm: dict[str, Any] = {
            "id": self._new_id("pm"),
            "object": "payment_method",
            "type": "card",
            "customer": customer_id,
            "card": {"brand": brand, "last4": last4, "exp_month": 12, "exp_year": 2034},
            "decline_code": decline_code,
        }
        self.payment_methods[pm["id"]] = pm
        if customer_id is not None:
            self._emit("payment_method.attached", pm)
        return pm

    def _checkout_pay(self, session: dict[str, Any], card: str) -> str:
        # Without setup_future_usage the card pays once and is not saved to the customer.
        pm = self._payment_method_new(card, None)
        decline = pm["decline_code"]
        # The holder is on the page: a card that asks for 3-D Secure gets it and pays.
        if decline is not None and decline != AUTHENTICATION_REQUIRED:
            raise StripeCardDeclined(f"Your card was declined ({decline}).", decline_code=decline)
        data = session["payment_intent_data"]
        intent = self._payment_intent_new(
            customer_id=session["customer"],
            amount=session["amount_total"],
            currency=session["currency"],
            metadata=data.get("metadata") or {},
            description=data.get("description"),
        )
        intent["payment_method"] = pm["id"]
        self._payment_intent_succeed(intent)
        session["status"] = "complete"
        session["payment_status"] = "paid"
        session["payment_intent"] = intent["id"]
        session["url"] = None
        self._emit("checkout.session.completed", session)
        return str(pm["id"])

    def _payment_intent_new(
        self,
        *,
        customer_id: str,
        amount: int,
        currency: str,
        metadata: Mapping[str, str],
        description: str | None,
    ) -> dict[str, Any]:
        intent_id = self._new_id("pi")
        intent: dict[str, Any] = {
            "id": intent_id,
            "object": "payment_intent",
            "created": self.now(),
            "amount": amount,
            "amount_received": 0,
            "currency": currency,
            "customer": customer_id,
            "description": description,
            "metadata": dict(metadata),
            "payment_method": None,
            "status": "requires_payment_method",
            "latest_charge": None,
            "last_payment_error": None,
            "client_secret": f"{intent_id}_secret_{secrets.token_hex(8)}",
        }
        self.payment_intents[intent_id] = intent
        self._emit("payment_intent.created", intent)
        return intent

    def _payment_intent_succeed(self, intent: dict[str, Any]) -> None:
        charge: dict[str, Any] = {
            "id": self._new_id("ch"),
            "object": "charge",
            "created": self.now(),
            "amount": intent["amount"],
            "amount_captured": intent["amount"],
            "currency": intent["currency"],
            "customer": intent["customer"],
            "payment_intent": intent["id"],
            "payment_method": intent["payment_method"],
            "paid": True,
            "status": "succeeded",
            "amount_refunded": 0,
            "refunded": False,
            "disputed": False,
            "refund_ids": [],  # the fake's own: `refunds`, a list, when expanded
            "receipt_url": f"https://pay.stripe.com/receipts/payment/{secrets.token_urlsafe(24)}",
        }
        self.charges[charge["id"]] = charge
        intent["status"] = "succeeded"
        intent["amount_received"] = intent["amount"]
        intent["latest_charge"] = charge["id"]
        self._emit("charge.succeeded", charge)
        self._emit("payment_intent.succeeded", intent)

    def _emit(self, event_type: str, obj: Mapping[str, Any]) -> None:
        snapshot = copy.deepcopy(dict(obj))
        snapshot.pop("decline_code", None)
        snapshot.pop("refund_ids", None)  # `refunds` is expandable only (2022-11-15 on)
        if snapshot.get("object") == "invoice":
            snapshot["lines"] = {"object": "list", "data": snapshot["lines"]}
        if snapshot.get("object") == "checkout.session":
            snapshot.pop("line_items", None)  # expandable only, never in an event
            snapshot.pop("payment_intent_data", None)  # a create parameter, not a field
        event = {
            "id": self._new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": self.now(),
            "livemode": False,
            "pending_webhooks": 1,
            "type": event_type,
            "data": {"object": snapshot},
        }
        self.events.append(event)
        if self.deliver_to is not None:
            self._send_later(event)

    def _send_later(self, event: dict[str, Any]) -> None:
        if self._outbox is None:
            self._outbox = queue.Queue()
            threading.Thread(
                target=self._deliver_loop, name="fake-stripe-webhooks", daemon=True
            ).start()
        self._outbox.put(event)

    def _deliver_loop(self) -> None:
        """Stripe's webhook sender: each event POSTed, signed, in order; retried a few
        times on a failure (Stripe retries for days; a test server needs seconds)."""
        assert self._outbox is not None and self.deliver_to is not None
        while True:
            event = self._outbox.get()
            for attempt in range(5):
                # Signed now, by the wall clock: the receiver checks the timestamp.
                body, header = self.signed(event, timestamp=int(time.time()))
                try:
                    # A non-2xx answer is a failure Stripe would redeliver.
                    httpx.post(
                        self.deliver_to,
                        content=body,
                        headers={"Content-Type": "application/json", "Stripe-Signature": header},
                        timeout=30,
                    ).raise_for_status()
                    break
                except httpx.HTTPError as exc:
                    logger.warning("fake Stripe: delivering %s failed: %s", event["id"], exc)
                    time.sleep(0.5 * (attempt + 1))

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._seq):06d}{secrets.token_hex(4)}"

    @staticmethod
    def _get(table: Mapping[str, dict[str, Any]], object_id: str, kind: str) -> dict[str, Any]:
        found = table.get(object_id)
        if found is None:
            raise StripeObjectMissing(f"No such {kind}: '{object_id}'", param="id")
        return found


def _customer(data: Mapping[str, Any]) -> Customer:
    return Customer(
        id=data["id"],
        organization_id=data["metadata"].get(META_ORGANIZATION),
        default_payment_method_id=data["invoice_settings"]["default_payment_method"],
    )


def _check_charge_amount(amount: int, *, param: str) -> None:
    if amount < MIN_CHARGE:
        raise StripeInvalidRequest(f"Amount must be at least {MIN_CHARGE} minor units", param=param)
    if amount > MAX_CHARGE:
        raise StripeInvalidRequest(f"Amount must be no more than {MAX_CHARGE}", param=param)


def _checkout_payment(data: Mapping[str, Any]) -> CheckoutPayment:
    metadata = data.get("metadata") or {}
    return CheckoutPayment(
        id=data["id"],
        url=data.get("url"),
        status=data["status"],
        payment_status=data["payment_status"],
        amount_total=data["amount_total"] or 0,
        currency=data["currency"],
        customer_id=data["customer"],
        payment_intent_id=data["payment_intent"],
        topup_id=metadata.get(META_TOPUP),
        organization_id=metadata.get(META_ORGANIZATION),
    )


def _payment_intent(data: Mapping[str, Any], charges: Mapping[str, Any]) -> PaymentIntent:
    charge = charges.get(data["latest_charge"]) if data["latest_charge"] else None
    error = data["last_payment_error"] or {}
    return PaymentIntent(
        id=data["id"],
        status=data["status"],
        amount=data["amount"],
        currency=data["currency"],
        customer_id=data["customer"],
        topup_id=data["metadata"].get(META_TOPUP),
        organization_id=data["metadata"].get(META_ORGANIZATION),
        receipt_url=charge["receipt_url"] if charge else None,
        failure_code=error.get("decline_code") or error.get("code"),
        failure_message=error.get("message"),
    )


def _setup_intent(data: Mapping[str, Any]) -> SetupIntent:
    return SetupIntent(id=data["id"], client_secret=data["client_secret"], status=data["status"])


def _payment_method(data: Mapping[str, Any]) -> PaymentMethod:
    card = data["card"]
    return PaymentMethod(
        id=data["id"],
        type=data["type"],
        brand=card["brand"],
        last4=card["last4"],
        exp_month=card["exp_month"],
        exp_year=card["exp_year"],
    )


def _invoice(data: Mapping[str, Any]) -> Invoice:
    return Invoice(
        id=data["id"],
        customer_id=data["customer"],
        status=data["status"],
        currency=data["currency"],
        total=data["total"],
        amount_due=data["amount_due"],
        amount_paid=data["amount_paid"],
        mantle_invoice_id=data["metadata"].get(META_INVOICE),
        number=data["number"],
        paid_at=data["status_transitions"]["paid_at"],
    )


def _charge(data: Mapping[str, Any], refunds: Mapping[str, Mapping[str, Any]]) -> Charge:
    return Charge(
        id=data["id"],
        amount=data["amount"],
        amount_refunded=data["amount_refunded"],
        refunded=data["refunded"],
        currency=data["currency"],
        customer_id=data["customer"],
        payment_intent_id=data["payment_intent"],
        disputed=data["disputed"],
        refunds=tuple(
            Refund(id=r["id"], amount=r["amount"], status=r["status"])
            for r in (refunds[i] for i in data["refund_ids"])
        ),
    )


def _dispute(data: Mapping[str, Any]) -> Dispute:
    return Dispute(
        id=data["id"],
        charge_id=data["charge"],
        amount=data["amount"],
        currency=data["currency"],
        status=data["status"],
        reason=data["reason"],
    )
