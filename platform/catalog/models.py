"""Models, model versions (content-addressed artifacts), accelerator pools and endpoints."""

from __future__ import annotations

from typing import ClassVar

from django.db import models
from django.db.models import Q

from accounts.models import Organization
from core import ids
from workers.contract import Runtime, inference_queue


class Model(models.Model):
    class Kind(models.TextChoices):
        CHAT = "chat"
        COMPLETION = "completion"
        EMBEDDING = "embedding"
        TENSOR = "tensor"

    name = models.CharField(max_length=120, unique=True)
    family = models.CharField(max_length=64, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    context_length = models.PositiveIntegerField()
    licence = models.CharField(max_length=64, blank=True)
    description = models.TextField(blank=True)
    # None: a platform model, visible to every organization.
    organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.CASCADE, related_name="models"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        READY = "ready"
        FAILED = "failed"
        RETIRED = "retired"

    id = models.CharField(
        primary_key=True, max_length=40, default=ids.new_model_version_id, editable=False
    )
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    runtime = models.CharField(max_length=32, choices=[(r.value, r.value) for r in Runtime])
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField(default=0)
    location = models.CharField(max_length=500)
    tokenizer_file = models.CharField(max_length=200, blank=True)
    chat_template = models.TextField(blank=True)
    manifest = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.READY)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["model", "version"], name="uniq_model_version"),
            models.UniqueConstraint(fields=["model", "sha256"], name="uniq_model_artifact"),
        ]

    def __str__(self) -> str:
        return f"{self.model.name} v{self.version}"


class AcceleratorPool(models.Model):
    """Worker nodes that share hardware, a region and a queue (`inference.<name>`)."""

    name = models.SlugField(max_length=64, unique=True)
    region = models.CharField(max_length=64)
    # ONNX Runtime execution providers in order of preference; CPU is always the last resort.
    providers = models.JSONField(default=list)
    description = models.CharField(max_length=200, blank=True)

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return inference_queue(self.name)


class Endpoint(models.Model):
    """One model version served on one pool, addressed by id (or a public name)."""

    class Status(models.TextChoices):
        ACTIVE = "active"
        PAUSED = "paused"

    id = models.CharField(
        primary_key=True, max_length=40, default=ids.new_endpoint_id, editable=False
    )
    # None: a public endpoint that every organization may call by its name.
    organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.CASCADE, related_name="endpoints"
    )
    name = models.CharField(max_length=120)
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="endpoints"
    )
    pool = models.ForeignKey(AcceleratorPool, on_delete=models.PROTECT, related_name="endpoints")
    rpm_limit = models.PositiveIntegerField(default=600)
    tpm_limit = models.PositiveBigIntegerField(default=1_000_000)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    # What a rollback returns to: the version served before the last switch.
    previous_model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["name"], condition=Q(organization__isnull=True), name="uniq_public_name"
            ),
            models.UniqueConstraint(
                fields=["organization", "name"],
                condition=Q(organization__isnull=False),
                name="uniq_endpoint_name_per_org",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"


class EndpointRevision(models.Model):
    """Which version an endpoint served from when, and who switched it (its rollout history)."""

    class Action(models.TextChoices):
        CREATED = "created"
        ROLLOUT = "rollout"
        ROLLBACK = "rollback"

    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    # RESTRICT, not PROTECT: deleting the endpoint (or its organization) takes its history along.
    model_version = models.ForeignKey(ModelVersion, on_delete=models.RESTRICT, related_name="+")
    action = models.CharField(max_length=16, choices=Action.choices)
    created_by = models.CharField(max_length=254, blank=True)  # the principal's label
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["endpoint", "number"], name="uniq_endpoint_revision"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint_id} #{self.number}"


def new_compile_job_id() -> str:
    return ids.new_id("cj_")


class CompileJob(models.Model):
    """Import and compile of one model (an ONNX upload or a checkpoint) on a compile node.

    The compile node never writes the database: it reports every step and the
    outcome as tasks on the `control` queue (catalog/tasks.py), which update
    this row. `steps` is the ordered list of step records (name, status,
    started_at, finished_at, duration_s, log, metrics) as the node reported them.
    """

    # The values of workers.contract's CompileStatus and CompileSource (a test keeps them equal).
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    class Source(models.TextChoices):
        ONNX = "onnx"
        HF_CHECKPOINT = "hf-checkpoint"

    id = models.CharField(
        primary_key=True, max_length=40, default=new_compile_job_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="compile_jobs"
    )
    created_by = models.CharField(max_length=254, blank=True)  # the principal's label
    model_name = models.CharField(max_length=120)
    kind = models.CharField(max_length=16, choices=Model.Kind.choices)
    source = models.CharField(max_length=16, choices=Source.choices)
    # What the job starts from: file names, sizes and digests of an upload, or a node path.
    source_detail = models.JSONField(default=dict)
    options = models.JSONField(default=dict)  # quantize, optimization, tolerance
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    steps = models.JSONField(default=list)
    progress_seq = models.PositiveBigIntegerField(default=0)
    error = models.TextField(blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    model_version = models.ForeignKey(
        ModelVersion,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="compile_jobs",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes: ClassVar = [
            models.Index(fields=["organization", "-created_at"], name="compile_job_org_created"),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.model_name}, {self.status})"

    @property
    def finished(self) -> bool:
        return self.status in (self.Status.SUCCEEDED, self.Status.FAILED)
