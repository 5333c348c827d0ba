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
