"""Reading an organization's audit log: filters, cursor paging and the CSV export.

One query for the management API (`GET .../audit-log`, `.../audit-log.csv`) and the
console's audit page: the same parameters mean the same rows in both. Entries come newest
first, ordered by (created_at, id) descending; a page's cursor is the last entry's
(created_at, id), so paging is a keyset walk: an entry written while someone pages lands
before their first page and never shifts one into the next, and each entry is read once.
A cursor is bound to its filters (a fingerprint of them), so it cannot be replayed under
other filters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db.models import Q, QuerySet
from django.http import StreamingHttpResponse
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from accounts.models import AuditLog, Organization
from core.csv_export import csv_writer
from core.errors import InvalidInput

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
TEXT_FILTERS = ("actor", "action", "target_type", "target_id")
CSV_COLUMNS = (
    "created_at",
    "id",
    "actor",
    "action",
    "target_type",
    "target_id",
    "ip_address",
    "metadata",
)
# Each text filter is a whole value of its column (no patterns), at most this long.
_MAX_FILTER_LENGTH = 200


@dataclass(frozen=True)
class AuditQuery:
    actor: str | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    limit: int = DEFAULT_PAGE_SIZE
    after: tuple[datetime, int] | None = None  # the cursor: the previous page's last entry

    def fingerprint(self) -> str:
        shape = [
            self.actor,
            self.action,
            self.target_type,
            self.target_id,
            self.since.isoformat() if self.since else None,
            self.until.isoformat() if self.until else None,
        ]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]

    def params(self) -> dict[str, str]:
        """The filters as query parameters (no cursor, no limit): for links."""
        out = {name: getattr(self, name) for name in TEXT_FILTERS if getattr(self, name)}
        if self.since is not None:
            out["since"] = self.since.isoformat()
        if self.until is not None:
            out["until"] = self.until.isoformat()
        return out


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditLog]
    next_cursor: str | None


def _text(params: Mapping[str, str], name: str) -> str | None:
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip()
    if len(value) > _MAX_FILTER_LENGTH or not value.isprintable():
        raise InvalidInput(
            f"{name} must be printable text of at most {_MAX_FILTER_LENGTH} characters",
            param=name,
        )
    return value


def _time(params: Mapping[str, str], name: str) -> datetime | None:
    """ISO 8601 (`2026-01-01T00:00:00Z`; a date alone is its midnight; no offset: UTC) or
    Unix seconds."""
    raw = (params.get(name) or "").strip()
    if not raw:
        return None
    bad = InvalidInput(
        f"{name} must be a time in ISO 8601 (2026-01-01T00:00:00Z) or Unix seconds", param=name
    )
    try:
        if raw.isdigit():
            return datetime.fromtimestamp(int(raw), tz=UTC)
        parsed = parse_datetime(raw) or (
            parse_datetime(f"{raw}T00:00:00") if len(raw) == 10 else None
        )
    except (ValueError, OverflowError, OSError):
        raise bad from None
    if parsed is None:
        raise bad
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _limit(params: Mapping[str, str]) -> int:
    raw = (params.get("limit") or "").strip()
    if not raw:
        return DEFAULT_PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise InvalidInput(f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}", param="limit")
    return int(raw)


def parse_query(params: Mapping[str, str]) -> AuditQuery:
    """The query of `params` (the API's and the console page's parameters alike):
    actor, action, target_type, target_id, since, until, limit, cursor. Bad input is
    InvalidInput naming its parameter."""
    query = AuditQuery(
        actor=_text(params, "actor"),
        action=_text(params, "action"),
        target_type=_text(params, "target_type"),
        target_id=_text(params, "target_id"),
        since=_time(params, "since"),
        until=_time(params, "until"),
        limit=_limit(params),
    )
    if query.since and query.until and query.since >= query.until:
        raise InvalidInput("since must be before until", param="since")
    cursor = (params.get("cursor") or "").strip()
    if not cursor:
        return query
    return AuditQuery(**{**query.__dict__, "after": _read_cursor(cursor, query)})


def _cursor(query: AuditQuery, entry: AuditLog) -> str:
    body = {"t": entry.created_at.isoformat(), "i": entry.id, "q": query.fingerprint()}
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def _read_cursor(cursor: str, query: AuditQuery) -> tuple[datetime, int]:
    bad = InvalidInput("cursor is not one this query returned (next_cursor)", param="cursor")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        at = datetime.fromisoformat(str(body["t"]))
        entry_id = int(body["i"])
        fingerprint = str(body["q"])
    except (ValueError, TypeError, KeyError, UnicodeError, binascii.Error):
        raise bad from None
    if at.tzinfo is None:
        raise bad
    if fingerprint != query.fingerprint():
        raise InvalidInput(
            "cursor belongs to other filters: keep actor, action, target_type, target_id, "
            "since and until as they were when next_cursor was returned",
            param="cursor",
        )
    return at, entry_id


def _rows(org: Organization, query: AuditQuery) -> QuerySet[AuditLog]:
    rows = AuditLog.objects.filter(organization=org)
    if query.actor is not None:
        rows = rows.filter(actor_label__iexact=query.actor)
    if query.action is not None:
        rows = rows.filter(action=query.action)
    if query.target_type is not None:
        rows = rows.filter(target_type=query.target_type)
    if query.target_id is not None:
        rows = rows.filter(target_id=query.target_id)
    if query.since is not None:
        rows = rows.filter(created_at__gte=query.since)
    if query.until is not None:
        rows = rows.filter(created_at__lt=query.until)
    return rows.order_by("-created_at", "-id")


def audit_page(org: Organization, query: AuditQuery) -> AuditPage:
    """One page of the organization's entries that match, newest first."""
    rows = _rows(org, query)
    if query.after is not None:
        at, entry_id = query.after
        rows = rows.filter(Q(created_at__lt=at) | Q(created_at=at, id__lt=entry_id))
    found = list(rows[: query.limit + 1])
    entries = found[: query.limit]
    more = len(found) > query.limit
    return AuditPage(entries, _cursor(query, entries[-1]) if more else None)


def csv_row(entry: AuditLog) -> list[object]:
    return [
        entry.created_at.isoformat(),
        entry.id,
        entry.actor_label,
        entry.action,
        entry.target_type,
        entry.target_id,
        entry.ip_address or "",
        json.dumps(entry.metadata, sort_keys=True, separators=(",", ":")),
    ]


def audit_csv(org: Organization, query: AuditQuery) -> Iterator[str]:
    """Every matching entry (the filters; no paging), newest first, as CSV text in
    chunks, through the one CSV writer (`core/csv_export.py`: a cell a spreadsheet would
    run as a formula is written as text)."""
    buffer = io.StringIO()
    writer = csv_writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for count, entry in enumerate(_rows(org, query).iterator(chunk_size=2000), start=1):
        writer.writerow(csv_row(entry))
        if count % 500 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def audit_csv_response(org: Organization, query: AuditQuery) -> StreamingHttpResponse:
    response = StreamingHttpResponse(audit_csv(org, query), content_type="text/csv")
    stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="audit-log-{org.id}-{stamp}.csv"'
    response["Cache-Control"] = "no-store"
    return response
