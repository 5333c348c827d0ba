"""Alert events, created once: `alert_emit` is called by the service that notices the thing
(budgets, invoicing, Stripe events, the balance check) inside its own transaction; the
event's fan-out (email, webhooks) is queued for after the commit, never run in the caller."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import Organization
from billing import jobs
from billing.models import AlertEvent

logger = logging.getLogger(__name__)

Kind = AlertEvent.Kind

# The kinds a customer subscribes an endpoint to (the test event goes to every endpoint).
SUBSCRIBABLE = (
    Kind.BUDGET_THRESHOLD,
    Kind.HARD_LIMIT_HIT,
    Kind.LOW_BALANCE,
    Kind.PAYMENT_FAILED,
    Kind.INVOICE_FINALIZED,
)


def alert_emit(
    *,
    org: Organization | str,
    kind: str,
    dedupe_key: str,
    data: Mapping[str, Any],
    now: datetime | None = None,
) -> AlertEvent | None:
    """The event for (organization, dedupe_key), created now if it is new: then its
    delivery is queued after commit and it is returned; None if it already existed.

    Safe under concurrency: the unique constraint decides, in a savepoint so the caller's
    transaction survives a race lost to another emitter."""
    org_id = org if isinstance(org, str) else org.id
    try:
        with transaction.atomic():
            event, created = AlertEvent.objects.get_or_create(
                organization_id=org_id,
                dedupe_key=dedupe_key[:200],
                defaults={
                    "kind": kind,
                    "payload": dict(data),
                    "created_at": now or timezone.now(),
                },
            )
    except IntegrityError:
        return None  # another emitter created it between the read and the insert
    if not created:
        return None
    logger.info("alert %s: %s for %s (%s)", event.id, kind, org_id, dedupe_key)
    jobs.queue_alert_dispatch(event.id)
    return event


def event_body(event: AlertEvent) -> dict[str, Any]:
    """The JSON body a webhook receives."""
    return {
        "id": event.id,
        "type": event.kind,
        "created": int(event.created_at.timestamp()),
        "organization": event.organization_id,
        "data": event.payload,
    }
