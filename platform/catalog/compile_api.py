"""Management API for compile jobs: upload or name a model, follow its steps, get its version."""

from __future__ import annotations

from django.http import HttpRequest
from ninja import Query, Router, Status

from accounts.permissions import Perm
from accounts.principal import Principal
from accounts.selectors import organization_for
from catalog import compile as compile_jobs
from catalog.compile_schemas import CheckpointCompileIn, CompileJobOut, CompileStepOut, UploadParams
from catalog.models import CompileJob

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
