"""Stored responses of the Responses API: kept, read, deleted, and expired.

Plain synchronous ORM calls: the gateway runs them through `gateway.backends.database_read`
(an executor thread, a clean 503 when the database is down), the control worker's retention
task directly. Every read and delete is scoped to the caller's organization and to rows
not yet expired, so another organization's id, a deleted one and an expired one are the
same "not found".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from gateway.models import StoredResponse

logger = logging.getLogger(__name__)

DELETE_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored response as the gateway reads it back."""

    id: str
    model: str
    input_items: list[dict[str, Any]]
    output: list[dict[str, Any]]
    response: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Owner:
    organization_id: str
    project_id: str
    api_key_id: str


def retention() -> timedelta:
    return timedelta(days=settings.MANTLE_RESPONSES_RETENTION_DAYS)


def response_store(
    *,
    response_id: str,
    owner: Owner,
    model: str,
    input_items: Sequence[Mapping[str, Any]],
    output: Sequence[Mapping[str, Any]],
    response: Mapping[str, Any],
    created_at: datetime,
) -> None:
    StoredResponse.objects.create(
        id=response_id,
        organization_id=owner.organization_id,
        project_id=owner.project_id,
        api_key_id=owner.api_key_id,
        model=model,
        input_items_json=_dumps(input_items),
        output_json=_dumps(output),
        response_json=_dumps(response),
        created_at=created_at,
        expires_at=created_at + retention(),
    )


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def response_load(*, response_id: str, organization_id: str) -> Stored | None:
    """The organization's stored response `response_id`, None when there is none (never
    stored, another organization's, deleted or expired)."""
    row = (
        StoredResponse.objects.filter(
            id=response_id, organization_id=organization_id, expires_at__gt=timezone.now()
        )
        .only("id", "model", "input_items_json", "output_json", "response_json")
        .first()
    )
    if row is None:
        return None
    return Stored(
        id=row.id,
        model=row.model,
        input_items=json.loads(row.input_items_json),
        output=json.loads(row.output_json),
        response=json.loads(row.response_json),
    )


def response_delete(*, response_id: str, organization_id: str) -> bool:
    """Deletes the organization's stored response; False when there was none to delete."""
    deleted, _ = StoredResponse.objects.filter(
        id=response_id, organization_id=organization_id, expires_at__gt=timezone.now()
    ).delete()
    return deleted > 0


def responses_delete_expired(*, now: datetime | None = None) -> int:
    """Deletes every stored response past its retention, a batch at a time (short
    statements: the gateway writes the same table meanwhile); returns how many."""
    now = now or timezone.now()
    total = 0
    while True:
        ids = list(
            StoredResponse.objects.filter(expires_at__lte=now).values_list("id", flat=True)[
                :DELETE_BATCH
            ]
        )
        if not ids:
            break
        deleted, _ = StoredResponse.objects.filter(id__in=ids, expires_at__lte=now).delete()
        total += deleted
    if total:
        logger.info("deleted %s expired stored responses", total)
    return total
