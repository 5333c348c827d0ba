"""The Stripe adapter on the wire: the exact requests it sends, and how it maps Stripe's errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses

from billing.payments.stripe_client import API_VERSION, StripeApi, StripeConfig
from billing.payments.stripe_types import (
    CheckoutPayment,
    InvoiceLine,
    InvoicePush,
    StripeAuthenticationFailed,
    StripeCardDeclined,
    StripeIdempotencyConflict,
    StripeInvalidRequest,
    StripeObjectMissing,
    StripeRateLimited,
    StripeUnavailable,
    TopUpCharge,
    invoice_push,
    meter_event_identifier,
    to_minor_units,
)

API = "https://api.stripe.com"
KEY = "sk_test_wire_123"


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Iterator[responses.RequestsMock]:
    # The SDK's backoff between retries (0.5 s and up) is real sleeping: skip it.
    monkeypatch.setattr("stripe._http_client.HTTPClient._sleep_time_seconds", lambda self, n: 0.0)
    # Every request must match a registered response; anything else is a failure,
    # never a request to Stripe.
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


def api(**overrides: Any) -> StripeApi:
    return StripeApi(StripeConfig(api_key=KEY, **overrides))


def form(call: Any) -> dict[str, str]:
    body = call.request.body or ""
    if isinstance(body, bytes):
        body = body.decode()
    return dict(parse_qsl(body, keep_blank_values=True))


def query(call: Any) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(call.request.url).query))


def path(call: Any) -> str:
    parts = urlsplit(call.request.url)
    assert parts.scheme == "https"
    assert parts.netloc == "api.stripe.com"
    return parts.path


def assert_stripe_headers(call: Any, *, idempotency_key: str | None) -> None:
    headers = call.request.headers
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Stripe-Version"] == API_VERSION
    if idempotency_key is not None:
        assert headers["Idempotency-Key"] == idempotency_key


def invoice_json(status: str = "draft", **extra: Any) -> dict[str, Any]:
    return {
        "id": "in_1",
        "object": "invoice",
        "customer": "cus_1",
        "currency": "usd",
        "status": status,
        "number": "MNT-2026-000007",
        "total": 1800,
        "amount_due": 1800,
        "amount_paid": 0,
        "metadata": {"mantle_invoice_id": "inv_abc", "mantle_invoice_number": "MNT-2026-000007"},
        "status_transitions": {"paid_at": None},
        **extra,
    }


def lines_json(*indexes: int) -> dict[str, Any]:
    return {
        "object": "list",
        "url": "/v1/invoices/in_1/lines",
        "has_more": False,
        "data": [
            {"id": f"il_{i}", "object": "line_item", "metadata": {"mantle_line_index": str(i)}}
            for i in indexes
        ],
    }


def error_json(type_: str, code: str | None, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": type_, "code": code, "message": message, **extra}}


PUSH = InvoicePush(
    invoice_id="inv_abc",
    number="MNT-2026-000007",
    currency="USD",
    customer_id="cus_1",
    lines=(
        InvoiceLine(description="chat input tokens", amount=Decimal("12.34")),
        InvoiceLine(description="chat output tokens", amount=Decimal("5.66")),
        InvoiceLine(description="Credits applied", amount=Decimal("-1.00")),
    ),
)


# --- Customers and payment methods --------------------------------------------------------


def test_customer_create_request(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/customers",
        json={
            "id": "cus_1",
            "object": "customer",
            "metadata": {"mantle_organization_id": "org_x"},
            "invoice_settings": {"default_payment_method": None},
        },
    )

    customer = api().customer_create(organization_id="org_x", name="Acme", email="a@acme.test")

    assert customer.id == "cus_1"
    assert customer.organization_id == "org_x"
    assert customer.default_payment_method_id is None
    (call,) = wire.calls
    assert call.request.method == "POST"
    assert path(call) == "/v1/customers"
    assert form(call) == {
        "name": "Acme",
        "email": "a@acme.test",
        "metadata[mantle_organization_id]": "org_x",
    }
    assert_stripe_headers(call, idempotency_key="mantle-customer-org_x")


def test_checkout_session_in_setup_mode(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/checkout/sessions",
        json={"id": "cs_1", "object": "checkout.session", "url": "https://checkout.stripe.com/x"},
    )

    session = api().checkout_setup_session_create(
        customer_id="cus_1",
        currency="USD",
        success_url="https://mantle.test/ok",
        cancel_url="https://mantle.test/cancel",
    )

    assert (session.id, session.url) == ("cs_1", "https://checkout.stripe.com/x")
    (call,) = wire.calls
    assert path(call) == "/v1/checkout/sessions"
    assert form(call) == {
        "mode": "setup",
        "customer": "cus_1",
        "currency": "usd",
        "success_url": "https://mantle.test/ok",
        "cancel_url": "https://mantle.test/cancel",
    }
    assert_stripe_headers(call, idempotency_key=None)


def test_setup_intent_for_off_session_use(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/setup_intents",
        json={
            "id": "seti_1",
            "object": "setup_intent",
            "client_secret": "seti_1_secret_x",
            "status": "requires_payment_method",
        },
    )

    intent = api().setup_intent_create(customer_id="cus_1")

    assert (intent.id, intent.client_secret, intent.status) == (
        "seti_1",
        "seti_1_secret_x",
        "requires_payment_method",
    )
    assert form(wire.calls[0]) == {
        "customer": "cus_1",
        "usage": "off_session",
        "automatic_payment_methods[enabled]": "true",
    }


def test_payment_methods_list(wire: responses.RequestsMock) -> None:
    wire.get(
        f"{API}/v1/customers/cus_1/payment_methods",
        json={
            "object": "list",
            "url": "/v1/customers/cus_1/payment_methods",
            "has_more": False,
            "data": [
                {
                    "id": "pm_1",
                    "object": "payment_method",
                    "type": "card",
                    "card": {"brand": "visa", "last4": "4242", "exp_month": 4, "exp_year": 2031},
                },
                {"id": "pm_2", "object": "payment_method", "type": "sepa_debit"},
            ],
        },
    )

    methods = api().payment_methods_list(customer_id="cus_1")

    assert [(m.id, m.type, m.brand, m.last4) for m in methods] == [
        ("pm_1", "card", "visa", "4242"),
        ("pm_2", "sepa_debit", None, None),
    ]
    (call,) = wire.calls
    assert call.request.method == "GET"
    assert path(call) == "/v1/customers/cus_1/payment_methods"
    assert query(call) == {"limit": "100"}


def test_default_payment_method_update(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/customers/cus_1",
        json={
            "id": "cus_1",
            "object": "customer",
            "metadata": {},
            "invoice_settings": {"default_payment_method": "pm_1"},
        },
    )

    customer = api().customer_set_default_payment_method(
        customer_id="cus_1", payment_method_id="pm_1"
    )

    assert customer.default_payment_method_id == "pm_1"
    assert form(wire.calls[0]) == {"invoice_settings[default_payment_method]": "pm_1"}


# --- Invoices -----------------------------------------------------------------------------


def test_invoice_draft_request(wire: responses.RequestsMock) -> None:
    wire.post(f"{API}/v1/invoices", json=invoice_json())

    draft = api().invoice_draft_create(PUSH)

    assert (draft.id, draft.status, draft.mantle_invoice_id) == ("in_1", "draft", "inv_abc")
    (call,) = wire.calls
    assert path(call) == "/v1/invoices"
    assert form(call) == {
        "customer": "cus_1",
        "currency": "usd",
        "number": "MNT-2026-000007",
        "description": "Mantle invoice MNT-2026-000007",
        "collection_method": "charge_automatically",
        "auto_advance": "true",
        "pending_invoice_items_behavior": "exclude",
        "metadata[mantle_invoice_id]": "inv_abc",
        "metadata[mantle_invoice_number]": "MNT-2026-000007",
    }
    assert_stripe_headers(call, idempotency_key="mantle-invoice-inv_abc-create")


def test_invoice_draft_for_bank_transfer(wire: responses.RequestsMock) -> None:
    wire.post(f"{API}/v1/invoices", json=invoice_json())

    api(collection_method="send_invoice", days_until_due=14).invoice_draft_create(PUSH)

    sent = form(wire.calls[0])
    assert sent["collection_method"] == "send_invoice"
    assert sent["days_until_due"] == "14"


def test_invoice_push_sends_lines_with_derived_keys_then_finalizes(
    wire: responses.RequestsMock,
) -> None:
    wire.post(f"{API}/v1/invoices", json=invoice_json())
    wire.get(f"{API}/v1/invoices/in_1", json=invoice_json())
    wire.get(f"{API}/v1/invoices/in_1/lines", json=lines_json())
    wire.post(f"{API}/v1/invoiceitems", json={"id": "ii_x", "object": "invoiceitem"})
    wire.post(
        f"{API}/v1/invoices/in_1/finalize",
        json=invoice_json(status="open", total=1700, amount_due=1700),
    )
    drafts: list[str] = []

    pushed = invoice_push(api(), PUSH, on_draft=drafts.append)

    assert drafts == ["in_1"]
    assert (pushed.id, pushed.status, pushed.total) == ("in_1", "open", 1700)
    sent = [(c.request.method, path(c)) for c in wire.calls]
    assert sent == [
        ("POST", "/v1/invoices"),
        ("GET", "/v1/invoices/in_1"),
        ("GET", "/v1/invoices/in_1/lines"),
        ("POST", "/v1/invoiceitems"),
        ("POST", "/v1/invoiceitems"),
        ("POST", "/v1/invoiceitems"),
        ("POST", "/v1/invoices/in_1/finalize"),
    ]
    assert query(wire.calls[2]) == {"limit": "100"}
    items = wire.calls[3:6]
    assert [form(c) for c in items] == [
        {
            "customer": "cus_1",
            "invoice": "in_1",
            "currency": "usd",
            "amount": amount,
            "description": description,
            "metadata[mantle_invoice_id]": "inv_abc",
            "metadata[mantle_line_index]": str(index),
        }
        for index, (amount, description) in enumerate(
            [
                ("1234", "chat input tokens"),
                ("566", "chat output tokens"),
                ("-100", "Credits applied"),
            ]
        )
    ]
    for index, call in enumerate(items):
        assert_stripe_headers(call, idempotency_key=f"mantle-invoice-inv_abc-line-{index}")
    assert form(wire.calls[6]) == {"auto_advance": "true"}
    assert_stripe_headers(wire.calls[6], idempotency_key="mantle-invoice-inv_abc-finalize")


def test_invoice_complete_resumes_a_draft_without_duplicating_lines(
    wire: responses.RequestsMock,
) -> None:
    # An earlier push added line 0 and crashed; Stripe has long forgotten its keys.
    wire.get(f"{API}/v1/invoices/in_1", json=invoice_json())
    wire.get(f"{API}/v1/invoices/in_1/lines", json=lines_json(0))
    wire.post(f"{API}/v1/invoiceitems", json={"id": "ii_x", "object": "invoiceitem"})
    wire.post(f"{API}/v1/invoices/in_1/finalize", json=invoice_json(status="open"))

    api().invoice_complete(_resumed())

    items = [c for c in wire.calls if path(c) == "/v1/invoiceitems"]
    assert [form(c)["metadata[mantle_line_index]"] for c in items] == ["1", "2"]


def test_invoice_complete_leaves_a_finalized_invoice_alone(wire: responses.RequestsMock) -> None:
    wire.get(f"{API}/v1/invoices/in_1", json=invoice_json(status="paid"))

    pushed = api().invoice_complete(_resumed())

    assert pushed.status == "paid"
    assert len(wire.calls) == 1


def test_invoice_push_refuses_fractions_of_a_cent_before_any_line(
    wire: responses.RequestsMock,
) -> None:
    wire.get(f"{API}/v1/invoices/in_1", json=invoice_json())
    wire.get(f"{API}/v1/invoices/in_1/lines", json=lines_json())
    bad = InvoicePush(
        invoice_id="inv_abc",
        number="MNT-2026-000007",
        currency="usd",
        customer_id="cus_1",
        lines=(InvoiceLine(description="x", amount=Decimal("0.005")),),
        stripe_invoice_id="in_1",
    )

    with pytest.raises(StripeInvalidRequest, match="not a whole number of minor units"):
        api().invoice_complete(bad)

    assert [path(c) for c in wire.calls] == ["/v1/invoices/in_1", "/v1/invoices/in_1/lines"]


def _resumed() -> InvoicePush:
    return InvoicePush(
        invoice_id=PUSH.invoice_id,
        number=PUSH.number,
        currency=PUSH.currency,
        customer_id=PUSH.customer_id,
        lines=PUSH.lines,
        stripe_invoice_id="in_1",
    )


# --- Meter events -------------------------------------------------------------------------


def test_meter_event_request(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/billing/meter_events",
        json={"object": "billing.meter_event", "event_name": "mantle_tokens", "identifier": "x"},
    )
    hour = datetime(2026, 11, 21, 13, 0, tzinfo=UTC)

    event = api().meter_event_send(
        customer_id="cus_1", model="mantle-chat-small", kind="output", hour=hour, quantity=123_456
    )

    expected_id = meter_event_identifier("cus_1", "mantle-chat-small", "output", hour)
    assert event.identifier == expected_id
    (call,) = wire.calls
    assert path(call) == "/v1/billing/meter_events"
    assert form(call) == {
        "event_name": "mantle_tokens",
        "identifier": expected_id,
        "timestamp": str(int(hour.timestamp())),
        "payload[stripe_customer_id]": "cus_1",
        "payload[value]": "123456",
        "payload[model]": "mantle-chat-small",
        "payload[token_kind]": "output",
    }
    assert_stripe_headers(call, idempotency_key=expected_id)


def test_meter_identifier_is_stable_within_the_hour_and_distinct_across() -> None:
    at = datetime(2026, 11, 21, 13, 0, tzinfo=UTC)
    same = meter_event_identifier("cus_1", "m", "input", datetime(2026, 11, 21, 13, 59, tzinfo=UTC))
    assert meter_event_identifier("cus_1", "m", "input", at) == same
    others = {
        meter_event_identifier("cus_1", "m", "output", at),
        meter_event_identifier("cus_2", "m", "input", at),
        meter_event_identifier("cus_1", "m2", "input", at),
        meter_event_identifier("cus_1", "m", "input", datetime(2026, 11, 21, 14, tzinfo=UTC)),
    }
    assert same not in others
    assert len(others) == 4
    assert len(same) <= 100  # Stripe's limit on identifiers


# --- Errors -------------------------------------------------------------------------------


def test_card_declined_402(wire: responses.RequestsMock) -> None:
    wire.post(f"{API}/v1/customers", status=402, json=wire_card_error())

    with pytest.raises(StripeCardDeclined) as caught:
        api().customer_create(organization_id="org_x", name="Acme")

    assert caught.value.status == 402
    assert caught.value.code == "card_declined"
    assert caught.value.decline_code == "insufficient_funds"
    assert (
        "declined (insufficient_funds): Your card has insufficient funds." in caught.value.message
    )
    assert len(wire.calls) == 1  # a decline is final: never retried


def wire_card_error() -> dict[str, Any]:
    return error_json(
        "card_error",
        "card_declined",
        "Your card has insufficient funds.",
        decline_code="insufficient_funds",
    )


def test_bad_api_key_401_is_not_retried(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/customers",
        status=401,
        json=error_json("invalid_request_error", None, "Invalid API Key provided: sk_test_***123"),
    )

    with pytest.raises(StripeAuthenticationFailed) as caught:
        api(max_network_retries=3).customer_create(organization_id="org_x", name="Acme")

    assert caught.value.status == 500
    assert "STRIPE_API_KEY" in caught.value.message
    assert len(wire.calls) == 1


def test_rate_limit_429_is_left_to_the_caller(wire: responses.RequestsMock) -> None:
    # A plain rate limit: the SDK does not retry it, our task queue does, later.
    wire.post(
        f"{API}/v1/customers",
        status=429,
        json=error_json("invalid_request_error", "rate_limit", "Too many requests"),
    )

    with pytest.raises(StripeRateLimited) as caught:
        api(max_network_retries=2).customer_create(organization_id="org_x", name="Acme")

    assert (caught.value.status, caught.value.code) == (503, "stripe_rate_limited")
    assert len(wire.calls) == 1


def test_retryable_429_is_retried_with_the_same_idempotency_key(
    wire: responses.RequestsMock,
) -> None:
    # Stripe marks lock timeouts retryable; the SDK retries up to max_network_retries.
    for _ in range(2):
        wire.post(
            f"{API}/v1/customers",
            status=429,
            headers={"Stripe-Should-Retry": "true"},
            json=error_json("invalid_request_error", "lock_timeout", "Try again"),
        )
    wire.post(
        f"{API}/v1/customers",
        json={"id": "cus_1", "object": "customer", "metadata": {}, "invoice_settings": {}},
    )

    customer = api(max_network_retries=2).customer_create(organization_id="org_x", name="Acme")

    assert customer.id == "cus_1"
    assert len(wire.calls) == 3
    assert {c.request.headers["Idempotency-Key"] for c in wire.calls} == {"mantle-customer-org_x"}


def test_retries_stop_at_max_network_retries(wire: responses.RequestsMock) -> None:
    for _ in range(2):
        wire.post(
            f"{API}/v1/customers",
            status=429,
            headers={"Stripe-Should-Retry": "true"},
            json=error_json("invalid_request_error", "lock_timeout", "Try again"),
        )

    with pytest.raises(StripeRateLimited):
        api(max_network_retries=1).customer_create(organization_id="org_x", name="Acme")

    assert len(wire.calls) == 2


def test_server_error_is_retried_then_unavailable(wire: responses.RequestsMock) -> None:
    for _ in range(3):
        wire.post(f"{API}/v1/customers", status=500, json=error_json("api_error", None, "Oops"))

    with pytest.raises(StripeUnavailable):
        api(max_network_retries=2).customer_create(organization_id="org_x", name="Acme")

    assert len(wire.calls) == 3


def test_connection_error_is_unavailable(wire: responses.RequestsMock) -> None:
    wire.post(f"{API}/v1/customers", body=requests.ConnectionError("no route to host"))

    with pytest.raises(StripeUnavailable, match="could not be reached"):
        api(max_network_retries=0).customer_create(organization_id="org_x", name="Acme")


def test_idempotency_key_reused_with_other_parameters(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/customers",
        status=400,
        json=error_json(
            "idempotency_error",
            None,
            "Keys for idempotent requests can only be used with the same parameters they "
            "were first used with.",
        ),
    )

    with pytest.raises(StripeIdempotencyConflict) as caught:
        api().customer_create(organization_id="org_x", name="Renamed")

    assert caught.value.status == 409


def test_missing_object_404(wire: responses.RequestsMock) -> None:
    wire.get(
        f"{API}/v1/invoices/in_gone",
        status=404,
        json=error_json(
            "invalid_request_error", "resource_missing", "No such invoice: 'in_gone'", param="id"
        ),
    )

    with pytest.raises(StripeObjectMissing, match="No such invoice"):
        api().invoice_retrieve("in_gone")


def test_invalid_request_400_names_the_parameter(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/invoices",
        status=400,
        json=error_json(
            "invalid_request_error",
            "invoice_number_taken",
            "The number MNT-2026-000007 is already taken.",
            param="number",
        ),
    )

    with pytest.raises(StripeInvalidRequest) as caught:
        api().invoice_draft_create(PUSH)

    assert caught.value.param == "number"
    assert "already taken" in caught.value.message


# --- Amounts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("12.34", "usd", 1234),
        ("-1.00", "USD", -100),
        ("1500", "jpy", 1500),
        ("1.230", "kwd", 1230),
        ("0", "eur", 0),
    ],
)
def test_minor_units(amount: str, currency: str, minor: int) -> None:
    assert to_minor_units(Decimal(amount), currency) == minor


@pytest.mark.parametrize(("amount", "currency"), [("0.005", "usd"), ("1.5", "jpy")])
def test_minor_units_refuse_to_round(amount: str, currency: str) -> None:
    with pytest.raises(StripeInvalidRequest):
        to_minor_units(Decimal(amount), currency)


# --- Top-ups: a Checkout payment, an off-session charge -------------------------------------

CHARGE = TopUpCharge(
    organization_id="org_x",
    topup_id="topup_1",
    customer_id="cus_1",
    amount=2500,
    currency="USD",
    description="Mantle prepaid credit for Acme",
)


def test_checkout_session_in_payment_mode(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/checkout/sessions",
        json={
            "id": "cs_2",
            "object": "checkout.session",
            "mode": "payment",
            "url": "https://checkout.stripe.com/c/pay/cs_2",
            "status": "open",
            "payment_status": "unpaid",
            "amount_total": 2500,
            "currency": "usd",
            "customer": "cus_1",
            "payment_intent": None,
            "metadata": {"mantle_organization_id": "org_x", "mantle_topup_id": "topup_1"},
        },
    )

    session = api().checkout_payment_session_create(
        CHARGE,
        success_url="https://mantle.test/ok?checkout={CHECKOUT_SESSION_ID}",
        cancel_url="https://mantle.test/cancel",
    )

    assert session == CheckoutPayment(
        id="cs_2",
        url="https://checkout.stripe.com/c/pay/cs_2",
        status="open",
        payment_status="unpaid",
        amount_total=2500,
        currency="usd",
        customer_id="cus_1",
        payment_intent_id=None,
        topup_id="topup_1",
        organization_id="org_x",
    )
    (call,) = wire.calls
    assert path(call) == "/v1/checkout/sessions"
    assert form(call) == {
        "mode": "payment",
        "customer": "cus_1",
        "client_reference_id": "topup_1",
        "line_items[0][quantity]": "1",
        "line_items[0][price_data][currency]": "usd",
        "line_items[0][price_data][unit_amount]": "2500",
        "line_items[0][price_data][product_data][name]": "Mantle prepaid credit for Acme",
        "payment_intent_data[description]": "Mantle prepaid credit for Acme",
        "payment_intent_data[metadata][mantle_organization_id]": "org_x",
        "payment_intent_data[metadata][mantle_topup_id]": "topup_1",
        "metadata[mantle_organization_id]": "org_x",
        "metadata[mantle_topup_id]": "topup_1",
        "success_url": "https://mantle.test/ok?checkout={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://mantle.test/cancel",
    }
    assert_stripe_headers(call, idempotency_key="mantle-topup-topup_1-checkout")


def test_checkout_session_retrieve_after_payment(wire: responses.RequestsMock) -> None:
    wire.get(
        f"{API}/v1/checkout/sessions/cs_2",
        json={
            "id": "cs_2",
            "object": "checkout.session",
            "url": None,
            "status": "complete",
            "payment_status": "paid",
            "amount_total": 2500,
            "currency": "usd",
            "customer": "cus_1",
            "payment_intent": "pi_9",
            "metadata": {"mantle_organization_id": "org_x", "mantle_topup_id": "topup_1"},
        },
    )

    session = api().checkout_session_retrieve("cs_2")

    assert (session.status, session.payment_status, session.payment_intent_id) == (
        "complete",
        "paid",
        "pi_9",
    )
    assert_stripe_headers(wire.calls[0], idempotency_key=None)


def test_off_session_charge_request(wire: responses.RequestsMock) -> None:
    wire.post(
        f"{API}/v1/payment_intents",
        json={
            "id": "pi_1",
            "object": "payment_intent",
            "status": "succeeded",
            "amount": 2500,
            "currency": "usd",
            "customer": "cus_1",
            "latest_charge": "ch_1",
            "last_payment_error": None,
            "metadata": {"mantle_organization_id": "org_x", "mantle_topup_id": "topup_1"},
        },
    )

    intent = api().payment_intent_charge_off_session(
        CHARGE, payment_method_id="pm_1", idempotency_key="mantle-auto-recharge-org_x-3"
    )

    assert (intent.id, intent.status, intent.amount, intent.topup_id) == (
        "pi_1",
        "succeeded",
        2500,
        "topup_1",
    )
    assert intent.receipt_url is None  # the charge was not expanded
    (call,) = wire.calls
    assert path(call) == "/v1/payment_intents"
    assert form(call) == {
        "amount": "2500",
        "currency": "usd",
        "customer": "cus_1",
        "payment_method": "pm_1",
        "off_session": "true",
        "confirm": "true",
        "description": "Mantle prepaid credit for Acme",
        "metadata[mantle_organization_id]": "org_x",
        "metadata[mantle_topup_id]": "topup_1",
    }
    assert_stripe_headers(call, idempotency_key="mantle-auto-recharge-org_x-3")


@pytest.mark.parametrize(
    ("code", "decline_code", "expected"),
    [
        ("card_declined", "insufficient_funds", "insufficient_funds"),
        ("authentication_required", "authentication_required", "authentication_required"),
        ("authentication_required", None, "authentication_required"),
    ],
)
def test_off_session_decline_names_the_intent_and_is_not_retried(
    wire: responses.RequestsMock, code: str, decline_code: str | None, expected: str
) -> None:
    extra: dict[str, Any] = {
        "payment_intent": {
            "id": "pi_7",
            "object": "payment_intent",
            "status": "requires_payment_method",
        }
    }
    if decline_code:
        extra["decline_code"] = decline_code
    wire.post(
        f"{API}/v1/payment_intents",
        status=402,
        json=error_json("card_error", code, "The card was declined.", **extra),
    )

    with pytest.raises(StripeCardDeclined) as caught:
        api().payment_intent_charge_off_session(
            CHARGE, payment_method_id="pm_1", idempotency_key="mantle-auto-recharge-org_x-1"
        )

    assert caught.value.decline_code == expected
    assert caught.value.payment_intent_id == "pi_7"
    assert len(wire.calls) == 1


def test_payment_intent_retrieve_expands_the_charge_for_its_receipt(
    wire: responses.RequestsMock,
) -> None:
    wire.get(
        f"{API}/v1/payment_intents/pi_1",
        json={
            "id": "pi_1",
            "object": "payment_intent",
            "status": "succeeded",
            "amount": 2500,
            "currency": "usd",
            "customer": "cus_1",
            "latest_charge": {
                "id": "ch_1",
                "object": "charge",
                "receipt_url": "https://pay.stripe.com/receipts/payment/abc",
            },
            "last_payment_error": None,
            "metadata": {"mantle_organization_id": "org_x", "mantle_topup_id": "topup_1"},
        },
    )

    intent = api().payment_intent_retrieve("pi_1")

    assert intent.receipt_url == "https://pay.stripe.com/receipts/payment/abc"
    (call,) = wire.calls
    assert path(call) == "/v1/payment_intents/pi_1"
    assert query(call) == {"expand[0]": "latest_charge"}


def test_charge_retrieve_expands_its_refunds(wire: responses.RequestsMock) -> None:
    wire.get(
        f"{API}/v1/charges/ch_1",
        json={
            "id": "ch_1",
            "object": "charge",
            "amount": 2500,
            "amount_refunded": 1000,
            "refunded": False,
            "currency": "usd",
            "customer": "cus_1",
            "payment_intent": "pi_1",
            "disputed": False,
            "refunds": {
                "object": "list",
                "has_more": False,
                "data": [
                    {"id": "re_1", "object": "refund", "amount": 600, "status": "succeeded"},
                    {"id": "re_2", "object": "refund", "amount": 400, "status": "pending"},
                ],
            },
        },
    )

    charge = api().charge_retrieve("ch_1")

    assert (charge.id, charge.payment_intent_id, charge.customer_id) == ("ch_1", "pi_1", "cus_1")
    assert (charge.amount, charge.amount_refunded, charge.refunded) == (2500, 1000, False)
    assert [(r.id, r.amount, r.status) for r in charge.refunds] == [
        ("re_1", 600, "succeeded"),
        ("re_2", 400, "pending"),
    ]
    (call,) = wire.calls
    assert call.request.method == "GET"
    assert path(call) == "/v1/charges/ch_1"
    assert query(call) == {"expand[0]": "refunds"}
    assert_stripe_headers(call, idempotency_key=None)


def test_dispute_retrieve(wire: responses.RequestsMock) -> None:
    wire.get(
        f"{API}/v1/disputes/dp_1",
        json={
            "id": "dp_1",
            "object": "dispute",
            "amount": 2500,
            "currency": "usd",
            "charge": "ch_1",
            "payment_intent": "pi_1",
            "reason": "fraudulent",
            "status": "needs_response",
        },
    )

    dispute = api().dispute_retrieve("dp_1")

    assert (dispute.id, dispute.charge_id, dispute.amount, dispute.currency) == (
        "dp_1",
        "ch_1",
        2500,
        "usd",
    )
    assert (dispute.status, dispute.reason) == ("needs_response", "fraudulent")
    (call,) = wire.calls
    assert (call.request.method, path(call)) == ("GET", "/v1/disputes/dp_1")
    assert_stripe_headers(call, idempotency_key=None)


def test_charge_retrieve_of_an_unknown_charge_is_missing(wire: responses.RequestsMock) -> None:
    wire.get(
        f"{API}/v1/charges/ch_nope",
        status=404,
        json=error_json("invalid_request_error", "resource_missing", "No such charge: 'ch_nope'"),
    )

    with pytest.raises(StripeObjectMissing) as caught:
        api().charge_retrieve("ch_nope")

    assert "No such charge" in caught.value.message


def test_charge_retrieve_pages_through_more_than_the_expanded_refunds(
    wire: responses.RequestsMock,
) -> None:
    def refund(n: int) -> dict[str, Any]:
        return {"id": f"re_{n}", "object": "refund", "amount": 10, "status": "succeeded"}

    wire.get(
        f"{API}/v1/charges/ch_1",
        json={
            "id": "ch_1",
            "object": "charge",
            "amount": 2500,
            "amount_refunded": 120,
            "refunded": False,
            "currency": "usd",
            "customer": "cus_1",
            "payment_intent": "pi_1",
            "disputed": False,
            "refunds": {"object": "list", "has_more": True, "data": [refund(n) for n in range(10)]},
        },
    )
    wire.get(
        f"{API}/v1/refunds",
        json={
            "object": "list",
            "url": "/v1/refunds",
            "has_more": False,
            "data": [refund(n) for n in range(12)],
        },
    )

    charge = api().charge_retrieve("ch_1")

    assert [r.id for r in charge.refunds] == [f"re_{n}" for n in range(12)]
    listing = wire.calls[1]
    assert path(listing) == "/v1/refunds"
    assert query(listing) == {"charge": "ch_1", "limit": "100"}
