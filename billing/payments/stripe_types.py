"""What crosses the Stripe boundary: the backend Protocol, frozen records and domain errors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from core.errors import DomainError

# Stripe's zero- and three-decimal currencies (docs.stripe.com/currencies); every
# other currency has two decimals.
ZERO_DECIMAL_CURRENCIES = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga"}
    | {"pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})

# Metadata keys that tie Stripe objects back to ours.
META_ORGANIZATION = "mantle_organization_id"
META_INVOICE = "mantle_invoice_id"
META_INVOICE_NUMBER = "mantle_invoice_number"
META_LINE_INDEX = "mantle_line_index"
META_TOPUP = "mantle_topup_id"


# --- Errors -------------------------------------------------------------------------------


class StripeError(DomainError):
    """Stripe refused or could not be reached; `code` says which, the message says why."""

    status = 502
    code = "stripe_error"


class StripeDisabled(StripeError):
    status = 503
    code = "stripe_disabled"


class StripeCardDeclined(StripeError):
    status = 402
    code = "card_declined"

    def __init__(
        self,
        message: str,
        *,
        decline_code: str | None = None,
        payment_intent_id: str | None = None,
    ) -> None:
        super().__init__(message, param="payment_method")
        self.decline_code = decline_code
        # The PaymentIntent a declined confirmation left behind (off-session charges).
        self.payment_intent_id = payment_intent_id


class StripeRateLimited(StripeError):
    """Still rate limited after the client's own retries: try again later."""

    status = 503
    code = "stripe_rate_limited"


class StripeUnavailable(StripeError):
    """Network failure or a 5xx from Stripe after the client's retries."""

    status = 503
    code = "stripe_unavailable"


class StripeAuthenticationFailed(StripeError):
    """Stripe rejected the platform's own API key: an operator's problem, not a customer's."""

    status = 500
    code = "stripe_authentication_failed"


class StripeIdempotencyConflict(StripeError):
    """An idempotency key was reused with other parameters (a bug on our side)."""

    status = 409
    code = "stripe_idempotency_conflict"


class StripeInvalidRequest(StripeError):
    status = 400
    code = "stripe_invalid_request"


class StripeObjectMissing(StripeError):
    status = 404
    code = "stripe_resource_missing"


class WebhookSignatureInvalid(StripeError):
    status = 400
    code = "invalid_signature"


# --- Records ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Customer:
    id: str
    organization_id: str | None
    default_payment_method_id: str | None = None


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    id: str
    url: str


@dataclass(frozen=True, slots=True)
class CheckoutPayment:
    """A payment-mode Checkout session (a top-up), as Stripe reports it now."""

    id: str
    url: str | None
    status: str  # open | complete | expired
    payment_status: str  # unpaid | paid | no_payment_required
    amount_total: int  # minor units
    currency: str
    customer_id: str | None
    payment_intent_id: str | None  # set once the customer paid (API versions since 2022-08)
    topup_id: str | None  # our metadata
    organization_id: str | None


@dataclass(frozen=True, slots=True)
class PaymentIntent:
    id: str
    status: str  # requires_payment_method | requires_action | processing | succeeded | ...
    amount: int  # minor units
    currency: str
    customer_id: str | None
    topup_id: str | None  # our metadata
    organization_id: str | None
    receipt_url: str | None = None  # of its latest charge
    failure_code: str | None = None  # last_payment_error: decline_code, else code
    failure_message: str | None = None


@dataclass(frozen=True, slots=True)
class Refund:
    id: str
    amount: int  # minor units
    status: str  # pending | requires_action | succeeded | failed | canceled


@dataclass(frozen=True, slots=True)
class Charge:
    """A charge as Stripe reports it now, with its refunds (expanded)."""

    id: str
    amount: int  # minor units
    amount_refunded: int
    refunded: bool  # fully refunded
    currency: str
    customer_id: str | None
    payment_intent_id: str | None
    disputed: bool
    refunds: tuple[Refund, ...] = ()


@dataclass(frozen=True, slots=True)
class Dispute:
    id: str
    charge_id: str
    amount: int  # minor units
    currency: str
    # warning_needs_response | warning_under_review | warning_closed | needs_response |
    # under_review | won | lost
    status: str
    reason: str


@dataclass(frozen=True, slots=True)
class TopUpCharge:
    """What a top-up asks Stripe for: an amount of the organization's currency, tied back
    to our top-up row by metadata."""

    organization_id: str
    topup_id: str
    customer_id: str
    amount: int  # minor units
    currency: str
    description: str


@dataclass(frozen=True, slots=True)
class SetupIntent:
    id: str
    client_secret: str
    status: str


@dataclass(frozen=True, slots=True)
class PaymentMethod:
    id: str
    type: str
    brand: str | None = None
    last4: str | None = None
    exp_month: int | None = None
    exp_year: int | None = None


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """One line of a finalized invoice: its total, already rounded to the minor unit."""

    description: str
    amount: Decimal
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InvoicePush:
    """A finalized Mantle invoice to mirror in Stripe; `stripe_invoice_id` once its draft exists."""

    invoice_id: str
    number: str
    currency: str
    customer_id: str
    lines: tuple[InvoiceLine, ...]
    stripe_invoice_id: str | None = None


@dataclass(frozen=True, slots=True)
class Invoice:
    id: str
    customer_id: str
    status: str  # draft | open | paid | void | uncollectible
    currency: str
    total: int  # minor units
    amount_due: int
    amount_paid: int
    mantle_invoice_id: str | None
    number: str | None = None
    paid_at: int | None = None


@dataclass(frozen=True, slots=True)
class MeterEvent:
    identifier: str
    event_name: str
    customer_id: str
    value: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class Event:
    """A verified webhook event, as plain data (never an SDK object)."""

    id: str
    type: str
    created: int
    object_id: str | None
    object_type: str | None
    livemode: bool
    payload: Mapping[str, Any]

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created, tz=UTC)


class StripeBackend(Protocol):
    """The small Stripe surface Mantle uses; the real adapter and the fake both implement it.

    Every method that creates something is safe to retry: its idempotency key (or,
    for meter events, its identifier) is derived from our own ids.
    """

    def customer_create(
        self, *, organization_id: str, name: str, email: str | None = None
    ) -> Customer: ...

    def customer_retrieve(self, customer_id: str) -> Customer: ...

    def customer_set_default_payment_method(
        self, *, customer_id: str, payment_method_id: str
    ) -> Customer: ...

    def checkout_setup_session_create(
        self, *, customer_id: str, currency: str, success_url: str, cancel_url: str
    ) -> CheckoutSession: ...

    def setup_intent_create(self, *, customer_id: str) -> SetupIntent: ...

    def setup_intent_retrieve(self, setup_intent_id: str) -> tuple[SetupIntent, str | None]:
        """The setup intent and the id of the payment method it saved, if any."""
        ...

    def payment_methods_list(self, *, customer_id: str) -> tuple[PaymentMethod, ...]: ...

    def checkout_payment_session_create(
        self, charge: TopUpCharge, *, success_url: str, cancel_url: str
    ) -> CheckoutPayment:
        """A hosted page where the customer pays `charge` once (mode `payment`)."""
        ...

    def checkout_session_retrieve(self, session_id: str) -> CheckoutPayment: ...

    def payment_intent_charge_off_session(
        self, charge: TopUpCharge, *, payment_method_id: str, idempotency_key: str
    ) -> PaymentIntent:
        """Charges a saved payment method with nobody present (`off_session`, confirmed at
        once); a decline or a card that needs its holder raises StripeCardDeclined."""
        ...

    def payment_intent_retrieve(self, payment_intent_id: str) -> PaymentIntent:
        """The intent, with its latest charge's receipt URL."""
        ...

    def charge_retrieve(self, charge_id: str) -> Charge:
        """The charge, with its refunds expanded."""
        ...

    def dispute_retrieve(self, dispute_id: str) -> Dispute: ...

    def invoice_draft_create(self, push: InvoicePush) -> Invoice: ...

    def invoice_complete(self, push: InvoicePush) -> Invoice:
        """Adds the lines the draft `push.stripe_invoice_id` lacks, then finalizes it."""
        ...

    def invoice_retrieve(self, stripe_invoice_id: str) -> Invoice: ...

    def meter_event_send(
        self, *, customer_id: str, model: str, kind: str, hour: datetime, quantity: int
    ) -> MeterEvent: ...


# --- Shared rules -------------------------------------------------------------------------


def invoice_push(
    backend: StripeBackend, push: InvoicePush, *, on_draft: Callable[[str], None] | None = None
) -> Invoice:
    """Mirrors a finalized invoice: a draft, its lines, finalization; safe to repeat.

    `on_draft` receives the draft's id before any line is added, so the caller can
    record it and a later retry resumes that draft instead of relying on idempotency
    keys alone (Stripe forgets them after 24 hours).
    """
    if push.stripe_invoice_id is None:
        draft = backend.invoice_draft_create(push)
        if on_draft is not None:
            on_draft(draft.id)
        push = replace(push, stripe_invoice_id=draft.id)
    return backend.invoice_complete(push)


def minor_unit_exponent(currency: str) -> int:
    cur = currency.lower()
    if cur in ZERO_DECIMAL_CURRENCIES:
        return 0
    if cur in THREE_DECIMAL_CURRENCIES:
        return 3
    return 2


def to_minor_units(amount: Decimal, currency: str) -> int:
    """An exact amount in the currency's minor unit; refuses to round (lines are pre-rounded)."""
    scaled = amount.scaleb(minor_unit_exponent(currency))
    if scaled != scaled.to_integral_value():
        raise StripeInvalidRequest(
            f"amount {amount} {currency.upper()} is not a whole number of minor units; "
            "invoice lines must be rounded before they are pushed",
            param="amount",
        )
    return int(scaled)


def customer_idempotency_key(organization_id: str) -> str:
    return f"mantle-customer-{organization_id}"


def invoice_idempotency_key(invoice_id: str, step: str) -> str:
    """`step` is `create`, `line-<index>` or `finalize`."""
    return f"mantle-invoice-{invoice_id}-{step}"


def topup_idempotency_key(topup_id: str, step: str) -> str:
    """`step` is `checkout` (the session of a console top-up)."""
    return f"mantle-topup-{topup_id}-{step}"


def auto_recharge_idempotency_key(organization_id: str, crossing: int) -> str:
    """One charge per threshold crossing: the n-th crossing of an organization has one key."""
    return f"mantle-auto-recharge-{organization_id}-{crossing}"


def meter_event_identifier(customer_id: str, model: str, kind: str, hour: datetime) -> str:
    """Stable across resends, so Stripe deduplicates a repeated hour (for at least 24 h)."""
    hour_start = hour_floor(hour)
    raw = f"{customer_id}|{model}|{kind}|{hour_start.isoformat()}"
    return "mantle-" + hashlib.sha256(raw.encode()).hexdigest()[:48]


def hour_floor(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("meter hours must be timezone-aware")
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def event_from_payload(data: Any) -> Event:
    if not isinstance(data, dict) or data.get("object") != "event":
        raise StripeInvalidRequest("the webhook body is not a Stripe event")
    obj = (data.get("data") or {}).get("object") or {}
    try:
        return Event(
            id=str(data["id"]),
            type=str(data["type"]),
            created=int(data["created"]),
            object_id=obj.get("id"),
            object_type=obj.get("object"),
            livemode=bool(data.get("livemode", False)),
            payload=data,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StripeInvalidRequest(f"the Stripe event lacks a field: {exc}") from exc
