"""Files of the Files API: bytes in the file store, metadata in `gateway.models.File`.

The store is MANTLE_FILE_STORE, a local directory or an fsspec URL (`s3://bucket/files`). A
file's bytes live at `<store>/<organization id>/<file id>`: both ids are the platform's own,
checked against their alphabet before they make a path, so no text a customer chose (the
filename least of all) ever reaches the store's namespace. The filename is metadata, cleaned
for display (`clean_filename`).

Quotas: an organization holds at most MANTLE_FILES_ORG_MAX_COUNT files and
MANTLE_FILES_ORG_MAX_BYTES bytes, every purpose counted (the batch runner's `batch_output`
files too). A write streams its bytes into the store first, cut at what the quota left when
it started; then one transaction takes the organization's row lock, counts the quota again
and inserts the row. Concurrent writes serialise on that lock, so the second one counts the
first: two writes cannot both take the last bytes or the last file. Bytes whose row is
refused are deleted.

Reads are scoped to the organization and to files not yet expired: another organization's
id, a deleted one and an expired one are the same "no such file" (None). Deleting removes the
row first, then the bytes: a failure between the two leaves unreachable bytes, never a row
without its bytes.

Plain synchronous functions: the gateway runs them in executor threads, the batch runner
(directly or through `sync_to_async`) and the control worker's expiry task directly.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from accounts.models import Organization
from core.errors import DomainError, InvalidInput
from core.ids import new_id
from gateway.models import File

logger = logging.getLogger(__name__)

PURPOSE_BATCH = "batch"
PURPOSE_USER_DATA = "user_data"
PURPOSE_BATCH_OUTPUT = "batch_output"
# What customers may upload; `batch_output` only the platform writes (and customers read).
UPLOAD_PURPOSES = (PURPOSE_BATCH, PURPOSE_USER_DATA)
PURPOSES = (*UPLOAD_PURPOSES, PURPOSE_BATCH_OUTPUT)

FILENAME_MAX_CHARS = 255  # File.filename's column
EXTENSION_MAX_CHARS = 16  # kept whole when a long filename is shortened
CHUNK_BYTES = 1024 * 1024  # reads and writes of the store, one at a time in memory
DELETE_BATCH = 1000

# Organization and file ids are the platform's (`org_...`, `file-...`); a path is only ever
# made of ids that match this.
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Characters dropped from a filename: control and format characters (bidirectional
# overrides that disguise an extension included), surrogates, line and paragraph separators.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


class FileTooLarge(DomainError):
    status = 413
    code = "file_too_large"


class FileQuotaExceeded(DomainError):
    """The organization's files would pass one of its quotas."""


class FileCountQuotaExceeded(FileQuotaExceeded):
    status = 403
    code = "file_count_quota_exceeded"


class FileStorageQuotaExceeded(FileQuotaExceeded):
    status = 413
    code = "file_storage_quota_exceeded"


class LineTooLong(DomainError):
    """A line of a file is longer than `iter_lines` may hold in memory."""

    code = "line_too_long"

    def __init__(self, line: int, limit: int) -> None:
        super().__init__(f"Line {line} of the file is longer than {limit} bytes.")
        self.line = line
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Owner:
    """Who uploads: the key's organization, project and key (kept on the row for audit)."""

    organization_id: str
    project_id: str
    api_key_id: str


@dataclass(frozen=True, slots=True)
class Usage:
    files: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Page:
    files: list[File]
    has_more: bool


# --- the interface the batch runner uses ---------------------------------------------------


def get_file(organization_id: str, file_id: str) -> File | None:
    """The organization's file `file_id`; None when it has none such (never created, another
    organization's, deleted or expired)."""
    return _live(organization_id).filter(id=file_id).first()


def write_file(
    *,
    organization_id: str,
    purpose: str,
    filename: str,
    chunks: Iterable[bytes],
    expires_at: datetime | None,
    over_quota: bool = False,
) -> File:
    """A file the platform writes for an organization (a batch's output or errors): `chunks`
    streamed into the store, then its row created; the quota counts it. Raises
    FileQuotaExceeded when the organization's quota cannot hold it (nothing is left behind),
    InvalidInput for an unknown purpose or an empty filename.

    `over_quota` writes it whatever the quota says (a batch's answers, paid for already;
    the batch runner bounds their size itself): it counts toward the quota afterwards, so the
    organization uploads again once it has deleted enough."""
    if purpose not in PURPOSES:
        raise InvalidInput(f"Unknown purpose {purpose[:64]!r}.", param="purpose")
    return _create(
        owner=Owner(organization_id, "", ""),
        purpose=purpose,
        filename=clean_filename(filename),
        chunks=chunks,
        expires_at=lambda _: expires_at,
        max_bytes=None,
        over_quota=over_quota,
    )


def iter_lines(file: File, *, max_line_bytes: int | None = None) -> Iterator[bytes]:
    """The file's lines, streamed from the store a chunk at a time, each without its line
    ending (`\\n` or `\\r\\n`). Every line is yielded, empty ones too, so the n-th item is the
    file's line n; a final line ending adds no empty line after it.

    Memory stays within a chunk and one line: a line longer than `max_line_bytes` (default
    MANTLE_MAX_BODY_BYTES, the bound of a /v1 request body) raises LineTooLong naming its
    number (1-based), and nothing after it is read."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE if max_line_bytes is None else max_line_bytes
    number = 0
    pending = bytearray()  # the current line's bytes from earlier chunks
    for chunk in iter_chunks(file):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            number += 1
            # +1: a `\r` before the `\n`, dropped below.
            if len(pending) + end - start > limit + 1:
                raise LineTooLong(number, limit)
            line = bytes(pending + chunk[start:end]) if pending else chunk[start:end]
            pending.clear()
            yield _line(line, number, limit)
            start = end + 1
        pending += chunk[start:]
        if len(pending) > limit + 1:
            raise LineTooLong(number + 1, limit)
    if pending:
        yield _line(bytes(pending), number + 1, limit)


def _line(line: bytes, number: int, limit: int) -> bytes:
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) > limit:
        raise LineTooLong(number, limit)
    return line


# --- customers' uploads --------------------------------------------------------------------


def file_upload(
    *,
    owner: Owner,
    purpose: str,
    filename: str,
    chunks: Iterable[bytes],
    expires_after_s: int | None,
) -> File:
    """A customer's upload (POST /v1/files): `chunks` (an uploaded file's `chunks()`) streamed
    into the store, at most MANTLE_FILE_MAX_BYTES, then its row created under the quota.

    `expires_after_s` (OpenAI's `expires_after[seconds]`, bounded by gateway.protocol) sets
    `expires_at` that long after creation; without it MANTLE_FILES_DEFAULT_RETENTION_DAYS does (0:
    kept until deleted). A `batch` file is only checked to look like JSONL (a `.jsonl` name,
    a first line that opens a JSON object); the Batch API validates its lines later."""
    if purpose not in UPLOAD_PURPOSES:
        allowed = " or ".join(repr(p) for p in UPLOAD_PURPOSES)
        raise InvalidInput(
            f"Invalid value for 'purpose': {purpose[:64]!r}; files may be uploaded with {allowed}.",
            param="purpose",
        )
    name = clean_filename(filename)
    if purpose == PURPOSE_BATCH:
        if not name.lower().endswith(".jsonl"):
            raise InvalidInput(
                "Invalid file format for Batch API. Must be .jsonl",
                param="file",
                code="invalid_file_format",
            )
        chunks = _jsonl_checked(chunks)

    def expiry(created_at: datetime) -> datetime | None:
        if expires_after_s is not None:
            return created_at + timedelta(seconds=expires_after_s)
        return default_expiry(created_at)

    return _create(
        owner=owner,
        purpose=purpose,
        filename=name,
        chunks=chunks,
        expires_at=expiry,
        max_bytes=settings.MANTLE_FILE_MAX_BYTES,
    )


def default_expiry(created_at: datetime) -> datetime | None:
    days = settings.MANTLE_FILES_DEFAULT_RETENTION_DAYS
    return created_at + timedelta(days=days) if days > 0 else None


def clean_filename(filename: str) -> str:
    """The filename as shown back: its last path component, without control or format
    characters, at most 255 characters (a short extension kept). Display only: the store's
    path never depends on it. InvalidInput when nothing is left."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c) not in _DROPPED_CATEGORIES)
    name = name.strip()
    if not name:
        raise InvalidInput("The file needs a filename.", param="file")
    if len(name) > FILENAME_MAX_CHARS:
        stem, dot, extension = name.rpartition(".")
        if dot and stem and len(extension) <= EXTENSION_MAX_CHARS:
            name = f"{stem[: FILENAME_MAX_CHARS - len(extension) - 1]}.{extension}"
        else:
            name = name[:FILENAME_MAX_CHARS]
    return name


def _jsonl_checked(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """`chunks`, refused (InvalidInput) unless the first thing in them opens a JSON object."""
    seen = False
    for chunk in chunks:
        if not seen:
            stripped = chunk.lstrip()
            if stripped:
                seen = True
                if not stripped.startswith(b"{"):
                    raise InvalidInput(
                        "Invalid file format for Batch API: each line must be a JSON object.",
                        param="file",
                        code="invalid_file_format",
                    )
        yield chunk
    if not seen:
        raise InvalidInput("The file is empty.", param="file", code="invalid_file_format")


# --- reads, lists, deletes -----------------------------------------------------------------


def _live(organization_id: str) -> QuerySet[File]:
    """The organization's files not yet expired (the expiry task may not have run yet)."""
    return File.objects.filter(organization_id=organization_id).filter(
        Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now())
    )


def list_files(
    organization_id: str,
    *,
    purpose: str | None = None,
    limit: int,
    order: str = "desc",
    after: str | None = None,
) -> Page:
    """A page of the organization's files by creation time (`desc`: newest first), starting
    after the file `after`. InvalidInput (param `after`) when `after` is no file of theirs."""
    files = _live(organization_id)
    if purpose is not None:
        files = files.filter(purpose=purpose)
    descending = order == "desc"
    if after is not None:
        cursor = _live(organization_id).filter(id=after).values_list("created_at", flat=True)
        created_at = cursor.first()
        if created_at is None:
            raise InvalidInput(f"No such File object: {after[:100]}", param="after")
        if descending:
            later = Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=after)
        else:
            later = Q(created_at__gt=created_at) | Q(created_at=created_at, id__gt=after)
        files = files.filter(later)
    ordering = ("-created_at", "-id") if descending else ("created_at", "id")
    rows = list(files.order_by(*ordering)[: limit + 1])
    return Page(files=rows[:limit], has_more=len(rows) > limit)


def open_file(file: File) -> IO[bytes]:
    """The file's bytes as a binary stream from the store (the caller closes it)."""
    fs, path = _fs_of(file.location)
    handle: IO[bytes] = fs.open(path, "rb")
    return handle


def iter_chunks(file: File, chunk_bytes: int | None = None) -> Iterator[bytes]:
    """The file's bytes, a chunk (default CHUNK_BYTES) at a time."""
    size = chunk_bytes or CHUNK_BYTES
    with open_file(file) as handle:
        while chunk := handle.read(size):
            yield chunk


def delete_file(organization_id: str, file_id: str) -> bool:
    """Deletes the organization's file, its row then its bytes; False when it had none such."""
    file = get_file(organization_id, file_id)
    if file is None:
        return False
    deleted, _ = File.objects.filter(id=file.id, organization_id=organization_id).delete()
    if not deleted:
        return False  # deleted meanwhile, by another request or the expiry task
    _remove(file.location)
    return True


def delete_expired_files(*, now: datetime | None = None) -> int:
    """Deletes every file past its `expires_at`, rows then bytes, a batch at a time (short
    statements: uploads write the same table meanwhile); returns how many."""
    now = now or timezone.now()
    total = 0
    while True:
        batch = list(
            File.objects.filter(expires_at__lte=now).values_list("id", "location")[:DELETE_BATCH]
        )
        if not batch:
            break
        deleted, _ = File.objects.filter(
            id__in=[file_id for file_id, _ in batch], expires_at__lte=now
        ).delete()
        total += deleted
        for _, location in batch:
            _remove(location)
    if total:
        logger.info("deleted %s expired files", total)
    return total


ORPHAN_AGE_S = 3600  # older than any upload or batch output being written


def delete_orphaned_bytes(*, older_than_s: float = ORPHAN_AGE_S) -> int:
    """Deletes bytes in the store that no file row names, once older than `older_than_s`: an
    upload or a batch output whose process died between writing the bytes and committing the
    row (or whose row's delete committed and the bytes' did not). Returns how many; the store
    is walked one organization's folder at a time."""
    fs, root = _fs_of(store_url())
    if not fs.exists(root):
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for folder in fs.ls(root, detail=False):
        organization_id = str(folder).rstrip("/").rsplit("/", 1)[-1]
        if not _ID.match(organization_id):
            continue
        listed = fs.ls(folder, detail=True)
        names = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e for e in listed}
        known = set(
            File.objects.filter(organization_id=organization_id, id__in=list(names)).values_list(
                "id", flat=True
            )
        )
        for name, entry in names.items():
            if name in known or not _ID.match(name) or entry.get("type") != "file":
                continue
            if _modified(entry) > cutoff:
                continue
            _remove(f"{store_url()}/{organization_id}/{name}")
            removed += 1
    if removed:
        logger.warning("deleted %s files' bytes that no file row names", removed)
    return removed


def _modified(entry: dict[str, Any]) -> float:
    """An entry's modification time in seconds since the epoch (local: `mtime`; object
    stores: `LastModified` or `mtime` as a datetime); unknown is 'now' (kept)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = entry.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
    return time.time()


def usage_of(organization_id: str) -> Usage:
    """The files the organization holds now (not expired), and their bytes."""
    counted = _live(organization_id).aggregate(files=Count("id"), bytes=Sum("bytes"))
    return Usage(files=counted["files"], bytes=counted["bytes"] or 0)


def upload_allowance(organization_id: str) -> tuple[int, str] | None:
    """How many bytes one upload may hold now, and the setting that says so: the file limit,
    or less when the organization's stored-bytes quota leaves less. None when the
    organization holds as many files as it may (the upload will be refused whatever its
    size)."""
    usage = usage_of(organization_id)
    if usage.files >= settings.MANTLE_FILES_ORG_MAX_COUNT:
        return None
    left = settings.MANTLE_FILES_ORG_MAX_BYTES - usage.bytes
    if left < settings.MANTLE_FILE_MAX_BYTES:
        return max(0, left), "MANTLE_FILES_ORG_MAX_BYTES"
    return settings.MANTLE_FILE_MAX_BYTES, "MANTLE_FILE_MAX_BYTES"


# --- writing -------------------------------------------------------------------------------


def _create(
    *,
    owner: Owner,
    purpose: str,
    filename: str,
    chunks: Iterable[bytes],
    expires_at: Callable[[datetime], datetime | None],
    max_bytes: int | None,
    over_quota: bool = False,
) -> File:
    """Bytes first (refused early when the quota is already full), then the row under the
    organization's lock, the quota counted again there (neither with `over_quota`)."""
    file_id = new_id("file-", 24)
    location = location_of(owner.organization_id, file_id)
    if over_quota:
        left = sys.maxsize
    else:
        usage = usage_of(owner.organization_id)
        _quota_check(usage, 0)
        left = settings.MANTLE_FILES_ORG_MAX_BYTES - usage.bytes
    size = _stream_into(location, chunks, max_bytes=max_bytes, quota_left=left)
    try:
        with transaction.atomic():
            # The organization's row serialises the writes of its files: the quota counted
            # below includes every file committed before this one.
            locked = (
                Organization.objects.select_for_update()
                .filter(id=owner.organization_id)
                .values_list("id", flat=True)
                .first()
            )
            if locked is None:
                raise InvalidInput("No such organization.", param="organization")
            if not over_quota:
                _quota_check(usage_of(owner.organization_id), size)
            created_at = timezone.now()
            return File.objects.create(
                id=file_id,
                organization_id=owner.organization_id,
                project_id=owner.project_id,
                api_key_id=owner.api_key_id,
                purpose=purpose,
                filename=filename,
                bytes=size,
                location=location,
                status="processed",
                created_at=created_at,
                expires_at=expires_at(created_at),
            )
    except BaseException:
        _remove(location)
        raise


def _quota_check(usage: Usage, adding: int) -> None:
    if usage.files >= settings.MANTLE_FILES_ORG_MAX_COUNT:
        raise FileCountQuotaExceeded(
            f"The organization already holds {usage.files} files, the most it may "
            f"(MANTLE_FILES_ORG_MAX_COUNT = {settings.MANTLE_FILES_ORG_MAX_COUNT}); "
            "delete some first."
        )
    if usage.bytes + adding > settings.MANTLE_FILES_ORG_MAX_BYTES:
        raise _bytes_quota_exceeded(usage.bytes)


def _bytes_quota_exceeded(stored: int) -> FileStorageQuotaExceeded:
    return FileStorageQuotaExceeded(
        "The file would take the organization's stored bytes past its quota "
        f"(MANTLE_FILES_ORG_MAX_BYTES = {settings.MANTLE_FILES_ORG_MAX_BYTES}; "
        f"{stored} are stored now); delete some files first.",
        param="file",
    )


def _stream_into(
    location: str, chunks: Iterable[bytes], *, max_bytes: int | None, quota_left: int
) -> int:
    """Writes `chunks` to `location`, counting; cut (and removed) past the file limit or what
    the quota leaves. Returns the bytes written."""
    fs, path = _fs_of(location)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    size = 0
    try:
        with fs.open(path, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FileTooLarge(
                        f"The file is larger than the {max_bytes} bytes allowed "
                        "(MANTLE_FILE_MAX_BYTES).",
                        param="file",
                    )
                if size > quota_left:
                    raise _bytes_quota_exceeded(settings.MANTLE_FILES_ORG_MAX_BYTES - quota_left)
                out.write(chunk)
    except BaseException:
        _remove(location)
        raise
    return size


# --- the store -----------------------------------------------------------------------------


def store_url() -> str:
    """MANTLE_FILE_STORE, a directory (`~` expanded) or an fsspec URL, without a trailing /."""
    store = str(settings.MANTLE_FILE_STORE)
    if "://" not in store:
        store = str(Path(store).expanduser())
    return store.rstrip("/")


def location_of(organization_id: str, file_id: str) -> str:
    """Where a file's bytes go: `<store>/<organization id>/<file id>`, ids only."""
    for value in (organization_id, file_id):
        if not _ID.match(value):
            raise ValueError(f"not an id the platform makes: {value[:80]!r}")
    return f"{store_url()}/{organization_id}/{file_id}"


def _fs_of(location: str) -> tuple[Any, str]:
    # fsspec is imported here: the gateway's other paths never need it, and a remote
    # store's protocol package (s3fs...) is only loaded by the processes that touch files.
    import fsspec

    fs, path = fsspec.core.url_to_fs(location)
    return fs, str(path)


def _remove(location: str) -> None:
    """Deletes the bytes at `location`; gone already is fine, other failures are logged (the
    row is what counts, and it is gone or never was)."""
    try:
        fs, path = _fs_of(location)
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except Exception:
        logger.exception("could not delete file bytes at %s", location)
