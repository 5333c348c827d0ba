"""The only module that imports stripe: a typed adapter over a StripeClient; webhook signing."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import stripe

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
    Event,
    Invoice,
    InvoicePush,
    MeterEvent,
    PaymentIntent,
    PaymentMethod,
    Refund,
    SetupIntent,
    StripeAuthenticationFailed,
    StripeCardDeclined,
    StripeError,
    StripeIdempotencyConflict,
    StripeInvalidRequest,
    StripeObjectMissing,
    StripeRateLimited,
    StripeUnavailable,
    TopUpCharge,
    WebhookSignatureInvalid,
    customer_idempotency_key,
    event_from_payload,
    hour_floor,
    invoice_idempotency_key,
    meter_event_identifier,
    to_minor_units,
    topup_idempotency_key,
)

logger = logging.getLogger(__name__)

# The API version the adapter is written and tested against, pinned instead of
# following whatever the installed SDK defaults to.
API_VERSION: str = stripe.api_version


@dataclass(frozen=True, slots=True)
class StripeConfig:
    api_key: str
    # Retries of the SDK itself, with the same idempotency key each time: on
    # connection errors, 409, 5xx and whenever Stripe answers `Stripe-Should-Retry:
    # true` (its lock-timeout 429s). A plain rate-limit 429 is not retried here; it
    # surfaces as StripeRateLimited and the calling task retries later.
    max_network_retries: int = 2
    timeout_s: float = 30.0
    collection_method: str = "charge_automatically"  # or "send_invoice"
    days_until_due: int = 30  # only for send_invoice
    meter_event_name: str = "mantle_tokens"


class StripeApi:
    """The real backend (see stripe_types.StripeBackend); returns only our records."""

    def __init__(self, config: StripeConfig) -> None:
        self._config = config
        self._client = stripe.StripeClient(
            config.api_key,
            stripe_version=API_VERSION,
            max_network_retries=config.max_network_retries,
            # Chosen explicitly (requests), with our timeout instead of the SDK's 80 s.
            http_client=stripe.RequestsClient(timeout=config.timeout_s),
        )

    # --- Customers and payment methods ------------------------------------------------

    def customer_create(
        self, *, organization_id: str, name: str, email: str | None = None
    ) -> Customer:
        params: stripe.params.CustomerCreateParams = {
            "name": name,
            "metadata": {META_ORGANIZATION: organization_id},
        }
        if email:
            params["email"] = email
        with _translated("creating the Stripe customer"):
            customer = self._client.v1.customers.create(
                params, {"idempotency_key": customer_idempotency_key(organization_id)}
            )
        return _customer(customer.to_dict())

    def customer_retrieve(self, customer_id: str) -> Customer:
        with _translated("reading the Stripe customer"):
            customer = self._client.v1.customers.retrieve(customer_id)
        return _customer(customer.to_dict())

    def customer_set_default_payment_method(
        self, *, customer_id: str, payment_method_id: str
    ) -> Customer:
        with _translated("setting the default payment method"):
            customer = self._client.v1.customers.update(
                customer_id,
                {"invoice_settings": {"default_payment_method": payment_method_id}},
            )
        return _customer(customer.to_dict())

    def checkout_setup_session_create(
        self, *, customer_id: str, currency: str, success_url: str, cancel_url: str
    ) -> CheckoutSession:
        with _translated("creating the Checkout session"):
            session = self._client.v1.checkout.sessions.create(
                {
                    "mode": "setup",
                    "customer": customer_id,
                    # Setup mode needs a currency to pick the payment methods to offer.
                    "currency": currency.lower(),
                    "success_url": success_url,
                    "cancel_url": cancel_url,
                }
            )
        return CheckoutSession(id=session.id, url=str(session.url or ""))

    def setup_intent_create(self, *, customer_id: str) -> SetupIntent:
        with _translated("creating the SetupIntent"):
            intent = self._client.v1.setup_intents.create(
                {
                    "customer": customer_id,
                    "usage": "off_session",  # invoices are charged with nobody present
                    "automatic_payment_methods": {"enabled": True},
                }
            )
        return SetupIntent(
            id=intent.id, client_secret=str(intent.client_secret or ""), status=intent.status
        )

    def setup_intent_retrieve(self, setup_intent_id: str) -> tuple[SetupIntent, str | None]:
        with _translated("reading the SetupIntent"):
            intent = self._client.v1.setup_intents.retrieve(setup_intent_id)
        data = intent.to_dict()
        return (
            SetupIntent(
                id=data["id"],
                client_secret=str(data.get("client_secret") or ""),
                status=data["status"],
            ),
            _id_of(data.get("payment_method")),
        )

    def payment_methods_list(self, *, customer_id: str) -> tuple[PaymentMethod, ...]:
        with _translated("listing payment methods"):
            page = self._client.v1.customers.payment_methods.list(customer_id, {"limit": 100})
            items = [pm.to_dict() for pm in page.auto_paging_iter()]
        return tuple(_payment_method(pm) for pm in items)

    # --- Top-ups: a Checkout payment, or an off-session charge of the saved method --------

    def checkout_payment_session_create(
        self, charge: TopUpCharge, *, success_url: str, cancel_url: str
    ) -> CheckoutPayment:
        metadata = _topup_metadata(charge)
        with _translated("creating the top-up's Checkout session"):
            session = self._client.v1.checkout.sessions.create(
                {
                    "mode": "payment",
                    "customer": charge.customer_id,
                    "client_reference_id": charge.topup_id,
                    "line_items": [
                        {
                            "quantity": 1,
                            "price_data": {
                                "currency": charge.currency.lower(),
                                "unit_amount": charge.amount,
                                "product_data": {"name": charge.description},
                            },
                        }
                    ],
                    # On the PaymentIntent too, so the charge in Stripe's dashboard and
                    # its events lead back to the top-up.
                    "payment_intent_data": {
                        "description": charge.description,
                        "metadata": metadata,
                    },
                    "metadata": metadata,
                    "success_url": success_url,
                    "cancel_url": cancel_url,
                },
                {"idempotency_key": topup_idempotency_key(charge.topup_id, "checkout")},
            )
        return _checkout_payment(session.to_dict())

    def checkout_session_retrieve(self, session_id: str) -> CheckoutPayment:
        with _translated("reading the Checkout session"):
            session = self._client.v1.checkout.sessions.retrieve(session_id)
        return _checkout_payment(session.to_dict())

    def payment_intent_charge_off_session(
        self, charge: TopUpCharge, *, payment_method_id: str, idempotency_key: str
    ) -> PaymentIntent:
        with _translated("charging the saved payment method"):
            intent = self._client.v1.payment_intents.create(
                {
                    "amount": charge.amount,
                    "currency": charge.currency.lower(),
                    "customer": charge.customer_id,
                    "payment_method": payment_method_id,
                    # Nobody is present: Stripe declines (authentication_required) rather
                    # than ask for 3-D Secure, and confirms at once.
                    "off_session": True,
                    "confirm": True,
                    "description": charge.description,
                    "metadata": _topup_metadata(charge),
                },
                {"idempotency_key": idempotency_key},
            )
        return _payment_intent(intent.to_dict())

    def payment_intent_retrieve(self, payment_intent_id: str) -> PaymentIntent:
        with _translated("reading the PaymentIntent"):
            intent = self._client.v1.payment_intents.retrieve(
                payment_intent_id, {"expand": ["latest_charge"]}
            )
        return _payment_intent(intent.to_dict())

    # --- Refunds and disputes of a charge (made in Stripe's dashboard, or a cardholder's) --

    def charge_retrieve(self, charge_id: str) -> Charge:
        with _translated("reading the charge"):
            data = self._client.v1.charges.retrieve(charge_id, {"expand": ["refunds"]}).to_dict()
        refunds = data.get("refunds")
        if isinstance(refunds, Mapping) and refunds.get("has_more"):
            # The expanded list holds the first 10: page through all of the charge's.
            with _translated("listing the charge's refunds"):
                page = self._client.v1.refunds.list({"charge": charge_id, "limit": 100})
                items = [r.to_dict() for r in page.auto_paging_iter()]
            data = {**data, "refunds": {"object": "list", "has_more": False, "data": items}}
        return _charge(data)

    def dispute_retrieve(self, dispute_id: str) -> Dispute:
        with _translated("reading the dispute"):
            dispute = self._client.v1.disputes.retrieve(dispute_id)
        return _dispute(dispute.to_dict())

    # --- Invoices ----------------------------------------------------------------------

    def invoice_draft_create(self, push: InvoicePush) -> Invoice:
        """A draft that takes no pending item of the customer: only the lines we add."""
        params: stripe.params.InvoiceCreateParams = {
            "customer": push.customer_id,
            "currency": push.currency.lower(),
            "number": push.number,
            "description": f"Mantle invoice {push.number}",
            "collection_method": "charge_automatically",
            "auto_advance": True,
            "pending_invoice_items_behavior": "exclude",
            "metadata": {META_INVOICE: push.invoice_id, META_INVOICE_NUMBER: push.number},
        }
        if self._config.collection_method == "send_invoice":
            params["collection_method"] = "send_invoice"
            params["days_until_due"] = self._config.days_until_due
        with _translated(f"creating invoice {push.number}"):
            invoice = self._client.v1.invoices.create(
                params, {"idempotency_key": invoice_idempotency_key(push.invoice_id, "create")}
            )
        return _invoice(invoice.to_dict())

    def invoice_complete(self, push: InvoicePush) -> Invoice:
        """Adds the lines the draft lacks, one invoice item each, and finalizes it.

        Idempotent twice over: each item's idempotency key is derived from our invoice id
        and the line index, and lines already on the draft (found by their
        `mantle_line_index` metadata) are skipped, which still holds after Stripe has
        forgotten the keys (24 hours). An invoice no longer in draft is returned as is.
        """
        if push.stripe_invoice_id is None:
            raise ValueError("invoice_complete needs the Stripe draft's id")
        draft_id = push.stripe_invoice_id
        current = self._invoice_raw(draft_id)
        if current["status"] != "draft":
            return _invoice(current)
        currency = push.currency.lower()
        present = self._line_indexes(draft_id)
        for index, line in enumerate(push.lines):
            if index in present:
                continue
            metadata = {
                **line.metadata,
                META_INVOICE: push.invoice_id,
                META_LINE_INDEX: str(index),
            }
            with _translated(f"adding line {index} to invoice {push.number}"):
                self._client.v1.invoice_items.create(
                    {
                        "customer": push.customer_id,
                        "invoice": draft_id,
                        "currency": currency,
                        "amount": to_minor_units(line.amount, currency),
                        "description": line.description,
                        "metadata": metadata,
                    },
                    {"idempotency_key": invoice_idempotency_key(push.invoice_id, f"line-{index}")},
                )
        with _translated(f"finalizing invoice {push.number}"):
            final = self._client.v1.invoices.finalize_invoice(
                draft_id,
                {"auto_advance": True},
                {"idempotency_key": invoice_idempotency_key(push.invoice_id, "finalize")},
            )
        logger.info("invoice %s finalized in Stripe as %s", push.invoice_id, draft_id)
        return _invoice(final.to_dict())

    def invoice_retrieve(self, stripe_invoice_id: str) -> Invoice:
        return _invoice(self._invoice_raw(stripe_invoice_id))

    def _invoice_raw(self, stripe_invoice_id: str) -> dict[str, Any]:
        with _translated("reading the Stripe invoice"):
            invoice = self._client.v1.invoices.retrieve(stripe_invoice_id)
        return invoice.to_dict()

    def _line_indexes(self, stripe_invoice_id: str) -> set[int]:
        with _translated("reading the Stripe invoice's lines"):
            page = self._client.v1.invoices.line_items.list(stripe_invoice_id, {"limit": 100})
            lines = [line.to_dict() for line in page.auto_paging_iter()]
        found = set()
        for line in lines:
            raw = (line.get("metadata") or {}).get(META_LINE_INDEX)
            if raw is not None and str(raw).isdigit():
                found.add(int(raw))
        return found

    # --- Meter events ----------------------------------------------------------------------

    def meter_event_send(
        self, *, customer_id: str, model: str, kind: str, hour: datetime, quantity: int
    ) -> MeterEvent:
        """One hour of one token kind of one model for a customer, deduplicated by Stripe."""
        if quantity < 0:
            raise StripeInvalidRequest("a meter event quantity cannot be negative", param="value")
        identifier = meter_event_identifier(customer_id, model, kind, hour)
        timestamp = int(hour_floor(hour).timestamp())
        name = self._config.meter_event_name
        with _translated("sending the meter event"):
            self._client.v1.billing.meter_events.create(
                {
                    "event_name": name,
                    "identifier": identifier,
                    "timestamp": timestamp,
                    "payload": {
                        "stripe_customer_id": customer_id,
                        "value": str(quantity),
                        "model": model,
                        "token_kind": kind,
                    },
                },
                {"idempotency_key": identifier},
            )
        return MeterEvent(
            identifier=identifier,
            event_name=name,
            customer_id=customer_id,
            value=quantity,
            timestamp=timestamp,
        )


# --- Webhook signatures -------------------------------------------------------------------


def webhook_verify(
    payload: bytes, signature_header: str | None, *, secret: str, tolerance_s: int
) -> Event:
    """Checks the `Stripe-Signature` header (v1 HMAC and timestamp) and parses the event."""
    try:
        stripe.WebhookSignature.verify_header(
            payload, signature_header, secret, tolerance=tolerance_s
        )
    except stripe.SignatureVerificationError as exc:
        raise WebhookSignatureInvalid(
            f"invalid Stripe signature: {exc.user_message}", param="Stripe-Signature"
        ) from exc
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise StripeInvalidRequest("the webhook body is not JSON") from exc
    return event_from_payload(data)


def webhook_sign(payload: str, *, secret: str, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header for a body, made by the SDK's own helper (tests, the fake)."""
    return str(stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp))


# --- Translation --------------------------------------------------------------------------


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Stripe's exceptions become our domain errors, whose message says what failed."""
    try:
        yield
    except stripe.CardError as exc:
        body = exc.json_body if isinstance(exc.json_body, Mapping) else {}
        error = body.get("error") or {}
        # An off-session charge that needs its holder is `authentication_required`, with
        # or without a decline code.
        decline = error.get("decline_code") or exc.code
        raise StripeCardDeclined(
            f"{action}: the card was declined"
            + (f" ({decline})" if decline else "")
            + f": {exc.user_message}",
            decline_code=decline,
            payment_intent_id=_id_of(error.get("payment_intent")),
        ) from exc
    except stripe.RateLimitError as exc:
        _log(action, exc)
        raise StripeRateLimited(f"{action}: Stripe is rate limiting us; try again later") from exc
    except (stripe.AuthenticationError, stripe.PermissionError) as exc:
        _log(action, exc)
        raise StripeAuthenticationFailed(
            f"{action}: Stripe refused the platform's API key (check STRIPE_API_KEY): "
            f"{exc.user_message}"
        ) from exc
    except stripe.IdempotencyError as exc:
        _log(action, exc)
        raise StripeIdempotencyConflict(f"{action}: {exc.user_message}") from exc
    except stripe.InvalidRequestError as exc:
        _log(action, exc)
        if exc.code == "resource_missing":
            raise StripeObjectMissing(f"{action}: {exc.user_message}", param=exc.param) from exc
        raise StripeInvalidRequest(f"{action}: {exc.user_message}", param=exc.param) from exc
    except (stripe.APIConnectionError, stripe.APIError) as exc:
        _log(action, exc)
        raise StripeUnavailable(f"{action}: Stripe could not be reached or failed") from exc
    except stripe.StripeError as exc:
        _log(action, exc)
        raise StripeError(f"{action}: {exc.user_message}") from exc


def _log(action: str, exc: stripe.StripeError) -> None:
    logger.warning(
        "Stripe error while %s: %s (status %s, request %s)",
        action,
        type(exc).__name__,
        exc.http_status,
        exc.request_id,
    )


def _id_of(value: Any) -> str | None:
    """An expandable field: an id, an expanded object, or nothing."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return str(value["id"])
    return str(value)


def _customer(data: Mapping[str, Any]) -> Customer:
    settings = data.get("invoice_settings") or {}
    return Customer(
        id=data["id"],
        organization_id=(data.get("metadata") or {}).get(META_ORGANIZATION),
        default_payment_method_id=_id_of(settings.get("default_payment_method")),
    )


def _payment_method(data: Mapping[str, Any]) -> PaymentMethod:
    card = data.get("card") or {}
    return PaymentMethod(
        id=data["id"],
        type=data["type"],
        brand=card.get("brand"),
        last4=card.get("last4"),
        exp_month=card.get("exp_month"),
        exp_year=card.get("exp_year"),
    )


def _topup_metadata(charge: TopUpCharge) -> dict[str, str]:
    return {META_ORGANIZATION: charge.organization_id, META_TOPUP: charge.topup_id}


def _checkout_payment(data: Mapping[str, Any]) -> CheckoutPayment:
    metadata = data.get("metadata") or {}
    return CheckoutPayment(
        id=data["id"],
        url=data.get("url"),
        status=str(data.get("status") or ""),
        payment_status=str(data.get("payment_status") or ""),
        amount_total=int(data.get("amount_total") or 0),
        currency=str(data.get("currency") or ""),
        customer_id=_id_of(data.get("customer")),
        payment_intent_id=_id_of(data.get("payment_intent")),
        topup_id=metadata.get(META_TOPUP),
        organization_id=metadata.get(META_ORGANIZATION),
    )


def _payment_intent(data: Mapping[str, Any]) -> PaymentIntent:
    metadata = data.get("metadata") or {}
    charge = data.get("latest_charge")
    error = data.get("last_payment_error") or {}
    return PaymentIntent(
        id=data["id"],
        status=data["status"],
        amount=int(data.get("amount") or 0),
        currency=str(data.get("currency") or ""),
        customer_id=_id_of(data.get("customer")),
        topup_id=metadata.get(META_TOPUP),
        organization_id=metadata.get(META_ORGANIZATION),
        # Only an expanded charge carries its receipt; an id alone does not.
        receipt_url=charge.get("receipt_url") if isinstance(charge, Mapping) else None,
        failure_code=error.get("decline_code") or error.get("code"),
        failure_message=error.get("message"),
    )


def _invoice(data: Mapping[str, Any]) -> Invoice:
    transitions = data.get("status_transitions") or {}
    return Invoice(
        id=data["id"],
        customer_id=str(_id_of(data.get("customer"))),
        status=data["status"],
        currency=data["currency"],
        total=int(data.get("total") or 0),
        amount_due=int(data.get("amount_due") or 0),
        amount_paid=int(data.get("amount_paid") or 0),
        mantle_invoice_id=(data.get("metadata") or {}).get(META_INVOICE),
        number=data.get("number"),
        paid_at=transitions.get("paid_at"),
    )


def _charge(data: Mapping[str, Any]) -> Charge:
    refunds = data.get("refunds")
    items = refunds.get("data") or [] if isinstance(refunds, Mapping) else []
    return Charge(
        id=data["id"],
        amount=int(data.get("amount") or 0),
        amount_refunded=int(data.get("amount_refunded") or 0),
        refunded=bool(data.get("refunded")),
        currency=str(data.get("currency") or ""),
        customer_id=_id_of(data.get("customer")),
        payment_intent_id=_id_of(data.get("payment_intent")),
        disputed=bool(data.get("disputed")),
        refunds=tuple(
            Refund(id=r["id"], amount=int(r.get("amount") or 0), status=str(r.get("status")))
            for r in items
            if isinstance(r, Mapping)
        ),
    )


def _dispute(data: Mapping[str, Any]) -> Dispute:
    return Dispute(
        id=data["id"],
        charge_id=str(_id_of(data.get("charge"))),
        amount=int(data.get("amount") or 0),
        currency=str(data.get("currency") or ""),
        status=str(data.get("status") or ""),
        reason=str(data.get("reason") or ""),
    )
