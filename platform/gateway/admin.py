"""Back-office lists of every organization's batches and files (read-only).

Customer data: nobody adds, changes or deletes batches or files here (a generic form would
bypass the runner's lease and the quotas); staff read them, and follow a batch to its usage
in the usage explorer. Viewing needs the staff roles' `gateway.view_batch` and
`gateway.view_file` (billing/staff_roles.py).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from urllib.parse import urlencode

from django.contrib import admin
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from billing.admin import ReadOnlyAdmin, customer_link
from gateway.models import Batch, File

# The explorer's rollups are hourly: a batch's lines lie in the hours from its creation to
# its end (or now, while it runs).
HOUR = timedelta(hours=1)


def _hour(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:00")


def batch_usage_url(batch: Batch, *, now: datetime | None = None) -> str:
    """The usage explorer filtered to the batch's organization and key over the hours it
    ran. Rollups are per key, model and hour, not per batch: online requests of the same
    key in those hours are counted too; the explorer's batch columns are the batch lines'
    part."""
    ended = (
        batch.completed_at
        or batch.failed_at
        or batch.cancelled_at
        or batch.expired_at
        or now
        or timezone.now()
    )
    query = {
        "org": batch.organization_id,
        "key": batch.api_key_id,
        "start": _hour(batch.created_at),
        "end": _hour(ended + HOUR),
    }
    return f"{reverse('admin:backoffice-usage')}?{urlencode(query)}"


@admin.register(Batch)
class BatchAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "customer",
        "endpoint",
        "status",
        "request_total",
        "request_completed",
        "request_failed",
        "created_at",
        "usage",
    )
    list_filter = ("status", "endpoint")
    search_fields = ("id", "organization__id", "organization__name", "api_key_id")
    list_select_related = ("organization",)
    ordering = ("-created_at", "-id")
    date_hierarchy = "created_at"
    readonly_fields = ("usage",)

    @admin.display(description="customer", ordering="organization__name")
    def customer(self, obj: Batch) -> str:
        return customer_link(obj.organization_id, obj.organization.name)

    @admin.display(description="usage")
    def usage(self, obj: Batch) -> str:
        return format_html('<a href="{}">usage of its key</a>', batch_usage_url(obj))


@admin.register(File)
class FileAdmin(ReadOnlyAdmin):
    list_display = ("id", "customer", "purpose", "filename", "bytes", "created_at", "expires_at")
    list_filter = ("purpose",)
    search_fields = ("id", "organization__id", "organization__name", "filename")
    list_select_related = ("organization",)
    ordering = ("-created_at", "-id")

    @admin.display(description="customer", ordering="organization__name")
    def customer(self, obj: File) -> str:
        return customer_link(obj.organization_id, obj.organization.name)
