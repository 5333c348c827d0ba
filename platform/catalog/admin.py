"""Back-office lists of the catalog: models, versions, pools and endpoints (read-only)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from unfold.admin import ModelAdmin

from catalog.models import AcceleratorPool, Endpoint, Model, ModelVersion


class ReadOnlyAdmin(ModelAdmin):
    list_per_page = 50

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Endpoint)
class EndpointAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "name",
        "organization",
        "model_version",
        "pool",
        "status",
        "rpm_limit",
        "tpm_limit",
    )
    list_filter = ("status", "pool")
    search_fields = ("id", "name", "organization__id", "organization__name")
    list_select_related = ("organization", "model_version__model", "pool")


@admin.register(Model)
class CatalogModelAdmin(ReadOnlyAdmin):
    list_display = ("name", "kind", "family", "context_length", "licence", "organization")
    list_filter = ("kind",)
    search_fields = ("name", "family")


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = ("id", "model", "version", "runtime", "status", "size_bytes", "created_at")
    list_filter = ("status", "runtime")
    search_fields = ("id", "model__name", "sha256")
    list_select_related = ("model",)
    exclude = ("manifest", "chat_template")


@admin.register(AcceleratorPool)
class AcceleratorPoolAdmin(ReadOnlyAdmin):
    list_display = ("name", "region", "providers", "description")
    search_fields = ("name", "region")
