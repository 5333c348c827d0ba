"""Alerts that reach people: the five kinds emitted from their real code paths, once each;
email to the billing contacts; webhooks signed, delivered to a real HTTP server on loopback,
retried with backoff; SSRF refused at creation; the console's Webhooks page."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.core import mail
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from accounts.models import AuditLog, Organization
from accounts.permissions import Role
from accounts.principal import Principal
from billing.alerts import balance, delivery, signing, webhooks
from billing.budgets import BudgetSpec, budgets_evaluate, budgets_set
from billing.credits import credit_grant
from billing.invoicing import invoice_finalize, invoice_refresh_draft
from billing.models import AlertEvent, BillingAccount, WebhookDelivery, WebhookEndpoint
from billing.payments.stripe_sync import stripe_customer_ensure, stripe_invoice_push
from billing.periods import hour_start
from billing.wallet import billing_mode_set
from core.errors import InvalidInput
from tests.billing.factories import CHAT, at, price_book, staff_principal, usage
from tests.billing.stripe_support import deliver, last_event, make_invoice, use_fake_stripe
from tests.conftest import OrgWorld
from tests.support.webhook_receiver import Receiver, verify_as_documented, webhook_receiver

pytestmark = pytest.mark.django_db

Capture = Callable[..., Any]
# The receiver on loopback is reached through the webhook allow-lists, never the providers'.
LOOPBACK = override_settings(
    MANTLE_WEBHOOK_ALLOWED_HTTP=["127.0.0.1"], MANTLE_WEBHOOK_ALLOWED_PRIVATE=["127.0.0.1"]
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as found, LOOPBACK:
        yield found


def owner_of(world: OrgWorld) -> Principal:
    return Principal(user=world.users[Role.OWNER])


def add_endpoint(world: OrgWorld, url: str, *types: str) -> webhooks.CreatedEndpoint:
    return webhooks.endpoint_create(
        principal=owner_of(world), org=world.org, url=url, event_types=list(types)
    )


def spend_now(org: Organization, dollars: int) -> None:
    usage(org, hour_start(timezone.now()), input_tokens=dollars * 1_000_000)


# --- budgets: once per crossing, signed, emailed ------------------------------------------------


def test_a_budget_threshold_is_emailed_and_delivered_signed_once(
    world: OrgWorld, receiver: Receiver, django_capture_on_commit_callbacks: Capture
) -> None:
    price_book(CHAT, input_price="1", output_price="2")
    created = add_endpoint(world, receiver.url)
    with django_capture_on_commit_callbacks(execute=True):
        budgets_set(
            principal=owner_of(world),
            org=world.org,
            specs=[BudgetSpec(monthly_amount="10.00", alert_thresholds=[50])],
        )
    spend_now(world.org, 6)
    mail.outbox.clear()

    with django_capture_on_commit_callbacks(execute=True):
        budgets_evaluate(org=world.org)
    with django_capture_on_commit_callbacks(execute=True):
        budgets_evaluate(org=world.org)  # the same crossing again: nothing new

    event = AlertEvent.objects.get(organization=world.org)
    assert event.kind == "budget_threshold"
    assert WebhookDelivery.objects.filter(event=event).count() == 1
    [req] = receiver.requests
    assert req.path == "/hooks/mantle"
    assert req.headers["mantle-event-id"] == event.id
    assert req.headers["content-type"] == "application/json"
    assert verify_as_documented(created.secret, req.headers["mantle-signature"], req.body)
    assert signing.verify(created.secret, req.headers["mantle-signature"], req.body)
    assert not verify_as_documented("whsec_other", req.headers["mantle-signature"], req.body)
    assert not signing.verify(created.secret, req.headers["mantle-signature"], req.body + b" ")
    body = json.loads(req.body)
    assert body["id"] == event.id
    assert body["type"] == "budget_threshold"
    assert body["organization"] == world.org.id
    assert isinstance(body["created"], int)
    assert body["data"]["threshold"] == 50
    assert body["data"]["spend"] == "6.00"
    d = WebhookDelivery.objects.get(event=event)
    assert (d.status, d.attempts, d.response_code) == ("delivered", 1, 200)
    # One email to the owner and the billing member (no contacts set).
    [email] = mail.outbox
    assert "50% of the" in email.subject
    assert sorted(email.to) == sorted(
        [world.users[Role.OWNER].email, world.users[Role.BILLING].email]
    )
    # The sweep sends nothing again.
    with django_capture_on_commit_callbacks(execute=True):
        delivery.webhook_deliveries_due(now=timezone.now() + timedelta(days=1))
    assert len(receiver.requests) == 1
    assert len(mail.outbox) == 1


def test_billing_contacts_replace_the_default_recipients(
    world: OrgWorld, receiver: Receiver, django_capture_on_commit_callbacks: Capture
) -> None:
    price_book(CHAT)
    created = add_endpoint(world, receiver.url)
    webhooks.alert_settings_set(
        principal=owner_of(world),
        org=world.org,
        billing_emails=["AP@acme.example", " finance@acme.example "],
        low_balance_amount=None,
    )
    with django_capture_on_commit_callbacks(execute=True):
        budgets_set(
            principal=owner_of(world),
            org=world.org,
            specs=[BudgetSpec(monthly_amount="1.00", alert_thresholds=[100], hard_limit=True)],
        )
    spend_now(world.org, 2)
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        budgets_evaluate(org=world.org)

    kinds = sorted(AlertEvent.objects.filter(organization=world.org).values_list("kind", flat=True))
    assert kinds == ["budget_threshold", "hard_limit_hit"]
    assert len(mail.outbox) == 2
    assert all(m.to == ["ap@acme.example", "finance@acme.example"] for m in mail.outbox)
    assert any("hard limit is reached" in str(m.subject) for m in mail.outbox)
    # The hard-limit hit is also sent by webhook, signed, beside the threshold.
    assert sorted(json.loads(r.body)["type"] for r in receiver.requests) == kinds
    for req in receiver.requests:
        assert verify_as_documented(created.secret, req.headers["mantle-signature"], req.body)
    with pytest.raises(InvalidInput):
        webhooks.alert_settings_set(
            principal=owner_of(world),
            org=world.org,
            billing_emails=["nope"],
            low_balance_amount=None,
        )


# --- retries with backoff -------------------------------------------------------------------


def test_a_failing_endpoint_is_retried_with_backoff_then_delivered(
    world: OrgWorld, receiver: Receiver, django_capture_on_commit_callbacks: Capture
) -> None:
    created = add_endpoint(world, receiver.url)
    receiver.statuses = [500, 503]
    with django_capture_on_commit_callbacks(execute=True):
        event = webhooks.endpoint_test_send(principal=owner_of(world), endpoint=created.endpoint)
    d = WebhookDelivery.objects.get(event=event)
    assert (d.status, d.attempts, d.response_code, d.last_error) == ("pending", 1, 500, "HTTP 500")
    first_retry = d.next_attempt_at
    assert first_retry is not None

    # Not due yet: nothing is sent.
    assert delivery.webhook_deliver(d.pk, now=first_retry - timedelta(seconds=1)) is None
    assert len(receiver.requests) == 1
    assert delivery.webhook_deliver(d.pk, now=first_retry) == "pending"
    d.refresh_from_db()
    assert (d.attempts, d.response_code) == (2, 503)
    assert d.next_attempt_at == first_retry + timedelta(seconds=delivery.BACKOFF_S[1])
    assert delivery.webhook_deliver(d.pk, now=d.next_attempt_at) == "delivered"
    d.refresh_from_db()
    assert (d.status, d.attempts, d.response_code, d.next_attempt_at) == (
        "delivered",
        3,
        200,
        None,
    )
    assert len(receiver.requests) == 3
    # Every attempt carries the same event id and a valid signature.
    for req in receiver.requests:
        assert req.headers["mantle-event-id"] == event.id
        assert verify_as_documented(created.secret, req.headers["mantle-signature"], req.body)
    assert delivery.webhook_deliver(d.pk, now=timezone.now() + timedelta(days=9)) is None


def test_an_endpoint_that_never_answers_well_fails_after_the_last_attempt(
    world: OrgWorld, receiver: Receiver, django_capture_on_commit_callbacks: Capture
) -> None:
    created = add_endpoint(world, receiver.url)
    receiver.statuses = [500] * delivery.MAX_ATTEMPTS
    with django_capture_on_commit_callbacks(execute=True):
        event = webhooks.endpoint_test_send(principal=owner_of(world), endpoint=created.endpoint)
    d = WebhookDelivery.objects.get(event=event)
    delays = []
    while d.status == "pending":
        assert d.next_attempt_at is not None
        before = d.next_attempt_at
        delivery.webhook_deliver(d.pk, now=before)
        d.refresh_from_db()
        if d.next_attempt_at is not None:
            delays.append(int((d.next_attempt_at - before).total_seconds()))
    assert delays == list(delivery.BACKOFF_S[1:])
    assert (d.status, d.attempts) == ("failed", delivery.MAX_ATTEMPTS)
    assert len(receiver.requests) == delivery.MAX_ATTEMPTS


def test_a_refused_connection_is_recorded_and_retried(
    world: OrgWorld, django_capture_on_commit_callbacks: Capture
) -> None:
    with LOOPBACK:
        created = add_endpoint(world, "http://127.0.0.1:9/closed")  # the discard port: closed
        with django_capture_on_commit_callbacks(execute=True):
            event = webhooks.endpoint_test_send(
                principal=owner_of(world), endpoint=created.endpoint
            )
    d = WebhookDelivery.objects.get(event=event)
    assert (d.status, d.attempts, d.response_code) == ("pending", 1, None)
    assert "ConnectError" in d.last_error


# --- SSRF at creation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata"),
        ("https://127.0.0.1/hook", "127.0.0.1 is a loopback address"),
        ("http://127.0.0.1:8080/hook", "must use https"),
        ("https://10.0.0.5/hook", "10.0.0.5 is a private address"),
        ("https://[::1]/hook", "::1 is a loopback address"),
        ("https://2130706433/hook", "2130706433 means 127.0.0.1 (a loopback address)"),
        ("https://0177.0.0.1/hook", "0177.0.0.1 means 127.0.0.1 (a loopback address)"),
        ("https://localhost:8443/hook", "localhost resolves to"),
        ("http://hooks.example.com/plain-http", "the webhook URL must use https"),
        ("https://user:pw@hooks.example.com/", "must not contain a user name or password"),
        ("https://hooks.example.com:25/", "port 25 is not allowed: use 443 or a port from 1024"),
        ("https://hooks.example.com:0/", "port must be a number from 1 to 65535"),
        ("https://hooks.example.com:99999/", "port must be a number from 1 to 65535"),
        ("https://hooks.example.com/" + "a" * 2000, "longer than 2000 characters"),
        ("ftp://hooks.example.com/", "the webhook URL must use https"),
    ],
)
def test_a_webhook_url_to_a_private_address_or_without_https_is_refused(
    world: OrgWorld, url: str, named: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        add_endpoint(world, url)
    assert refused.value.param == "url"
    assert named in refused.value.message
    assert "provider" not in refused.value.message
    assert "user:pw" not in refused.value.message  # credentials are never echoed
    assert not WebhookEndpoint.objects.exists()


@override_settings(
    MANTLE_PROVIDER_ALLOWED_HTTP=["127.0.0.1", "localhost", "hooks.example.com"],
    MANTLE_PROVIDER_ALLOWED_PRIVATE=["127.0.0.0/8", "::1", "169.254.169.254", "localhost"],
)
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "https://127.0.0.1:8443/hook",
        "https://localhost:8443/hook",
        "https://[::1]:8443/hook",
        "https://169.254.169.254/latest/meta-data/",
        "http://hooks.example.com/hook",
    ],
)
def test_the_operators_provider_allow_lists_never_allow_a_webhook(
    world: OrgWorld, url: str
) -> None:
    """What the operator allows its own providers (an internal vLLM on loopback, plain
    http) is no webhook destination: only MANTLE_WEBHOOK_ALLOWED_* are read for webhooks."""
    with pytest.raises(InvalidInput) as refused:
        add_endpoint(world, url)
    assert refused.value.param == "url"
    assert not WebhookEndpoint.objects.exists()


def test_the_webhook_allow_lists_allow_a_listed_host_and_only_it(world: OrgWorld) -> None:
    with override_settings(
        MANTLE_WEBHOOK_ALLOWED_HTTP=["127.0.0.1:8080"], MANTLE_WEBHOOK_ALLOWED_PRIVATE=["127.0.0.1"]
    ):
        add_endpoint(world, "http://127.0.0.1:8080/hook")
        add_endpoint(world, "https://127.0.0.1:25/hook")  # a listed host: its ports too
        for url in ("http://127.0.0.1:8081/hook", "https://127.0.0.2/hook"):
            with pytest.raises(InvalidInput):
                add_endpoint(world, url)
    assert sorted(WebhookEndpoint.objects.values_list("url", flat=True)) == [
        "http://127.0.0.1:8080/hook",
        "https://127.0.0.1:25/hook",
    ]


def test_a_public_https_url_is_accepted_and_its_secret_stored_sealed(world: OrgWorld) -> None:
    created = add_endpoint(world, "https://hooks.example.com/mantle", "invoice_finalized")
    stored = WebhookEndpoint.objects.get()
    assert created.secret.startswith("whsec_")
    assert created.secret not in stored.secret_sealed
    assert stored.event_types == ["invoice_finalized"]
    with pytest.raises(InvalidInput):
        add_endpoint(world, "https://hooks.example.com/x", "everything")


# --- the five kinds from their real code paths ------------------------------------------------


def test_an_invoice_finalized_is_an_event(
    world: OrgWorld, receiver: Receiver, django_capture_on_commit_callbacks: Capture
) -> None:
    price_book(CHAT)
    add_endpoint(world, receiver.url, "invoice_finalized")
    usage(world.org, at(9, 3), input_tokens=3_000_000)
    draft = invoice_refresh_draft(org=world.org, month=at(9))
    assert draft is not None
    with django_capture_on_commit_callbacks(execute=True):
        invoice = invoice_finalize(principal=staff_principal(), invoice=draft)
    event = AlertEvent.objects.get(organization=world.org, kind="invoice_finalized")
    assert event.dedupe_key == f"invoice_finalized:{invoice.pk}"
    assert event.payload["number"] == invoice.number
    assert event.payload["total"] == str(invoice.total)
    [req] = receiver.requests
    assert json.loads(req.body)["data"]["number"] == invoice.number
    assert any(str(invoice.number) in str(m.subject) for m in mail.outbox)


def test_a_failed_payment_is_an_event_once(
    world: OrgWorld,
    receiver: Receiver,
    settings: Any,
    django_capture_on_commit_callbacks: Capture,
) -> None:
    add_endpoint(world, receiver.url, "payment_failed")
    fake = use_fake_stripe(settings)
    customer = stripe_customer_ensure(org=world.org)
    invoice = make_invoice(world.org)
    pushed = stripe_invoice_push(invoice_id=invoice.id)
    pm = fake.payment_method_attach(
        "pm_card_chargeDeclined", customer_id=customer.stripe_customer_id
    )
    fake.customer_set_default_payment_method(
        customer_id=customer.stripe_customer_id, payment_method_id=pm.id
    )
    fake.advance(3600)
    assert fake.attempt_payment(pushed.id) is False
    failed = last_event(fake, "invoice.payment_failed")
    with django_capture_on_commit_callbacks(execute=True):
        assert deliver(fake, failed).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        deliver(fake, failed)  # Stripe's redelivery

    [event] = AlertEvent.objects.filter(organization=world.org, kind="payment_failed")
    assert event.payload["stripe_invoice_id"] == pushed.id
    assert event.payload["number"] == invoice.number
    assert len(receiver.requests) == 1
    assert json.loads(receiver.requests[0].body)["type"] == "payment_failed"
    # And one email to the billing contacts (the owner and the billing member), not two.
    [email] = [m for m in mail.outbox if "a payment failed" in str(m.subject)]
    assert sorted(email.to) == sorted(
        [world.users[Role.OWNER].email, world.users[Role.BILLING].email]
    )


def test_a_low_prepaid_balance_is_an_event_once_per_crossing(
    world: OrgWorld, receiver: Receiver, django_capture_on_commit_callbacks: Capture
) -> None:
    price_book(CHAT)
    staff = staff_principal()
    add_endpoint(world, receiver.url, "low_balance")
    with django_capture_on_commit_callbacks(execute=True):
        billing_mode_set(
            principal=staff, org=world.org, mode=BillingAccount.Mode.PREPAID, reason="test"
        )
        credit_grant(
            principal=staff, org=world.org, kind="prepaid_purchase", amount="20", reason="top-up"
        )
    webhooks.alert_settings_set(
        principal=owner_of(world),
        org=world.org,
        billing_emails=[],
        low_balance_amount=Decimal("10"),
    )
    assert balance.low_balance_evaluate(world.org) is None  # 20 left
    spend_now(world.org, 15)
    with django_capture_on_commit_callbacks(execute=True):
        event = balance.low_balance_evaluate(world.org)
        again = balance.low_balance_evaluate(world.org)
    assert event is not None and again is None
    assert event.payload == {"balance": "5.00", "threshold": "10.00", "currency": "USD"}
    assert len(receiver.requests) == 1
    low = [m for m in mail.outbox if "prepaid balance is low" in str(m.subject)]
    assert len(low) == 1 and "5.00 USD" in str(low[0].subject)
    assert sorted(low[0].to) == sorted(
        [world.users[Role.OWNER].email, world.users[Role.BILLING].email]
    )

    # Topped up, then under again: a new crossing.
    with django_capture_on_commit_callbacks(execute=True):
        credit_grant(
            principal=staff, org=world.org, kind="prepaid_purchase", amount="10", reason="top-up"
        )
    assert balance.low_balance_evaluate(world.org) is None  # 15 left
    spend_now(world.org, 10)
    with django_capture_on_commit_callbacks(execute=True):
        assert balance.low_balance_evaluate(world.org) is not None
    assert AlertEvent.objects.filter(kind="low_balance").count() == 2
    assert len(receiver.requests) == 2
    assert len([m for m in mail.outbox if "prepaid balance is low" in str(m.subject)]) == 2


def test_events_go_only_to_subscribed_enabled_endpoints(
    world: OrgWorld, receiver: Receiver, django_capture_on_commit_callbacks: Capture
) -> None:
    price_book(CHAT)
    add_endpoint(world, receiver.url, "invoice_finalized")  # not budgets
    off = add_endpoint(world, receiver.url).endpoint
    webhooks.endpoint_set_enabled(principal=owner_of(world), endpoint=off, enabled=False)
    with django_capture_on_commit_callbacks(execute=True):
        budgets_set(
            principal=owner_of(world),
            org=world.org,
            specs=[BudgetSpec(monthly_amount="1.00", alert_thresholds=[50])],
        )
        spend_now(world.org, 1)
    with django_capture_on_commit_callbacks(execute=True):
        budgets_evaluate(org=world.org)
    assert AlertEvent.objects.filter(kind="budget_threshold").count() == 1
    assert not WebhookDelivery.objects.exists()
    assert receiver.requests == []


# --- the console ------------------------------------------------------------------------------


def test_the_console_webhooks_page(
    world: OrgWorld,
    other_world: OrgWorld,
    receiver: Receiver,
    django_capture_on_commit_callbacks: Capture,
) -> None:
    owner = world.client_for(Role.OWNER)
    url = reverse("console-webhooks", kwargs={"org_id": world.org.id})
    assert owner.get(url).status_code == 200

    refused = owner.post(url, {"url": "https://169.254.169.254/latest"})
    assert refused.status_code == 400
    assert b"metadata" in refused.content
    created = owner.post(url, {"url": receiver.url, "event_types": ["budget_threshold"]})
    assert created.status_code == 201
    assert created["Cache-Control"] == "no-store"
    endpoint = WebhookEndpoint.objects.get(organization=world.org)
    secret = created.context["secret"]
    assert secret.encode() in created.content
    assert secret.encode() not in owner.get(url).content  # shown once

    detail = reverse("console-webhook", kwargs={"org_id": world.org.id, "endpoint_id": endpoint.id})
    test_url = reverse(
        "console-webhook-test", kwargs={"org_id": world.org.id, "endpoint_id": endpoint.id}
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert owner.post(test_url).status_code == 302
    [req] = receiver.requests
    assert json.loads(req.body)["type"] == "test"
    assert verify_as_documented(secret, req.headers["mantle-signature"], req.body)
    page = owner.get(detail)
    assert page.status_code == 200
    assert b"delivered" in page.content
    assert b"test" in page.content

    # Billing members manage them too; developers and viewers do not.
    assert world.client_for(Role.BILLING).get(detail).status_code == 200
    assert world.client_for(Role.ADMIN).get(detail).status_code == 200
    assert world.client_for(Role.DEVELOPER).get(detail).status_code == 403

    # Another organization's member: 404 on the endpoint, its log and its actions.
    stranger = other_world.client_for(Role.OWNER)
    foreign = reverse(
        "console-webhook", kwargs={"org_id": other_world.org.id, "endpoint_id": endpoint.id}
    )
    assert stranger.get(detail).status_code == 404
    assert stranger.get(foreign).status_code == 404
    for action in ("console-webhook-toggle", "console-webhook-delete", "console-webhook-test"):
        path = reverse(action, kwargs={"org_id": other_world.org.id, "endpoint_id": endpoint.id})
        assert stranger.post(path).status_code == 404
    assert WebhookEndpoint.objects.filter(pk=endpoint.pk, enabled=True).exists()

    toggle = reverse(
        "console-webhook-toggle", kwargs={"org_id": world.org.id, "endpoint_id": endpoint.id}
    )
    assert owner.post(toggle).status_code == 302
    assert not WebhookEndpoint.objects.get(pk=endpoint.pk).enabled
    contacts = reverse("console-alert-settings", kwargs={"org_id": world.org.id})
    assert owner.post(contacts, {"billing_emails": "ap@acme.example"}).status_code == 302
    assert owner.post(contacts, {"billing_emails": "not-an-email"}).status_code == 400
    delete = reverse(
        "console-webhook-delete", kwargs={"org_id": world.org.id, "endpoint_id": endpoint.id}
    )
    assert owner.post(delete).status_code == 302
    assert not WebhookEndpoint.objects.filter(pk=endpoint.pk).exists()


def test_the_delivery_log_is_paged(
    world: OrgWorld,
    receiver: Receiver,
    django_capture_on_commit_callbacks: Capture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # More test sends than the hour's budget allows: this test is about the log's pages.
    monkeypatch.setattr(webhooks, "TEST_SENDS_PER_HOUR", webhooks.DELIVERIES_PER_PAGE + 2)
    endpoint = add_endpoint(world, receiver.url).endpoint
    with django_capture_on_commit_callbacks(execute=True):
        for _ in range(webhooks.DELIVERIES_PER_PAGE + 2):
            webhooks.endpoint_test_send(principal=owner_of(world), endpoint=endpoint)
    owner = world.client_for(Role.OWNER)
    detail = reverse("console-webhook", kwargs={"org_id": world.org.id, "endpoint_id": endpoint.id})
    first = owner.get(detail)
    second = owner.get(detail + "?page=2")
    assert len(first.context["deliveries"]) == webhooks.DELIVERIES_PER_PAGE
    assert len(second.context["deliveries"]) == 2
    assert b"Older" in first.content


def test_no_hard_limit_hit_where_nothing_is_capped(
    world: OrgWorld, django_capture_on_commit_callbacks: Capture
) -> None:
    price_book(CHAT)
    with django_capture_on_commit_callbacks(execute=True):
        billing_mode_set(
            principal=staff_principal(),
            org=world.org,
            mode=BillingAccount.Mode.UNLIMITED,
            reason="contract",
        )
        budgets_set(
            principal=owner_of(world),
            org=world.org,
            specs=[BudgetSpec(monthly_amount="1.00", alert_thresholds=[100], hard_limit=True)],
        )
    spend_now(world.org, 2)
    with django_capture_on_commit_callbacks(execute=True):
        budgets_evaluate(org=world.org)
    kinds = list(AlertEvent.objects.filter(organization=world.org).values_list("kind", flat=True))
    assert kinds == ["budget_threshold"]


def test_a_retry_hours_ahead_is_left_to_the_sweep(
    world: OrgWorld, receiver: Receiver, django_capture_on_commit_callbacks: Capture
) -> None:
    created = add_endpoint(world, receiver.url)
    receiver.statuses = [500, 500, 500]
    with django_capture_on_commit_callbacks(execute=True):
        event = webhooks.endpoint_test_send(principal=owner_of(world), endpoint=created.endpoint)
    d = WebhookDelivery.objects.get(event=event)
    for _ in range(2):
        assert d.next_attempt_at is not None
        delivery.webhook_deliver(d.pk, now=d.next_attempt_at)
        d.refresh_from_db()
    assert (d.attempts, d.status) == (3, "pending")
    assert d.next_attempt_at is not None
    # 30 minutes ahead: nothing queued now; the sweep runs it once it is due.
    with django_capture_on_commit_callbacks(execute=True):
        assert delivery.webhook_deliveries_due() == 0
    assert len(receiver.requests) == 3
    WebhookDelivery.objects.filter(pk=d.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert delivery.webhook_deliveries_due() == 1
    d.refresh_from_db()
    assert (d.status, d.attempts, d.response_code) == ("delivered", 4, 200)
    assert len(receiver.requests) == 4


def test_test_sends_have_a_budget_per_organization_and_hour(
    world: OrgWorld,
    other_world: OrgWorld,
    receiver: Receiver,
    django_capture_on_commit_callbacks: Capture,
) -> None:
    """Each test send is a delivery to the tenant's URL, attempted by the shared billing
    workers up to six times: a script clicking the button cannot queue them without end."""
    one = add_endpoint(world, receiver.url).endpoint
    two = add_endpoint(world, receiver.url).endpoint
    with django_capture_on_commit_callbacks(execute=True):
        for i in range(webhooks.TEST_SENDS_PER_HOUR):
            webhooks.endpoint_test_send(principal=owner_of(world), endpoint=(one, two)[i % 2])
    assert len(receiver.requests) == webhooks.TEST_SENDS_PER_HOUR

    # The next one, to either endpoint, is refused naming the budget, and nothing is written.
    for endpoint in (one, two):
        with pytest.raises(webhooks.TooManyTestSends) as refused:
            webhooks.endpoint_test_send(principal=owner_of(world), endpoint=endpoint)
        assert refused.value.status == 429
        assert f"at most {webhooks.TEST_SENDS_PER_HOUR} an hour" in refused.value.message
    assert AlertEvent.objects.filter(kind="test").count() == webhooks.TEST_SENDS_PER_HOUR
    assert AuditLog.objects.filter(action="billing.webhook_test_sent").count() == (
        webhooks.TEST_SENDS_PER_HOUR
    )
    # The console shows the refusal on the delivery log with its status.
    owner = world.client_for(Role.OWNER)
    test_url = reverse(
        "console-webhook-test", kwargs={"org_id": world.org.id, "endpoint_id": one.id}
    )
    page = owner.post(test_url)
    assert page.status_code == 429
    assert b"test events were sent in the last hour" in page.content
    assert b"Deliveries to" in page.content

    # Another organization has a budget of its own.
    theirs = add_endpoint(other_world, receiver.url).endpoint
    with django_capture_on_commit_callbacks(execute=True):
        webhooks.endpoint_test_send(principal=owner_of(other_world), endpoint=theirs)
    assert len(receiver.requests) == webhooks.TEST_SENDS_PER_HOUR + 1
    # An hour later the budget is whole again.
    AlertEvent.objects.filter(kind="test").update(created_at=timezone.now() - timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=True):
        webhooks.endpoint_test_send(principal=owner_of(world), endpoint=two)
    assert len(receiver.requests) == webhooks.TEST_SENDS_PER_HOUR + 2
