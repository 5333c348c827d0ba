"""What the gateway keeps in the database: stored responses of the Responses API."""

from __future__ import annotations

from typing import ClassVar

from django.db import models

from accounts.models import Organization


class StoredResponse(models.Model):
    """A response created with `store` (the default), readable by its organization until
    `expires_at` (MANTLE_RESPONSES_RETENTION_DAYS after creation; a control task deletes
    it then). `input_items` are the conversation it answered, a previous response's
    included, in the Responses API's item shapes with their ids; `response` is the
    Response object as it was returned. All three are JSON text as `json.dumps` writes it
    (ASCII, escapes kept), not jsonb: PostgreSQL's jsonb refuses the NUL character, which a
    client may send and must get back as sent."""

    id = models.CharField(primary_key=True, max_length=64, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="stored_responses"
    )
    # Who created it (for audit; keys and projects may go, the record stays theirs).
    project_id = models.CharField(max_length=40)
    api_key_id = models.CharField(max_length=40)
    model = models.CharField(max_length=256)
    input_items_json = models.TextField()
    output_json = models.TextField()
    response_json = models.TextField()
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        indexes: ClassVar = [models.Index(fields=["expires_at"], name="stored_response_expiry")]

    def __str__(self) -> str:
        return self.id


class File(models.Model):
    """A file of the Files API: its bytes live in the file store (gateway/files.py, an
    fsspec location: a local directory by default, object storage in production) under
    `location`; this row is its metadata and what the organization's quota counts.

    `purpose` is what the customer uploaded it for (`batch`, `user_data`) or what the
    platform wrote (`batch_output`). `expires_at` (None: kept until deleted) is when the
    hourly control task deletes the bytes and the row."""

    id = models.CharField(primary_key=True, max_length=64, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="files")
    # Who created it; empty for a file the platform wrote (a batch's output).
    project_id = models.CharField(max_length=40, blank=True, default="")
    api_key_id = models.CharField(max_length=40, blank=True, default="")
    purpose = models.CharField(max_length=32)
    filename = models.CharField(max_length=255)
    bytes = models.BigIntegerField()
    location = models.CharField(max_length=512)
    status = models.CharField(max_length=16, default="processed")
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes: ClassVar = [
            models.Index(fields=["organization", "created_at"], name="file_org_created"),
            models.Index(fields=["expires_at"], name="file_expiry"),
        ]

    def __str__(self) -> str:
        return self.id


class Batch(models.Model):
    """A batch of the Batch API: the lines of `input_file_id`, each run as a request to
    `endpoint` in the batch class of work (docs/batches.md).

    A runner (`manage.py run_batches`) holds a batch while `lease_until` is in the future
    and renews it; a runner that dies leaves the lease to expire and another one resumes
    from the lines already stored (`BatchLine`). `model_tokens` is the batch's estimate of
    enqueued tokens per model (a JSON object), what the organization's batch queue limit
    counts while the batch is validating or in progress."""

    id = models.CharField(primary_key=True, max_length=64, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="batches")
    project_id = models.CharField(max_length=40)
    api_key_id = models.CharField(max_length=40)
    endpoint = models.CharField(max_length=64)
    input_file_id = models.CharField(max_length=64)
    output_file_id = models.CharField(max_length=64, blank=True, default="")
    error_file_id = models.CharField(max_length=64, blank=True, default="")
    completion_window = models.CharField(max_length=16, default="24h")
    status = models.CharField(max_length=16, default="validating")
    metadata_json = models.TextField(default="null")
    errors_json = models.TextField(default="null")
    model_tokens_json = models.TextField(default="{}")
    request_total = models.IntegerField(default=0)
    request_completed = models.IntegerField(default=0)
    request_failed = models.IntegerField(default=0)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    runner = models.CharField(max_length=128, blank=True, default="")
    lease_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes: ClassVar = [
            models.Index(fields=["organization", "created_at"], name="batch_org_created"),
            models.Index(fields=["status", "lease_until"], name="batch_status_lease"),
        ]

    def __str__(self) -> str:
        return self.id


class BatchLine(models.Model):
    """One finished line of a batch, stored the moment it finished: the line's output
    object as the output or error file will hold it. One row per line number (the unique
    constraint is what makes a line appear exactly once); the rows are written into the
    output and error files when the batch finalizes, then deleted."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    line = models.IntegerField()
    ok = models.BooleanField()
    output_json = models.TextField()

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(fields=["batch", "line"], name="batch_line_once")
        ]

    def __str__(self) -> str:
        return f"{self.batch_id}:{self.line}"
