"""Compile jobs: staging uploads, creating jobs, and applying the compile nodes' reports."""

from __future__ import annotations

import logging
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.models import Organization
from accounts.principal import Principal
from accounts.services import audit_record
from catalog.models import CompileJob, Model, ModelVersion
from catalog.services import model_version_from_manifest
from core.celery_app import app as celery_app
from core.errors import Conflict, DomainError, InvalidInput, NotFound
from workers.compile.validate import (
    CompileError,
    Limits,
    check_checkpoint,
    extract_archive,
    validate_onnx,
)
from workers.contract import (
    CompileOutcome,
    CompileProgress,
    CompileRequest,
    CompileSource,
    CompileStatus,
    Queue,
    Runtime,
    TaskName,
    to_payload,
)

# workers/compile/validate.py is imported here on purpose: it is a leaf (stdlib
# and onnx's protobuf, no runtime, no Celery), so an upload is refused in the
# request that brought it, before a job exists; the compile node re-runs the
# same checks before it trusts the staged files.

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,119}$")
KINDS = tuple(Model.Kind.values)
RUNTIME_BY_KIND = {
    "chat": Runtime.CAUSAL_LM.value,
    "completion": Runtime.CAUSAL_LM.value,
    "embedding": Runtime.ENCODER.value,
    "tensor": Runtime.TENSOR.value,
}
QUANTIZE = ("none", "int8", "int4")
OPTIMIZATION = ("none", "basic", "extended")
ONNX_MAGIC_FIRST_BYTE = 0x08  # ModelProto field 1 (ir_version), varint: every ONNX file starts so
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class CompileOptions:
    """What a job does beyond importing: checked before anything is staged or queued."""

    quantize: str = "none"
    optimization: str = "basic"
    tolerance: float | None = None


@dataclass(slots=True)
class StagedUpload:
    """An upload, streamed to disk, unpacked and validated; owned by the job it becomes."""

    directory: Path
    source: str  # a CompileSource value
    model_file: str
    detail: dict[str, Any] = field(default_factory=dict)

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class UploadTooLarge(DomainError):
    status = 413
    code = "payload_too_large"


class CompileQuotaExceeded(DomainError):
    """The organization has as many compile jobs queued or running as it may."""

    status = 429
    code = "compile_quota_exceeded"


ACTIVE_STATUSES = (CompileJob.Status.QUEUED, CompileJob.Status.RUNNING)


# --- Checks ---------------------------------------------------------------------------------


def compile_options_check(
    *, quantize: str, optimization: str, tolerance: float | None
) -> CompileOptions:
    if quantize not in QUANTIZE:
        raise InvalidInput(
            f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}", param="quantize"
        )
    if optimization not in OPTIMIZATION:
        raise InvalidInput(
            f"optimization must be one of {', '.join(OPTIMIZATION)}, not {optimization!r}",
            param="optimization",
        )
    if tolerance is not None and not (tolerance == tolerance and 0 <= tolerance < 1e6):
        raise InvalidInput("tolerance must be a number >= 0", param="tolerance")
    return CompileOptions(quantize=quantize, optimization=optimization, tolerance=tolerance)


def compile_target_check(*, org: Organization, model_name: str, kind: str) -> None:
    """The job may register a version of `model_name`: free, or this organization's, same kind."""
    if not NAME_RE.match(model_name or ""):
        raise InvalidInput(
            "model_name must be 1-120 characters of a-z, 0-9, '.', '_' or '-', starting with a "
            "letter or digit",
            param="model_name",
        )
    if kind not in KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, not {kind!r}", param="kind")
    existing = Model.objects.filter(name=model_name).first()
    if existing is None:
        return
    # Model names are unique platform-wide (they are public names on /v1 too).
    if existing.organization_id != org.id:
        raise Conflict(
            f"the model name {model_name!r} is taken; choose another", param="model_name"
        )
    if existing.kind != kind:
        raise Conflict(
            f"model {model_name!r} is a {existing.kind} model; a new version must be one too",
            param="kind",
        )


def _limits() -> Limits:
    return Limits(
        max_tensor_bytes=min(settings.MANTLE_MAX_UPLOAD_BYTES, Limits().max_tensor_bytes),
        max_total_bytes=settings.MANTLE_MAX_UPLOAD_BYTES * 8,
    )


# --- Quotas ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompileQuota:
    """What an organization may still start: jobs, and bytes of staged uploads."""

    jobs_left: int
    staged_bytes_left: int


def compile_quota_of(org: Organization) -> CompileQuota:
    """Jobs queued or running (checkpoint jobs too) and the uploads staged for them.

    A job's staged upload is deleted when the job ends, so only active jobs hold bytes.
    """
    active = list(
        CompileJob.objects.filter(organization=org, status__in=ACTIVE_STATUSES).values_list(
            "source_detail", flat=True
        )
    )
    staged = sum(int(detail.get("upload_bytes") or 0) for detail in active)
    return CompileQuota(
        jobs_left=settings.MANTLE_COMPILE_MAX_ACTIVE_JOBS - len(active),
        staged_bytes_left=settings.MANTLE_COMPILE_MAX_STAGED_BYTES - staged,
    )


def compile_quota_check(quota: CompileQuota, *, upload_bytes: int = 0) -> None:
    if quota.jobs_left <= 0:
        raise CompileQuotaExceeded(
            f"the organization already has {settings.MANTLE_COMPILE_MAX_ACTIVE_JOBS} compile "
            "jobs queued or running (MANTLE_COMPILE_MAX_ACTIVE_JOBS); wait for one to end"
        )
    if upload_bytes > quota.staged_bytes_left:
        raise UploadTooLarge(
            f"the upload's {upload_bytes} bytes exceed the {max(0, quota.staged_bytes_left)} "
            "bytes this organization may still stage while its jobs run "
            "(MANTLE_COMPILE_MAX_STAGED_BYTES)",
            param="file",
        )


def upload_allowance(quota: CompileQuota) -> tuple[int, str]:
    """How many bytes an upload may send under `quota`, and the setting that says so."""
    if quota.staged_bytes_left < settings.MANTLE_MAX_UPLOAD_BYTES:
        return max(0, quota.staged_bytes_left), "MANTLE_COMPILE_MAX_STAGED_BYTES"
    return settings.MANTLE_MAX_UPLOAD_BYTES, "MANTLE_MAX_UPLOAD_BYTES"


# --- Uploads --------------------------------------------------------------------------------


def upload_stage(
    *,
    stream: IO[bytes],
    source: str = CompileSource.ONNX.value,
    model_file: str = "model.onnx",
    filename: str = "",
    max_bytes: int | None = None,
    limit_name: str = "MANTLE_MAX_UPLOAD_BYTES",
) -> StagedUpload:
    """Stream an upload to the staging area, unpack and validate it.

    The body is an ONNX file, or a .tar(.gz) / .zip archive holding the graph
    with its external data and tokenizer files (or, for `hf-checkpoint`, a
    checkpoint directory). Anything wrong is an InvalidInput naming it, and
    nothing of the upload is left on disk when the error leaves this function.
    """
    limit = settings.MANTLE_MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    if source not in set(CompileSource):
        raise InvalidInput(f"unknown source {source!r}", param="source")
    root = Path(settings.MANTLE_UPLOAD_DIR)
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(12)
    raw = root / f".incoming-{token}"
    staged = StagedUpload(directory=root / f"up_{token}", source=source, model_file=model_file)
    try:
        _stage_into(staged, stream, raw, filename=filename, limit=limit, limit_name=limit_name)
    except CompileError as exc:
        staged.discard()
        error = UploadTooLarge if exc.code == "payload_too_large" else InvalidInput
        raise error(exc.message, param=exc.param or "file", code=exc.code) from exc
    except BaseException:
        staged.discard()
        raise
    finally:
        raw.unlink(missing_ok=True)
        shutil.rmtree(root / f".hoist-{token}", ignore_errors=True)
    return staged


def _stage_into(
    staged: StagedUpload,
    stream: IO[bytes],
    raw: Path,
    *,
    filename: str,
    limit: int,
    limit_name: str = "MANTLE_MAX_UPLOAD_BYTES",
) -> None:
    size = 0
    first = b""
    with raw.open("xb") as out:
        while chunk := stream.read(_CHUNK):
            if not first:
                first = chunk[:1]
            size += len(chunk)
            if size > limit:
                raise CompileError(
                    f"the upload is larger than the {limit} bytes allowed ({limit_name})",
                    code="payload_too_large",
                )
            out.write(chunk)
    if size == 0:
        raise CompileError("the upload is empty", code="invalid_model")
    staged.detail.update({"filename": filename, "upload_bytes": size})
    directory = staged.directory
    directory.mkdir()
    if _looks_like_archive(raw):
        staged.detail["files"] = extract_archive(raw, directory, _limits())
        _hoist_single_directory(directory, raw.with_name(raw.name.replace(".incoming-", ".hoist-")))
    elif staged.source == CompileSource.HF_CHECKPOINT:
        raise CompileError(
            "a Hugging Face checkpoint is uploaded as a .tar, .tar.gz or .zip of its directory",
            code="invalid_archive",
        )
    elif first[0] != ONNX_MAGIC_FIRST_BYTE:
        raise CompileError(
            "the upload is neither an ONNX model file nor a .tar, .tar.gz or .zip archive",
            code="invalid_model",
        )
    else:
        raw.rename(directory / staged.model_file)
        staged.detail["files"] = [staged.model_file]
    if staged.source == CompileSource.ONNX:
        report = validate_onnx(directory, staged.model_file, _limits())
        staged.detail["graph"] = report.as_metrics()
    elif not (directory / "config.json").is_file():
        raise CompileError(
            "the archive holds no config.json: not a Hugging Face checkpoint directory",
            code="invalid_checkpoint",
        )
    else:
        check_checkpoint(directory)


def _looks_like_archive(path: Path) -> bool:
    import tarfile
    import zipfile

    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


def _hoist_single_directory(directory: Path, scratch: Path) -> None:
    """An archive of one directory (`tar czf m.tgz mymodel/`) stands for that directory."""
    entries = list(directory.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        entries[0].rename(scratch)
        directory.rmdir()
        scratch.rename(directory)


# --- Jobs -----------------------------------------------------------------------------------


def compile_job_create(
    *,
    principal: Principal,
    org: Organization,
    model_name: str,
    kind: str,
    source: str,
    source_path: Path,
    model_file: str = "model.onnx",
    owns_source: bool = False,
    source_detail: Mapping[str, Any] | None = None,
    options: CompileOptions | None = None,
) -> CompileJob:
    """Record a job and queue it on the compile queue once the transaction commits."""
    options = options or CompileOptions()
    compile_target_check(org=org, model_name=model_name, kind=kind)
    if source == CompileSource.HF_CHECKPOINT and kind == "tensor":
        raise InvalidInput(
            "a Hugging Face checkpoint compiles to a chat, completion or embedding model; "
            "upload an ONNX graph for a tensor model",
            param="kind",
        )
    upload_bytes = int((source_detail or {}).get("upload_bytes") or 0)
    with transaction.atomic():
        # The organization's row serialises its job creations, so two concurrent
        # requests cannot both take the last job or the last staged bytes.
        Organization.objects.select_for_update().filter(id=org.id).first()
        compile_quota_check(compile_quota_of(org), upload_bytes=upload_bytes)
        job = CompileJob.objects.create(
            organization=org,
            created_by=principal.label,
            model_name=model_name,
            kind=kind,
            source=source,
            source_detail={**dict(source_detail or {}), "path": str(source_path)},
            options={
                "quantize": options.quantize,
                "optimization": options.optimization,
                "tolerance": options.tolerance,
            },
        )
        audit_record(
            principal=principal,
            action="compile_job.created",
            target=job,
            organization=org,
            metadata={"model_name": model_name, "kind": kind, "source": source},
        )
        request = CompileRequest(
            job_id=job.id,
            organization_id=org.id,
            model_name=model_name,
            kind=kind,
            source=source,
            source_path=str(source_path),
            model_file=model_file,
            delete_source=owns_source,
            quantize="" if options.quantize == "none" else options.quantize,
            optimization=options.optimization,
            tolerance=options.tolerance,
            store=settings.MANTLE_ARTIFACT_STORE or str(settings.MANTLE_ARTIFACT_DIR),
        )
        payload = to_payload(request)
        transaction.on_commit(lambda: _enqueue(payload))
    logger.info("compile job %s queued for %s (%s)", job.id, model_name, source)
    return job


def _enqueue(payload: Mapping[str, Any]) -> None:
    # send_task, never an import of the worker's task: the control plane knows
    # compile nodes only through workers/contract.py.
    celery_app.send_task(
        TaskName.COMPILE_RUN.value, args=[dict(payload)], queue=Queue.COMPILE.value
    )


def compile_job_from_upload(
    *,
    principal: Principal,
    org: Organization,
    stream: IO[bytes],
    model_name: str,
    kind: str,
    source: str = CompileSource.ONNX.value,
    model_file: str = "model.onnx",
    filename: str = "",
    options: CompileOptions | None = None,
) -> CompileJob:
    """An uploaded ONNX model (or checkpoint archive) into a queued compile job.

    The one entry point for uploads: checks the target and options first (so a
    bad request stages nothing), streams, unpacks and validates the upload,
    then creates the job, which owns the staged files from then on. On any
    refusal nothing is left in the staging area and no job exists.
    """
    options = options or CompileOptions()
    compile_target_check(org=org, model_name=model_name, kind=kind)
    if not model_file or "/" in model_file or "\\" in model_file or model_file.startswith("."):
        raise InvalidInput(
            "model_file must be a plain file name such as model.onnx", param="model_file"
        )
    # Checked before a byte is staged, and the upload is cut at what the quota leaves;
    # compile_job_create checks again under the organization's lock.
    quota = compile_quota_of(org)
    compile_quota_check(quota)
    limit, limit_name = upload_allowance(quota)
    staged = upload_stage(
        stream=stream,
        source=source,
        model_file=model_file,
        filename=filename,
        max_bytes=limit,
        limit_name=limit_name,
    )
    try:
        return compile_job_create(
            principal=principal,
            org=org,
            model_name=model_name,
            kind=kind,
            source=source,
            source_path=staged.directory,
            model_file=model_file,
            owns_source=True,
            source_detail=staged.detail,
            options=options,
        )
    except BaseException:
        staged.discard()
        raise


def compile_job_from_checkpoint(
    *,
    principal: Principal,
    org: Organization,
    path: str,
    model_name: str,
    kind: str,
    options: CompileOptions | None = None,
) -> CompileJob:
    """A Hugging Face checkpoint directory on the node (under MANTLE_CHECKPOINT_ROOTS)."""
    candidate = Path(path)
    if not candidate.is_absolute() or ".." in candidate.parts:
        raise InvalidInput("path must be an absolute path without '..'", param="path")
    roots = [Path(r).resolve() for r in settings.MANTLE_CHECKPOINT_ROOTS]
    resolved = candidate.resolve()
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise InvalidInput(
            "path is not inside a checkpoint directory this platform allows "
            "(MANTLE_CHECKPOINT_ROOTS); upload the checkpoint as an archive instead",
            param="path",
        )
    if not (resolved / "config.json").is_file():
        raise InvalidInput(
            f"{path} is not a Hugging Face checkpoint directory (no config.json)", param="path"
        )
    try:
        check_checkpoint(resolved)
    except CompileError as exc:
        raise InvalidInput(exc.message, param="path") from exc
    return compile_job_create(
        principal=principal,
        org=org,
        model_name=model_name,
        kind=kind,
        source=CompileSource.HF_CHECKPOINT.value,
        source_path=resolved,
        owns_source=False,
        options=options,
    )


# --- Reads ----------------------------------------------------------------------------------


def compile_jobs_for(org: Organization) -> QuerySet[CompileJob]:
    return CompileJob.objects.filter(organization=org).order_by("-created_at")


def compile_job_get(org: Organization, job_id: str) -> CompileJob:
    job = compile_jobs_for(org).select_related("model_version").filter(id=job_id).first()
    if job is None:
        raise NotFound(f"compile job {job_id!r} not found", param="job_id")
    return job


# --- Reports from compile nodes (control queue) ---------------------------------------------


@transaction.atomic
def compile_job_progress(*, progress: CompileProgress) -> bool:
    """Apply a progress report; False when it is stale (older, or the job already ended)."""
    job = CompileJob.objects.select_for_update().filter(id=progress.job_id).first()
    if job is None:
        logger.warning("progress for unknown compile job %s dropped", progress.job_id)
        return False
    if job.finished or progress.seq <= job.progress_seq:
        return False
    job.steps = [dict(s) for s in progress.steps]
    job.progress_seq = progress.seq
    fields = ["steps", "progress_seq"]
    if job.status == CompileJob.Status.QUEUED:
        job.status = CompileJob.Status.RUNNING
        job.started_at = timezone.now()
        fields += ["status", "started_at"]
    job.save(update_fields=fields)
    return True


@transaction.atomic
def compile_job_finish(*, outcome: CompileOutcome) -> CompileJob | None:
    """Apply a job's outcome once: a success registers its ModelVersion (status ready).

    Idempotent: a redelivered or second outcome for a job that already ended
    changes nothing. A manifest that does not describe a usable artifact fails
    the job instead of registering a broken version.
    """
    job = CompileJob.objects.select_for_update().filter(id=outcome.job_id).first()
    if job is None:
        logger.warning("outcome for unknown compile job %s dropped", outcome.job_id)
        return None
    if job.finished:
        return job
    job.steps = [dict(s) for s in outcome.steps] or job.steps
    job.finished_at = timezone.now()
    job.started_at = job.started_at or job.finished_at
    if outcome.status == CompileStatus.SUCCEEDED and outcome.manifest:
        try:
            job.model_version = _register(job, outcome.manifest)
            job.status = CompileJob.Status.SUCCEEDED
        except InvalidInput as exc:
            job.status = CompileJob.Status.FAILED
            job.error, job.error_code = exc.message, "invalid_artifact"
    else:
        job.status = CompileJob.Status.FAILED
        job.error = outcome.error or "the compile node reported a failure without a reason"
        job.error_code = outcome.error_code or "internal_error"
    job.save()
    logger.info("compile job %s %s %s", job.id, job.status, job.error_code)
    return job


def _register(job: CompileJob, manifest: Mapping[str, Any]) -> ModelVersion:
    for key in ("sha256", "location", "runtime", "kind"):
        if not manifest.get(key):
            raise InvalidInput(f"the compiled artifact's manifest has no {key}")
    if manifest["kind"] != job.kind or manifest["runtime"] != RUNTIME_BY_KIND[job.kind]:
        raise InvalidInput(
            f"the compiled artifact is a {manifest['kind']}/{manifest['runtime']} model, "
            f"the job asked for {job.kind}"
        )
    model = Model.objects.filter(name=job.model_name).first()
    if model is None:
        model = Model.objects.create(
            name=job.model_name,
            organization=job.organization,
            family=str(manifest.get("family") or ""),
            kind=job.kind,
            context_length=int(manifest.get("context_length") or 0),
            licence=str(manifest.get("licence") or ""),
            description=f"Compiled by {job.id}",
        )
    elif model.organization_id != job.organization_id or model.kind != job.kind:
        # Taken between the job's creation and its end.
        raise InvalidInput(f"the model name {job.model_name!r} was taken meanwhile")
    version = model_version_from_manifest(
        model=model, manifest=manifest, runtime=manifest["runtime"]
    )
    for hook in _compiled_hooks:
        hook(model)
    return version


ModelCompiled = Callable[[Model], object]
_compiled_hooks: list[ModelCompiled] = []


def on_model_compiled(hook: ModelCompiled) -> None:
    """Calls `hook(model)` in the transaction that publishes a compiled model's new version.

    Billing registers the operator's default price for compiled models here (without one
    the model is refused at admission until priced): billing imports the catalog, never
    the other way round. Registering the same hook twice keeps one.
    """
    if hook not in _compiled_hooks:
        _compiled_hooks.append(hook)


def compile_jobs_fail_stale(*, older_than_s: int | None = None) -> int:
    """Fail jobs whose node went silent (killed, out of memory): they would never end."""
    age = settings.MANTLE_COMPILE_STALE_S if older_than_s is None else older_than_s
    cutoff = timezone.now() - timedelta(seconds=age)
    stale = CompileJob.objects.filter(
        status__in=[CompileJob.Status.QUEUED, CompileJob.Status.RUNNING]
    ).filter(Q(started_at__lt=cutoff) | Q(started_at__isnull=True, created_at__lt=cutoff))
    count = 0
    for job_id in stale.values_list("id", flat=True):
        outcome = CompileOutcome(
            job_id=job_id,
            status=CompileStatus.FAILED.value,
            steps=(),
            error=f"no word from the compile node for {age} s: it was stopped or ran out of "
            "memory; start the job again",
            error_code="stale",
        )
        job = compile_job_finish(outcome=outcome)
        if job is not None and job.error_code == "stale":
            count += 1
            path = Path(str(job.source_detail.get("path", "")))
            if job.source_detail.get("path") and path.is_relative_to(settings.MANTLE_UPLOAD_DIR):
                shutil.rmtree(path, ignore_errors=True)
    return count
