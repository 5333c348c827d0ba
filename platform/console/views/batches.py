"""Batches: upload an input file, create a batch under one of the organization's keys, follow
its progress, download its output and error files, cancel it.

The page is a second front end for the gateway's Files and Batch API services: it calls
them as /v1/files and /v1/batches do (console/services.py adds the audit), so a batch made
here is the same row, run by the same runner, billed the same way.

An upload's body is bounded before it is read (core/body_limit.py): `upload_body_limit`
gives the upload URL the Files API's limit (MANTLE_FILE_MAX_BYTES, less when the
organization's quota leaves less) only for a signed-in member who may create batches in the
organization of the URL; anyone else gets the default (MANTLE_MAX_BODY_BYTES).
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Iterator
from importlib import import_module
from typing import IO, Any
from urllib.parse import urlencode

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user
from django.core.handlers.asgi import ASGIRequest
from django.db import close_old_connections
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.http.response import HttpResponseBase
from django.urls import reverse
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_GET, require_POST

from accounts import selectors
from accounts.auth import client_ip
from accounts.permissions import Perm
from accounts.principal import Principal
from console import selectors as console_selectors
from console import services as console_services
from console.access import OrgContext, is_htmx, org_page, page
from console.forms import BatchFileForm, BatchForm, add_domain_error
from core.body_limit import BodyLimit
from core.errors import DomainError, NotFound
from gateway import files
from gateway.models import File

logger = logging.getLogger(__name__)

# What a multipart body holds beside the file: boundaries, part headers, the CSRF token.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
FILE_ID_MAX_LENGTH = 64  # File.id's column: a longer id is no file


def _batches_url(ctx: OrgContext, **query: str) -> str:
    url = reverse("console-batches", kwargs={"org_id": ctx.org.id})
    return f"{url}?{urlencode(query)}" if query else url


def _batch_form(ctx: OrgContext, data: Any = None, *, initial_file: str = "") -> BatchForm:
    return BatchForm(
        data,
        input_files=console_selectors.batch_input_files(ctx.org),
        keys=console_selectors.batch_keys(ctx.org),
        initial={"input_file": initial_file} if initial_file else None,
    )


def _list_page(
    request: HttpRequest,
    ctx: OrgContext,
    *,
    form: BatchForm | None = None,
    upload_form: BatchFileForm | None = None,
    status: int = 200,
) -> HttpResponse:
    rows, shown = console_selectors.batch_rows(ctx.org, request.GET.get("page"))
    context = {"rows": rows, "shown": shown, "polling": any(r.active for r in rows)}
    if is_htmx(request):
        return page(request, ctx, "console/batches/_table.html", context)
    can_create = ctx.can(Perm.KEYS_CREATE)
    if can_create and form is None:
        form = _batch_form(ctx, initial_file=request.GET.get("file", ""))
    context |= {
        "form": form,
        "upload_form": (upload_form or BatchFileForm()) if can_create else None,
        "max_upload": files.upload_allowance(ctx.org.id) if can_create else None,
    }
    return page(request, ctx, "console/batches/list.html", context, status=status)


@org_page(Perm.USAGE_VIEW)
def batches(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """GET: the organization's batches and the forms; POST: creates a batch."""
    if request.method != "POST":
        return _list_page(request, ctx)
    ctx.require(Perm.KEYS_CREATE)
    form = _batch_form(ctx, request.POST)
    if not form.is_valid():
        return _list_page(request, ctx, form=form, status=400)
    data = form.cleaned_data
    try:
        batch = console_services.batch_create(
            principal=ctx.principal,
            org=ctx.org,
            api_key_id=data["api_key"],
            input_file_id=data["input_file"],
            endpoint=data["endpoint"],
            description=data["description"],
        )
    except DomainError as exc:
        add_domain_error(form, exc)
        return _list_page(request, ctx, form=form, status=exc.status)
    messages.success(request, f"Batch {batch.id} created; it is validating its input file.")
    return HttpResponseRedirect(_batches_url(ctx))


@require_POST
@org_page(Perm.KEYS_CREATE)
def batch_file_upload(request: HttpRequest, ctx: OrgContext) -> HttpResponse:
    """POST: an input file (JSONL) for batches, streamed to the Files API's store."""
    form = BatchFileForm(request.POST, request.FILES)
    if not form.is_valid():
        return _list_page(request, ctx, upload_form=form, status=400)
    uploaded = form.cleaned_data["file"]
    try:
        file = console_services.batch_file_upload(
            principal=ctx.principal,
            org=ctx.org,
            filename=uploaded.name or "",
            chunks=uploaded.chunks(files.CHUNK_BYTES),
        )
    except DomainError as exc:
        add_domain_error(form, exc)
        return _list_page(request, ctx, upload_form=form, status=exc.status)
    finally:
        uploaded.close()  # its temporary file, for a large upload
    messages.success(
        request, f"Uploaded {file.filename} ({file.id}); choose it below to create a batch."
    )
    return HttpResponseRedirect(_batches_url(ctx, file=file.id))


@org_page(Perm.USAGE_VIEW)
def batch_detail(request: HttpRequest, ctx: OrgContext, batch_id: str) -> HttpResponse:
    row = console_selectors.batch_row(ctx.org, batch_id)
    template = "console/batches/_detail.html" if is_htmx(request) else "console/batches/detail.html"
    found = {
        name: files.get_file(ctx.org.id, file_id) if file_id else None
        for name, file_id in (
            ("input_file", row.batch.input_file_id),
            ("output_file", row.batch.output_file_id),
            ("error_file", row.batch.error_file_id),
        )
    }
    return page(request, ctx, template, {"row": row, **found})


@org_page(Perm.KEYS_CREATE)
def batch_cancel(request: HttpRequest, ctx: OrgContext, batch_id: str) -> HttpResponse:
    """GET: the confirmation page (without JS); POST: cancels at once."""
    row = console_selectors.batch_row(ctx.org, batch_id)
    if request.method != "POST":
        return page(request, ctx, "console/batches/cancel.html", {"row": row})
    try:
        batch = console_services.batch_cancel(
            principal=ctx.principal, org=ctx.org, batch_id=batch_id
        )
    except DomainError as exc:
        if exc.status == 404:
            raise
        messages.error(request, exc.message)
    else:
        if is_htmx(request):
            row = console_selectors.batch_row(ctx.org, batch.id)
            return page(request, ctx, "console/batches/_row.html", {"row": row})
        messages.success(
            request,
            f"Batch {batch.id} is cancelling: lines already running finish and are kept, "
            "the others go to its error file.",
        )
    return HttpResponseRedirect(_batches_url(ctx))


@require_GET
@org_page(Perm.KEYS_CREATE)
def file_content(request: HttpRequest, ctx: OrgContext, file_id: str) -> HttpResponseBase:
    """One of the organization's files (a batch's input, output or errors) as a download;
    another organization's, an expired or a deleted one is 404."""
    file = files.get_file(ctx.org.id, file_id) if len(file_id) <= FILE_ID_MAX_LENGTH else None
    if file is None:
        raise NotFound(f"file {file_id[:100]!r} not found", param="file_id")
    return FileDownload(file, asynchronous=isinstance(request, ASGIRequest))


class FileDownload(StreamingHttpResponse):
    """A file's bytes as an attachment, a chunk at a time from the store (on an executor
    thread under ASGI: Django would read a sync iterator whole there); the store's handle
    is closed with the response, however it ends."""

    def __init__(self, file: File, *, asynchronous: bool) -> None:
        handle = files.open_file(file)
        content = _read_async(handle) if asynchronous else _read(handle)
        super().__init__(content, content_type="application/octet-stream")
        self._handle = handle
        self["Content-Length"] = str(file.bytes)
        self["Content-Disposition"] = content_disposition_header(True, file.filename)
        self["Cache-Control"] = "private, no-store"

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._handle.close()


def _read(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(files.CHUNK_BYTES):
        yield chunk


async def _read_async(handle: IO[bytes]) -> AsyncIterator[bytes]:
    read = sync_to_async(handle.read, thread_sensitive=False)
    while chunk := await read(files.CHUNK_BYTES):
        yield chunk


# --- the upload's body limit ----------------------------------------------------------------


async def upload_body_limit(scope: Any, organization_id: str) -> BodyLimit | None:
    """The console upload's limit, when its session may upload to the organization: called
    by core.body_limit before a byte of the body is read (config.asgi.upload_limit_for).

    The session cookie is checked as the console's middleware will (the session, its user
    active and its password hash unchanged), and the membership and permission as the view
    will; anyone else gets None (the default limit). The CSRF token comes in the body, which
    is not read yet: the view checks it before anything is stored, and the session cookie is
    SameSite=Lax, so a cross-site form never carries it here.
    """
    return await sync_to_async(_upload_body_limit, thread_sensitive=True)(scope, organization_id)


def _upload_body_limit(scope: Any, organization_id: str) -> BodyLimit | None:
    try:
        request = ASGIRequest(scope, io.BytesIO())
        store = import_module(settings.SESSION_ENGINE).SessionStore
        request.session = store(request.COOKIES.get(settings.SESSION_COOKIE_NAME))
        user: Any = get_user(request)
        if not user.is_authenticated:
            return None
        principal = Principal(user=user, ip_address=client_ip(request))
        org = selectors.organization_for(principal, organization_id, Perm.KEYS_CREATE)
        allowance = files.upload_allowance(org.id)
    except Exception as exc:  # any refusal (no session, not a member, role, outage) is "no"
        logger.info(
            "console upload to %s: no upload limit before the body (%s)", organization_id, exc
        )
        return None
    finally:
        close_old_connections()
    if allowance is None:
        return None  # the organization holds all the files it may: the view says so
    allowed, reason = allowance
    return BodyLimit(allowed + MULTIPART_OVERHEAD_BYTES, reason)
