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


class Provider(models.Model):
    """A connection to an upstream model provider (docs/providers.md): OpenAI, an Azure
    OpenAI resource, or any OpenAI-compatible server. The operator's (organization None,
    usable by any endpoint) or an organization's own (its own keys, usable only by its own
    endpoints, where the operator allows it). The credential is stored encrypted
    (`core.secretbox`) and never read back through any interface."""

    class Kind(models.TextChoices):
        OPENAI = "openai"
        AZURE_OPENAI = "azure-openai"
        OPENAI_COMPATIBLE = "openai-compatible"

    id = models.CharField(
        primary_key=True, max_length=40, default=ids.new_provider_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.CASCADE, related_name="providers"
    )
    name = models.CharField(max_length=120)
    kind = models.CharField(max_length=24, choices=Kind.choices)
    # OpenAI and compatible servers: the API root (https://api.openai.com/v1); Azure: the
    # resource endpoint (https://<resource>.openai.azure.com).
    base_url = models.URLField(max_length=500)
    api_version = models.CharField(max_length=40, blank=True)  # Azure only
    credential_encrypted = models.TextField(blank=True)
    connect_timeout_s = models.FloatField(default=5.0)
    # Until the response's headers (a non-streamed answer: until its whole body).
    first_byte_timeout_s = models.FloatField(default=30.0)
    max_concurrency = models.PositiveIntegerField(default=64)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["name"],
                condition=Q(organization__isnull=True),
                name="uniq_operator_provider",
            ),
            models.UniqueConstraint(
                fields=["organization", "name"],
                condition=Q(organization__isnull=False),
                name="uniq_provider_name_per_org",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"


class RouteTarget(models.Model):
    """Where an endpoint's requests may run (docs/providers.md): its own pool, or a model
    of a provider. An endpoint with no targets runs on its pool only. Targets are tried by
    `position`, lowest first; targets of one position share its traffic by `weight`; the
    next position is the fallback. Costs are what the provider charges per token (cost of
    goods, in the currency per token, as the price book's unit prices)."""

    class Kind(models.TextChoices):
        POOL = "pool"
        PROVIDER = "provider"

    id = models.CharField(
        primary_key=True, max_length=40, default=ids.new_route_target_id, editable=False
    )
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="targets")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    provider = models.ForeignKey(
        Provider, null=True, blank=True, on_delete=models.PROTECT, related_name="targets"
    )
    # The provider's model name, or for Azure OpenAI the deployment's name.
    upstream_model = models.CharField(max_length=200, blank=True)
    position = models.PositiveSmallIntegerField(default=0)
    weight = models.PositiveIntegerField(default=1)
    cost_input = models.DecimalField(max_digits=20, decimal_places=9, default=0)
    cost_output = models.DecimalField(max_digits=20, decimal_places=9, default=0)
    cost_cached_input = models.DecimalField(max_digits=20, decimal_places=9, default=0)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering: ClassVar = ["position", "created_at"]
        constraints: ClassVar = [
            models.CheckConstraint(
                condition=Q(kind="pool", provider__isnull=True)
                | Q(kind="provider", provider__isnull=False),
                name="route_target_kind_provider",
            ),
        ]

    def __str__(self) -> str:
        if self.kind == self.Kind.POOL:
            return f"pool of {self.endpoint_id}"
        return f"{self.provider_id}:{self.upstream_model}"
