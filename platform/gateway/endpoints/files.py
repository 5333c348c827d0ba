"""/v1/files: OpenAI's Files API (upload, list, retrieve, content, delete) over gateway/files.py.

An upload's body is bounded before it is read: `upload_body_limit` gives POST /v1/files with
a valid key MANTLE_FILE_MAX_BYTES (less when the organization's quota leaves less) plus the
multipart framing, and everyone else the default body limit (core/body_limit.py). Django's
handler spools the body to disk and its multipart parser writes a file over
FILE_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB) to a temporary file; both run on an executor thread,
never the event loop, and the file goes to the store a chunk at a time.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, ParamSpec, TypeVar, cast

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.core.files.uploadedfile import UploadedFile
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse
from django.http.multipartparser import MultiPartParserError

from core.body_limit import BodyLimit
from core.errors import DomainError, InvalidInput
from gateway import files
from gateway.backends import database_read
from gateway.errors import OpenAIError, invalid
from gateway.management_rate import management_rate
from gateway.models import File
from gateway.pipeline import parse
from gateway.protocol import (
    FILE_LIST_MAX_LIMIT,
    FileDeleted,
    FileList,
    FileObject,
    FilePurpose,
    FileUploadFields,
)
from gateway.replies import gateway_view, json_reply
from gateway.resolve import resolve

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# What a multipart body holds beside the file's bytes: boundaries, part headers (Django
# takes at most 1 KiB each) and the short form fields.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
FILE_ID_MAX_LENGTH = 64  # File.id's column: a longer id is no file
CURSOR_MAX_LENGTH = 128
PURPOSE_MAX_LENGTH = 64
EXPIRES_AFTER_FIELDS = {"expires_after[anchor]": "anchor", "expires_after[seconds]": "seconds"}


_io_executor: ThreadPoolExecutor | None = None
_io_lock = threading.Lock()


def file_io_executor() -> ThreadPoolExecutor:
    """The threads that move file bytes (parsing an upload, storing it, reading a download):
    MANTLE_FILE_IO_THREADS of them, apart from the loop's default executor, so that a few
    large uploads or slow downloads never hold the threads the gateway's database reads
    need. Uploads past them wait their turn."""
    global _io_executor
    with _io_lock:
        if _io_executor is None:
            _io_executor = ThreadPoolExecutor(
                max_workers=settings.MANTLE_FILE_IO_THREADS, thread_name_prefix="file-io"
            )
        return _io_executor


# --- views ----------------------------------------------------------------------------------


@gateway_view
async def files_root(request: HttpRequest) -> HttpResponseBase:
    """POST /v1/files (upload) and GET /v1/files (list)."""
    _allow(request, "POST", "GET")
    identity, _ = await resolve(request, None)
    await management_rate(identity.organization_id)
    if request.method == "GET":
        limit, order, after, purpose = _list_query(request)
        page = await database_read(
            functools.partial(
                _refusing(files.list_files),
                identity.organization_id,
                purpose=purpose,
                limit=limit,
                order=order,
                after=after,
            )
        )
        data = [file_object(f) for f in page.files]
        listed: FileList = {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": page.has_more,
        }
        return json_reply(listed)
    io = file_io_executor()
    fields, upload = await sync_to_async(_form, thread_sensitive=False, executor=io)(request)
    owner = files.Owner(identity.organization_id, identity.project_id, identity.key_id)
    expires_after = fields.expires_after
    file = await database_read(
        functools.partial(
            _refusing(files.file_upload),
            owner=owner,
            purpose=fields.purpose,
            filename=upload.name or "",
            chunks=_Chunks(upload),
            expires_after_s=expires_after.seconds if expires_after is not None else None,
        ),
        executor=io,
    )
    return json_reply(file_object(file))


@gateway_view
async def file_detail(request: HttpRequest, file_id: str) -> HttpResponseBase:
    """GET and DELETE /v1/files/{file_id}."""
    _allow(request, "GET", "DELETE")
    identity, _ = await resolve(request, None)
    await management_rate(identity.organization_id)
    if request.method == "DELETE":
        deleted = len(file_id) <= FILE_ID_MAX_LENGTH and await database_read(
            files.delete_file, identity.organization_id, file_id
        )
        if not deleted:
            raise not_found(file_id)
        gone: FileDeleted = {"id": file_id, "object": "file", "deleted": True}
        return json_reply(gone)
    return json_reply(file_object(await _file(identity.organization_id, file_id)))


@gateway_view
async def file_content(request: HttpRequest, file_id: str) -> HttpResponseBase:
    """GET /v1/files/{file_id}/content: the bytes, streamed from the store."""
    _allow(request, "GET")
    identity, _ = await resolve(request, None)
    await management_rate(identity.organization_id)
    file = await _file(identity.organization_id, file_id)
    open_file = sync_to_async(files.open_file, thread_sensitive=False, executor=file_io_executor())
    handle = await open_file(file)
    response = FileContentResponse(handle)
    response["content-length"] = str(file.bytes)
    return response


async def upload_body_limit(scope: Any) -> BodyLimit | None:
    """POST /v1/files's body limit, when its key checks out: called by core.body_limit
    before a byte of the body is read. The key is resolved as the view will resolve it; a
    caller without a valid inference key, or whose organization holds all the files it may,
    gets None (the default limit): an upload the view would refuse is never spooled whole."""
    try:
        identity, _ = await resolve(ASGIRequest(scope, io.BytesIO()), None)
        allowance = await database_read(files.upload_allowance, identity.organization_id)
    except Exception as exc:  # any refusal (no key, wrong key, blocked address, outage)
        logger.info("file upload: no upload limit before the body (%s)", exc)
        return None
    if allowance is None:
        return None
    allowed, reason = allowance
    return BodyLimit(allowed + MULTIPART_OVERHEAD_BYTES, reason)


# --- replies --------------------------------------------------------------------------------


def file_object(file: File) -> FileObject:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": int(file.created_at.timestamp()),
        "expires_at": int(file.expires_at.timestamp()) if file.expires_at else None,
        "filename": file.filename,
        "purpose": cast(FilePurpose, file.purpose),
        "status": "processed",
        "status_details": None,
    }


def not_found(file_id: str) -> OpenAIError:
    shown = file_id if len(file_id) <= 100 else f"{file_id[:100]}..."
    return OpenAIError(404, f"No such File object: {shown}", param="id")


class FileContentResponse(StreamingHttpResponse):
    """A file's bytes, read a chunk at a time on an executor thread; the store's handle is
    closed with the response, however it ends (sent, or the client gone)."""

    def __init__(self, handle: IO[bytes]) -> None:
        super().__init__(_read(handle), content_type="application/octet-stream")
        self._handle = handle

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._handle.close()


async def _read(handle: IO[bytes]) -> AsyncGenerator[bytes, None]:
    read = sync_to_async(handle.read, thread_sensitive=False, executor=file_io_executor())
    while chunk := await read(files.CHUNK_BYTES):
        yield chunk


# --- the request ----------------------------------------------------------------------------


def _allow(request: HttpRequest, *methods: str) -> None:
    if request.method not in methods:
        raise OpenAIError(
            405,
            f"Method {request.method} not allowed; use {' or '.join(methods)}.",
            code="method_not_allowed",
        )


async def _file(organization_id: str, file_id: str) -> File:
    file = None
    if len(file_id) <= FILE_ID_MAX_LENGTH:
        file = await database_read(files.get_file, organization_id, file_id)
    if file is None:
        raise not_found(file_id)
    return file


def _list_query(request: HttpRequest) -> tuple[int, str, str | None, str | None]:
    raw_limit = request.GET.get("limit")
    limit = FILE_LIST_MAX_LIMIT
    if raw_limit is not None:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= FILE_LIST_MAX_LIMIT:
            raise invalid(
                f"Invalid value for 'limit': an integer from 1 to {FILE_LIST_MAX_LIMIT}.", "limit"
            )
        limit = int(raw_limit)
    order = request.GET.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("Invalid value for 'order': 'asc' or 'desc'.", "order")
    after = request.GET.get("after")
    if after is not None and not 0 < len(after) <= CURSOR_MAX_LENGTH:
        raise invalid(f"No such File object: {after[:100]}", "after")
    purpose = request.GET.get("purpose")
    if purpose is not None and len(purpose) > PURPOSE_MAX_LENGTH:
        raise invalid(
            f"Invalid value for 'purpose': at most {PURPOSE_MAX_LENGTH} characters.", "purpose"
        )
    return limit, order, after, purpose


def _form(request: HttpRequest) -> tuple[FileUploadFields, UploadedFile]:
    """The multipart form's fields (checked by the protocol's model: unknown ones refused)
    and its one file. Runs on an executor thread: parsing reads the spooled body and writes
    a large file to a temporary file."""
    if not (request.content_type or "").startswith("multipart/form-data"):
        raise invalid(
            "Uploads are multipart/form-data, with the parts `file` and `purpose`.", "file"
        )
    try:
        form, uploads = request.POST, request.FILES
    except (MultiPartParserError, TooManyFieldsSent, TooManyFilesSent) as exc:
        raise invalid(f"The multipart body could not be read: {str(exc)[:200]}", "file") from exc
    except RequestDataTooBig as exc:
        raise OpenAIError(413, "The form fields are too large.", code="payload_too_large") from exc
    fields: dict[str, Any] = {}
    for name in form:
        if name in EXPIRES_AFTER_FIELDS:
            fields.setdefault("expires_after", {})[EXPIRES_AFTER_FIELDS[name]] = form[name]
        elif name == "expires_after":
            fields[name] = _json_part(form[name], name)
        elif name != "file":  # a `file` part without a filename: refused below
            fields[name] = form[name]
    parsed = parse(json.dumps(fields), FileUploadFields)
    extra = [name for name in uploads if name != "file"]
    if extra:
        raise invalid(f"Unrecognized request argument supplied: {extra[0][:100]}", extra[0][:100])
    sent = uploads.getlist("file")
    if not sent:
        raise invalid("Missing required parameter: 'file' (a file part with a filename).", "file")
    if len(sent) > 1:
        raise invalid("Upload one file per request.", "file")
    return parsed, sent[0]


def _json_part(value: str, name: str) -> Any:
    """An object sent as one part of JSON (the OpenAPI document's way for an object field)."""
    try:
        return json.loads(value)
    except ValueError as exc:
        raise invalid(f"Invalid value for '{name}': not a JSON object.", name) from exc


class _Chunks:
    """An uploaded file's chunks, from its start each time they are iterated (the database
    read may run the upload twice after a dropped connection)."""

    def __init__(self, upload: UploadedFile) -> None:
        self.upload = upload

    def __iter__(self) -> Iterator[bytes]:
        chunks: Iterator[bytes] = self.upload.chunks(files.CHUNK_BYTES)
        return chunks


def _refusing(fn: Callable[P, T]) -> Callable[P, T]:
    """`fn`, with the service's refusals as OpenAI's errors."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except DomainError as exc:
            code = None if type(exc) is InvalidInput and exc.code == "invalid_request" else exc.code
            raise OpenAIError(exc.status, exc.message, param=exc.param, code=code) from exc

    return call
