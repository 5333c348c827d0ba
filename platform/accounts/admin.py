"""Django admin registrations for accounts (secrets are never stored, so never shown)."""

from __future__ import annotations

from django.contrib import admin

from accounts.models import ApiKey, AuditLog, Membership, Organization, Project, User


@admin.register(User)
class UserAdmin(admin.ModelAdmin):
    list_display = ("email", "full_name", "is_staff", "is_active", "date_joined")
    search_fields = ("email", "full_name")
    exclude = ("password",)


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "region", "status", "created_at")
    search_fields = ("id", "name")
    list_filter = ("status", "region")


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "organization", "role", "created_at")
    list_filter = ("role",)


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "organization", "is_default")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("id", "prefix", "name", "organization", "project", "revoked_at")
    exclude = ("digest",)
    readonly_fields = ("prefix", "created_at", "last_used_at")


@admin.register(AuditLog)
class AuditLogAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "organization",
        "actor_label",
        "action",
        "target_type",
        "target_id",
        "ip_address",
    )
    list_filter = ("action",)

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: object, obj: object = None) -> bool:
        return False
