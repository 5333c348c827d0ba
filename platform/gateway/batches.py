"""Batches of the Batch API: created, read, listed and cancelled (the rows), and their
OpenAI shapes. Running them is gateway/batch_runner.py's.

Plain synchronous ORM calls, like gateway/responses_store.py: the gateway runs them through
`gateway.backends.database_read`. Every read is scoped to the caller's organization, so
another organization's batch id is the same 404 as a missing one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.models import Organization
from core.ids import new_id
from gateway.errors import OpenAIError, invalid
from gateway.files import get_file
from gateway.models import Batch
from gateway.protocol_batches import (
    ERRORS_LISTED,
    BatchCreateRequest,
    BatchError,
    BatchList,
    BatchRequestCounts,
)
from gateway.protocol_batches import Batch as BatchObject

COMPLETION_WINDOW = timedelta(hours=24)


class Status:
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


ACTIVE = (Status.VALIDATING, Status.IN_PROGRESS, Status.FINALIZING, Status.CANCELLING)
"""Statuses a runner still has work for."""
QUEUED = (Status.VALIDATING, Status.IN_PROGRESS)
"""Statuses whose enqueued tokens count against the organization's batch queue limit."""


@dataclass(frozen=True, slots=True)
class Creator:
    organization_id: str
    project_id: str
    api_key_id: str


def not_found(batch_id: str) -> OpenAIError:
    return OpenAIError(404, f"No batch found with id '{batch_id}'.", code="not_found")


def batch_create(creator: Creator, body: BatchCreateRequest) -> Batch:
    """A new batch in `validating`; a runner validates its input file and runs it."""
    found = get_file(creator.organization_id, body.input_file_id)
    if found is None:
        raise OpenAIError(
            404,
            f"No such File object: {body.input_file_id}",
            param="input_file_id",
            code="not_found",
        )
    if found.purpose != "batch":
        raise invalid(
            f"The input file {found.id} was uploaded with purpose '{found.purpose}'; a batch "
            "reads a file uploaded with purpose 'batch'.",
            "input_file_id",
        )
    output_expiry = body.output_expires_after.seconds if body.output_expires_after else 0
    metadata: dict[str, Any] = {"user": body.metadata}
    if output_expiry:
        metadata["output_expires_after_s"] = output_expiry
    with transaction.atomic():
        # The organization's row serialises its creations: two cannot both take the last place.
        Organization.objects.select_for_update().filter(id=creator.organization_id).first()
        return _create(creator, body, found.id, metadata)


def _create(creator: Creator, body: BatchCreateRequest, file_id: str, metadata: Any) -> Batch:
    limit = settings.MANTLE_BATCH_ORG_ACTIVE
    active = Batch.objects.filter(organization_id=creator.organization_id, status__in=ACTIVE)
    if active.count() >= limit:
        raise OpenAIError(
            429,
            f"The organization has {limit} batches not yet ended, the most it may "
            "(MANTLE_BATCH_ORG_ACTIVE); wait for some to finish or cancel them.",
            code="batch_limit_reached",
        )
    now = timezone.now()
    return Batch.objects.create(
        id=new_id("batch_", 24),
        organization_id=creator.organization_id,
        project_id=creator.project_id,
        api_key_id=creator.api_key_id,
        endpoint=body.endpoint,
        input_file_id=file_id,
        completion_window=body.completion_window,
        status=Status.VALIDATING,
        metadata_json=json.dumps(metadata),
        created_at=now,
        expires_at=now + COMPLETION_WINDOW,
    )


def batch_get(organization_id: str, batch_id: str) -> Batch:
    found = Batch.objects.filter(organization_id=organization_id, id=batch_id).first()
    if found is None:
        raise not_found(batch_id)
    return found


def batch_list(organization_id: str, *, after: str | None, limit: int) -> BatchList:
    """The organization's batches, newest first, `limit` at a time after the id `after`."""
    rows = Batch.objects.filter(organization_id=organization_id).order_by("-created_at", "-id")
    if after:
        anchor = Batch.objects.filter(organization_id=organization_id, id=after).first()
        if anchor is None:
            raise invalid(f"No batch found with id '{after}'.", "after")
        rows = rows.filter(created_at__lte=anchor.created_at).exclude(
            created_at=anchor.created_at, id__gte=anchor.id
        )
    page = list(rows[: limit + 1])
    data = [batch_object(b) for b in page[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(page) > limit,
    }


def batch_cancel(organization_id: str, batch_id: str) -> Batch:
    """Stops a batch: no new line starts, finished lines are kept (and billed), and the
    runner then writes the rest to the error file as cancelled."""
    with transaction.atomic():
        found = (
            Batch.objects.select_for_update()
            .filter(organization_id=organization_id, id=batch_id)
            .first()
        )
        if found is None:
            raise not_found(batch_id)
        if found.status in (Status.CANCELLING, Status.CANCELLED):
            return found
        if found.status not in (Status.VALIDATING, Status.IN_PROGRESS):
            raise OpenAIError(
                409,
                f"Cannot cancel a batch with status '{found.status}'.",
                code="batch_not_cancellable",
            )
        found.status = Status.CANCELLING
        found.cancelling_at = timezone.now()
        found.save(update_fields=["status", "cancelling_at"])
    return found


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def user_metadata(batch: Batch) -> dict[str, str] | None:
    stored = json.loads(batch.metadata_json or "null") or {}
    user: dict[str, str] | None = stored.get("user")
    return user


def output_expiry(batch: Batch) -> timedelta | None:
    """How long after creation the batch's output and error files are kept (None: the
    file store's default)."""
    stored = json.loads(batch.metadata_json or "null") or {}
    seconds = int(stored.get("output_expires_after_s") or 0)
    return timedelta(seconds=seconds) if seconds else None


def line_errors(batch: Batch) -> list[BatchError]:
    return list(json.loads(batch.errors_json or "null") or [])


def batch_object(batch: Batch) -> BatchObject:
    errors = line_errors(batch)
    counts: BatchRequestCounts = {
        "total": batch.request_total,
        "completed": batch.request_completed,
        "failed": batch.request_failed,
    }
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": errors[:ERRORS_LISTED]} if errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id or None,
        "error_file_id": batch.error_file_id or None,
        "created_at": int(batch.created_at.timestamp()),
        "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at),
        "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at),
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": counts,
        "metadata": user_metadata(batch),
    }
