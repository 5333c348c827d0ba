"""Management API for compile jobs: upload or name a model, follow its steps, get its version."""

from __future__ import annotations

import io
import logging
from importlib import import_module
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user
from django.core.handlers.asgi import ASGIRequest
from django.db import close_old_connections
from django.http import HttpRequest
from ninja import Query, Router, Status

from accounts.permissions import Perm
from accounts.principal import Principal
from accounts.selectors import organization_for
from catalog import compile as compile_jobs
from catalog.compile_schemas import CheckpointCompileIn, CompileJobOut, CompileStepOut, UploadParams
from catalog.models import CompileJob

if TYPE_CHECKING:
    from core.body_limit import BodyLimit

logger = logging.getLogger(__name__)

router = Router(tags=["compile"])

JOBS = "/organizations/{organization_id}/compile-jobs"


def _principal(request: HttpRequest) -> Principal:
    principal: Principal = request.auth  # type: ignore[attr-defined]
    return principal


def _job_out(job: CompileJob) -> CompileJobOut:
    version = job.model_version
    # A staged upload's path is the platform's business; a checkpoint's is the caller's own.
    uploaded = "upload_bytes" in job.source_detail
    detail = {k: v for k, v in job.source_detail.items() if not (uploaded and k == "path")}
    return CompileJobOut(
        id=job.id,
        status=job.status,
        model_name=job.model_name,
        kind=job.kind,
        source=job.source,
        source_detail=detail,
        options=job.options,
        steps=[CompileStepOut(**s) for s in job.steps],
        error=job.error or None,
        error_code=job.error_code or None,
        model_version_id=version.id if version else None,
        model_version=version.version if version else None,
        sha256=version.sha256 if version else None,
        created_by=job.created_by,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


@router.get(JOBS, response=list[CompileJobOut])
def compile_job_list(request: HttpRequest, organization_id: str) -> list[CompileJobOut]:
    org = organization_for(_principal(request), organization_id, Perm.ENDPOINTS_VIEW)
    jobs = compile_jobs.compile_jobs_for(org).select_related("model_version")[:100]
    return [_job_out(j) for j in jobs]


# Before `{job_id}`: Django matches URL patterns in order, and `upload` is a valid id there.
@router.post(f"{JOBS}/upload", response={201: CompileJobOut})
def compile_job_upload(
    request: HttpRequest, organization_id: str, params: Query[UploadParams]
) -> Status[CompileJobOut]:
    """The request body is the ONNX file, or a .tar(.gz)/.zip with external data and tokenizer.

    Streamed to the staging area (at most MANTLE_MAX_UPLOAD_BYTES), validated
    before a job exists: a refused upload leaves nothing behind.
    """
    principal = _principal(request)
    org = organization_for(principal, organization_id, Perm.ENDPOINTS_MANAGE)
    options = compile_jobs.compile_options_check(
        quantize=params.quantize, optimization=params.optimization, tolerance=params.tolerance
    )
    job = compile_jobs.compile_job_from_upload(
        principal=principal,
        org=org,
        # The request itself is the stream: request.body would hold it all in memory.
        stream=request,  # type: ignore[arg-type]
        model_name=params.model_name,
        kind=params.kind,
        source=params.source,
        model_file=params.model_file,
        filename=params.filename,
        options=options,
    )
    return Status(201, _job_out(job))


async def upload_body_limit(scope: Any, organization_id: str) -> BodyLimit | None:
    """The upload's own limit, if the request's credentials may upload to the organization.

    Called by core.body_limit before a byte of the body is read: the console session
    (CSRF-checked) or admin-scoped key is authenticated by the management API's own
    authenticators, and the organization and permission checked, exactly as the view
    will; anyone else (None) gets the small default limit, so an unauthenticated body
    is refused at MANTLE_MAX_BODY_BYTES instead of being spooled whole.
    """
    return await sync_to_async(_upload_body_limit, thread_sensitive=True)(scope, organization_id)


def _upload_body_limit(scope: Any, organization_id: str) -> BodyLimit | None:
    from accounts.auth import management_auth
    from core.body_limit import BodyLimit

    try:
        request = ASGIRequest(scope, io.BytesIO())
        store = import_module(settings.SESSION_ENGINE).SessionStore
        request.session = store(request.COOKIES.get(settings.SESSION_COOKIE_NAME))
        request.user = get_user(request)
        principal = None
        for authenticate in management_auth:
            principal = authenticate(request)
            if principal is not None:
                break
        if not isinstance(principal, Principal):
            return None
        org = organization_for(principal, organization_id, Perm.ENDPOINTS_MANAGE)
        quota = compile_jobs.compile_quota_of(org)
        if quota.jobs_left <= 0:
            return None  # the view refuses it (429) from a small body
        return BodyLimit(*compile_jobs.upload_allowance(quota))
    except Exception as exc:  # any refusal (CSRF, key, role, blocked address) is "no"
        logger.info("upload to %s: no upload limit before the body (%s)", organization_id, exc)
        return None
    finally:
        close_old_connections()


@router.get(f"{JOBS}/{{job_id}}", response=CompileJobOut)
def compile_job_get(request: HttpRequest, organization_id: str, job_id: str) -> CompileJobOut:
    org = organization_for(_principal(request), organization_id, Perm.ENDPOINTS_VIEW)
    return _job_out(compile_jobs.compile_job_get(org, job_id))


@router.post(JOBS, response={201: CompileJobOut})
def compile_job_create(
    request: HttpRequest, organization_id: str, payload: CheckpointCompileIn
) -> Status[CompileJobOut]:
    principal = _principal(request)
    org = organization_for(principal, organization_id, Perm.ENDPOINTS_MANAGE)
    options = compile_jobs.compile_options_check(
        quantize=payload.quantize, optimization=payload.optimization, tolerance=payload.tolerance
    )
    job = compile_jobs.compile_job_from_checkpoint(
        principal=principal,
        org=org,
        path=payload.path,
        model_name=payload.model_name,
        kind=payload.kind,
        options=options,
    )
    return Status(201, _job_out(job))
