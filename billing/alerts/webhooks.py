"""The organization's webhook endpoints (secret shown once, stored sealed), their delivery
log, and the test send. Tenant-scoped: another organization's endpoint is NotFound."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import httpx
from django.core.exceptions import ValidationError
from django.core.paginator import Page, Paginator
from django.core.validators import validate_email
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from billing.alerts import signing
from billing.alerts.events import SUBSCRIBABLE, Kind, alert_emit
from billing.models import AlertEvent, AlertSettings, WebhookDelivery, WebhookEndpoint
from billing.money import MAX_AMOUNT
from core import outbound, secretbox
from core.errors import DomainError, InvalidInput, NotFound

MAX_ENDPOINTS = 10
# Test events an organization may send in an hour: each is a delivery to a URL of the
# tenant's choosing, attempted up to 6 times for up to 15 s each by the billing workers
# that every organization shares, so the button's clicks get a budget.
TEST_SENDS_PER_HOUR = 10
DELIVERIES_PER_PAGE = 25
# How long saving an endpoint waits for its name to resolve (checked again at each delivery).
RESOLVE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class CreatedEndpoint:
    endpoint: WebhookEndpoint
    secret: str  # the only time it is shown


def endpoints_of(org: Organization) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.filter(organization=org).order_by("created_at", "id")


def endpoint_get(org: Organization, endpoint_id: str) -> WebhookEndpoint:
    found = WebhookEndpoint.objects.filter(organization=org, id=endpoint_id).first()
    if found is None:
        raise NotFound(f"webhook endpoint {endpoint_id!r} not found", param="endpoint_id")
    return found


def deliveries_page(endpoint: WebhookEndpoint, page: int | str | None = 1) -> Page[WebhookDelivery]:
    """The endpoint's delivery log, newest first, DELIVERIES_PER_PAGE a page."""
    rows = (
        WebhookDelivery.objects.filter(endpoint=endpoint)
        .select_related("event")
        .order_by("-created_at", "-id")
    )
    return Paginator(rows, DELIVERIES_PER_PAGE).get_page(page)


def check_webhook_url(url: str) -> str:
    """`url` stripped, if the webhook policy allows it (core/outbound.py's WEBHOOK, never the
    providers' allow-lists): https, a valid host, no credentials or fragment, port 443 or
    1024-65535, an IP literal that is public, and a name that does not resolve now to an
    address that is not public. A name that does not resolve yet is accepted: every
    delivery resolves and checks it again. Raises InvalidInput naming `url`."""
    url = (url or "").strip()
    try:
        outbound.check_url(url, policy=outbound.WEBHOOK)
        asyncio.run(outbound.resolve(url, timeout_s=RESOLVE_TIMEOUT_S, policy=outbound.WEBHOOK))
    except outbound.DestinationRefused as exc:
        raise InvalidInput(str(exc), param="url") from None
    except httpx.HTTPError:
        pass  # no answer from DNS now; each delivery checks the name it resolves to
    return url


def check_event_types(event_types: Sequence[str]) -> list[str]:
    chosen = sorted(set(event_types))
    unknown = [t for t in chosen if t not in SUBSCRIBABLE]
    if unknown:
        raise InvalidInput(
            f"unknown event type {unknown[0]!r}; one of {', '.join(SUBSCRIBABLE)}",
            param="event_types",
        )
    return chosen


def endpoint_create(
    *,
    principal: Principal,
    org: Organization,
    url: str,
    event_types: Sequence[str] = (),
    description: str = "",
) -> CreatedEndpoint:
    """A new endpoint (its URL checked by `check_webhook_url`: https, public addresses unless
    the operator's webhook allow-list names the host) and its signing secret, returned this
    once."""
    url = check_webhook_url(url)
    types = check_event_types(event_types)
    secret = signing.new_secret()
    with transaction.atomic():
        Organization.objects.select_for_update().filter(pk=org.pk).first()
        if endpoints_of(org).count() >= MAX_ENDPOINTS:
            raise InvalidInput(f"at most {MAX_ENDPOINTS} webhook endpoints", param="url")
        endpoint = WebhookEndpoint.objects.create(
            organization=org,
            url=url,
            description=description.strip()[:200],
            event_types=types,
            secret_sealed=secretbox.seal(secret),
            secret_hint=secret[-4:],
            created_by=principal.user,
        )
        audit_record(
            principal=principal,
            action="billing.webhook_created",
            target=endpoint,
            organization=org,
            metadata={"url": url, "event_types": types},
        )
    return CreatedEndpoint(endpoint, secret)


def endpoint_set_enabled(
    *, principal: Principal, endpoint: WebhookEndpoint, enabled: bool
) -> WebhookEndpoint:
    with transaction.atomic():
        endpoint.enabled = enabled
        endpoint.save(update_fields=["enabled"])
        audit_record(
            principal=principal,
            action="billing.webhook_enabled" if enabled else "billing.webhook_disabled",
            target=endpoint,
            organization=endpoint.organization,
        )
    return endpoint


def endpoint_delete(*, principal: Principal, endpoint: WebhookEndpoint) -> None:
    with transaction.atomic():
        audit_record(
            principal=principal,
            action="billing.webhook_deleted",
            target=endpoint,
            organization=endpoint.organization,
            metadata={"url": endpoint.url},
        )
        endpoint.delete()


class TooManyTestSends(DomainError):
    """The organization sent TEST_SENDS_PER_HOUR test events within the last hour."""

    status = 429
    code = "rate_limit_exceeded"


def endpoint_test_send(*, principal: Principal, endpoint: WebhookEndpoint) -> AlertEvent:
    """Queues a `test` event to this endpoint alone (no email), delivered like any other.

    At most TEST_SENDS_PER_HOUR per organization in any hour (TooManyTestSends, 429),
    counted under the organization's row lock so racing clicks stay within it."""
    now = timezone.now()
    with transaction.atomic():
        Organization.objects.select_for_update().filter(pk=endpoint.organization_id).first()
        sent = AlertEvent.objects.filter(
            organization_id=endpoint.organization_id,
            kind=Kind.TEST,
            created_at__gt=now - timedelta(hours=1),
        ).count()
        if sent >= TEST_SENDS_PER_HOUR:
            raise TooManyTestSends(
                f"{sent} test events were sent in the last hour (at most "
                f"{TEST_SENDS_PER_HOUR} an hour for the organization): wait before sending "
                "another; real events are not affected"
            )
        event = alert_emit(
            org=endpoint.organization_id,
            kind=Kind.TEST,
            dedupe_key=f"test:{endpoint.id}:{now.timestamp():.6f}",
            data={"endpoint": endpoint.id, "message": "A test event sent from the console."},
            now=now,
        )
        assert event is not None  # a fresh key
        audit_record(
            principal=principal,
            action="billing.webhook_test_sent",
            target=endpoint,
            organization=endpoint.organization,
            metadata={"event_id": event.id},
        )
    return event


# --- who is told by email -------------------------------------------------------------------

MAX_BILLING_EMAILS = 10


def alert_settings_set(
    *,
    principal: Principal,
    org: Organization,
    billing_emails: Sequence[str],
    low_balance_amount: Decimal | None,
) -> AlertSettings:
    """The billing contacts (empty: the owners and billing members) and the low-balance
    amount (None: the platform's default)."""
    emails = sorted({e.strip().lower() for e in billing_emails if e.strip()})
    if len(emails) > MAX_BILLING_EMAILS:
        raise InvalidInput(f"at most {MAX_BILLING_EMAILS} billing emails", param="billing_emails")
    for email in emails:
        try:
            validate_email(email)
        except ValidationError:
            raise InvalidInput(
                f"{email[:80]!r} is not an email address", param="billing_emails"
            ) from None
    if low_balance_amount is not None and not Decimal(0) <= low_balance_amount <= MAX_AMOUNT:
        raise InvalidInput(
            f"low_balance_amount must be in [0, {MAX_AMOUNT}]", param="low_balance_amount"
        )
    with transaction.atomic():
        found, _ = AlertSettings.objects.update_or_create(
            organization=org,
            defaults={"billing_emails": emails, "low_balance_amount": low_balance_amount},
        )
        audit_record(
            principal=principal,
            action="billing.alert_settings_set",
            target=org,
            organization=org,
            metadata={
                "billing_emails": emails,
                "low_balance_amount": None
                if low_balance_amount is None
                else str(low_balance_amount),
            },
        )
    return found


def alert_settings(org: Organization) -> AlertSettings:
    return AlertSettings.objects.filter(organization=org).first() or AlertSettings(organization=org)
