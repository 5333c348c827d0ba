"""An event's fan-out, on the billing queue: one email to the billing contacts, one
delivery row per subscribed endpoint, each attempted with backoff until delivered.

Each step is idempotent: the email is claimed once per event (`emailed_at`), a delivery is
unique per (event, endpoint), and an attempt is claimed by moving `next_attempt_at` past a
lease, so a redelivered task or the beat sweep never sends a second request meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta

import httpx
from django.conf import settings
from django.core.mail import send_mail
from django.db.models import Q
from django.utils import timezone

from accounts.models import Membership, Organization
from accounts.permissions import Role
from billing import jobs
from billing.alerts import signing
from billing.alerts.events import Kind, event_body
from billing.models import AlertEvent, AlertSettings, WebhookDelivery, WebhookEndpoint
from core import outbound, secretbox

logger = logging.getLogger(__name__)

Status = WebhookDelivery.Status

# Seconds before attempt 2, 3, ...: 1 min, 5 min, 30 min, 2 h, 12 h; then it has failed.
BACKOFF_S = (60, 300, 1800, 7200, 43200)
MAX_ATTEMPTS = len(BACKOFF_S) + 1
# An attempt in progress holds its delivery this long (longer than connect + read).
LEASE_S = 120
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
# The whole attempt (resolution, connection, the answer's status line and headers): a
# receiver that sends its headers a byte at a time cannot hold a billing worker longer.
ATTEMPT_TIMEOUT_S = 15.0
ERROR_CHARS = 500
# Retries at most this far ahead are queued with a countdown; the sweep runs later ones.
QUEUED_RETRY_MAX_S = 300


# --- the fan-out ----------------------------------------------------------------------------


def alert_dispatch(event_id: str) -> int:
    """Emails the event (once) and creates and queues its deliveries; returns how many
    deliveries were created now."""
    event = AlertEvent.objects.select_related("organization").filter(id=event_id).first()
    if event is None:
        return 0
    created = 0
    for endpoint in _subscribed(event):
        delivery, was_created = WebhookDelivery.objects.get_or_create(
            event=event,
            endpoint=endpoint,
            defaults={"organization_id": event.organization_id, "next_attempt_at": timezone.now()},
        )
        if was_created:
            created += 1
            jobs.queue_webhook_deliver(str(delivery.pk))
    if event.kind != Kind.TEST:
        alert_email(event)
    return created


def _subscribed(event: AlertEvent) -> list[WebhookEndpoint]:
    endpoints = WebhookEndpoint.objects.filter(organization_id=event.organization_id, enabled=True)
    if event.kind == Kind.TEST:
        return list(endpoints.filter(id=event.payload.get("endpoint", "")))
    return [e for e in endpoints.order_by("id") if not e.event_types or event.kind in e.event_types]


# --- email ----------------------------------------------------------------------------------


def billing_contacts(org: Organization) -> list[str]:
    """The organization's billing emails; none set: its owners' and billing members'."""
    found = AlertSettings.objects.filter(organization=org).first()
    if found is not None and found.billing_emails:
        return list(found.billing_emails)
    return sorted(
        set(
            Membership.objects.filter(
                organization=org, role__in=[Role.OWNER.value, Role.BILLING.value]
            ).values_list("user__email", flat=True)
        )
    )


SUBJECTS = {
    Kind.BUDGET_THRESHOLD: "{org}: {threshold}% of the {month} budget reached",
    Kind.HARD_LIMIT_HIT: "{org}: the {month} budget's hard limit is reached; requests are refused",
    Kind.LOW_BALANCE: "{org}: prepaid balance is low ({balance} {currency})",
    Kind.PAYMENT_FAILED: "{org}: a payment failed",
    Kind.INVOICE_FINALIZED: "{org}: invoice {number} is ready",
}


def alert_email(event: AlertEvent) -> bool:
    """Sends the event's email to the billing contacts, once (claimed before sending; a
    failed send gives the claim back so the sweep tries again)."""
    now = timezone.now()
    if not AlertEvent.objects.filter(id=event.id, emailed_at__isnull=True).update(emailed_at=now):
        return False
    recipients = billing_contacts(event.organization)
    if not recipients:
        return False
    values = {"org": event.organization.name, **{k: v for k, v in event.payload.items()}}
    try:
        subject = SUBJECTS[Kind(event.kind)].format_map(_Blank(values))
    except KeyError:
        subject = f"{event.organization.name}: {event.kind}"
    lines = [f"{k.replace('_', ' ')}: {v}" for k, v in sorted(event.payload.items())]
    billing_url = f"{settings.PUBLIC_BASE_URL}/console/o/{event.organization_id}/billing/"
    try:
        send_mail(
            subject=subject[:200],
            message=(
                f"{subject}.\n\n"
                + "\n".join(lines)
                + f"\n\nEvent {event.id} ({event.kind}).\nBilling: {billing_url}\n"
            ),
            from_email=None,
            recipient_list=recipients,
        )
    except Exception:
        AlertEvent.objects.filter(id=event.id).update(emailed_at=None)
        raise
    return True


class _Blank(dict[str, object]):
    def __missing__(self, key: str) -> str:
        return "?"


# --- one attempt ----------------------------------------------------------------------------


def webhook_deliver(delivery_id: int | str, *, now: datetime | None = None) -> str | None:
    """One attempt of a due delivery; returns its status after, or None when it was not
    due (delivered, failed, not yet time, or another worker's attempt in progress)."""
    now = now or timezone.now()
    claimed = WebhookDelivery.objects.filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now),
        pk=delivery_id,
        status=Status.PENDING,
    ).update(next_attempt_at=now + timedelta(seconds=LEASE_S))
    if not claimed:
        return None
    delivery = WebhookDelivery.objects.select_related("event", "endpoint").get(pk=delivery_id)
    endpoint = delivery.endpoint
    if not endpoint.enabled:
        _record(delivery, now, code=None, error="the endpoint is disabled", final=True)
        return delivery.status
    body = json.dumps(event_body(delivery.event), separators=(",", ":")).encode()
    headers = {
        "content-type": "application/json",
        signing.SIGNATURE_HEADER: signing.signature_header(
            secretbox.unseal(endpoint.secret_sealed), body
        ),  # signed at the moment of sending (the clock receivers check against)
        signing.EVENT_ID_HEADER: delivery.event_id,
    }
    code: int | None = None
    error = ""
    try:
        code = asyncio.run(_post(endpoint.url, headers, body, str(endpoint.organization_id)))
    except outbound.DestinationRefused as exc:
        error = f"refused: {exc}"
    except TimeoutError:
        error = f"no answer within {ATTEMPT_TIMEOUT_S:g} s"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if code is not None and 200 <= code < 300:
        _record(delivery, now, code=code, error="", delivered=True)
    elif code is not None and 300 <= code < 400:
        # Never followed: a redirect could lead anywhere the endpoint's URL was not checked.
        error = f"HTTP {code}: redirects are not followed; the endpoint must answer 2xx itself"
        _record(delivery, now, code=code, error=error)
    else:
        _record(delivery, now, code=code, error=error or f"HTTP {code}")
        if delivery.status == Status.PENDING and delivery.next_attempt_at is not None:
            delay_s = (delivery.next_attempt_at - now).total_seconds()
            # Short waits ride on the broker's countdown; longer ones are left to the
            # minute's sweep (an ETA past the broker's visibility timeout is redelivered).
            if delay_s <= QUEUED_RETRY_MAX_S:
                jobs.queue_webhook_retry(str(delivery.pk), delay_s)
    return delivery.status


async def _post(url: str, headers: dict[str, str], body: bytes, owner: str = "") -> int:
    """The POST under the webhook policy (the URL and every address it resolves to checked
    again now, the checked address pinned, no redirect followed), within
    ATTEMPT_TIMEOUT_S; only the status is read, never the body. `owner`: the organization
    whose endpoint it is (its name lookups are bounded: outbound.DNS_PER_OWNER)."""
    try:
        async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
            response = await outbound.send(
                "POST",
                url,
                headers=headers,
                content=body,
                connect_timeout_s=CONNECT_TIMEOUT_S,
                read_timeout_s=READ_TIMEOUT_S,
                policy=outbound.WEBHOOK,
                owner=owner,
            )
            await response.aclose()  # only the status matters; the body is never read
            return response.status_code
    finally:
        await outbound.aclose()


def _record(
    delivery: WebhookDelivery,
    now: datetime,
    *,
    code: int | None,
    error: str,
    delivered: bool = False,
    final: bool = False,
) -> None:
    delivery.attempts += 1
    delivery.response_code = code
    delivery.last_error = error[:ERROR_CHARS]
    if delivered:
        delivery.status = Status.DELIVERED
        delivery.delivered_at = now
        delivery.next_attempt_at = None
    elif final or delivery.attempts >= MAX_ATTEMPTS:
        delivery.status = Status.FAILED
        delivery.next_attempt_at = None
    else:
        delivery.next_attempt_at = now + timedelta(seconds=BACKOFF_S[delivery.attempts - 1])
    delivery.save(
        update_fields=[
            "attempts",
            "response_code",
            "last_error",
            "status",
            "delivered_at",
            "next_attempt_at",
        ]
    )
    if not delivered:
        logger.info(
            "webhook delivery %s (%s) attempt %d: %s",
            delivery.pk,
            delivery.event_id,
            delivery.attempts,
            delivery.last_error,
        )


def webhook_deliveries_due(*, now: datetime | None = None, limit: int = 500) -> int:
    """The beat's sweep: attempts whose queued message was lost (a worker restart) run
    here; an attempt still leased or queued for later is not due and is skipped."""
    now = now or timezone.now()
    ids = list(
        WebhookDelivery.objects.filter(status=Status.PENDING, next_attempt_at__lte=now)
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:limit]
    )
    for pk in ids:
        jobs.queue_webhook_deliver(str(pk))
    unsent = AlertEvent.objects.filter(
        emailed_at__isnull=True,
        created_at__lte=now - timedelta(minutes=10),
        created_at__gte=now - timedelta(days=1),
    ).exclude(kind=Kind.TEST)
    for event_id in unsent.values_list("id", flat=True)[:limit]:
        jobs.queue_alert_dispatch(event_id)
    return len(ids)
