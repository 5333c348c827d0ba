"""Back-office lists of accounts rows (secrets are never stored, so never shown).

Organizations, members, projects and keys are read-only here: a suspension goes through
accounts.services (it rewrites the keys' cache), from the customer page. Only superusers
edit users, to give staff their role (a Group).
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.admin import GroupAdmin as BaseGroupAdmin
from django.contrib.auth.models import Group
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django_otp.plugins.otp_static.models import StaticDevice
from django_otp.plugins.otp_totp.models import TOTPDevice
from unfold.admin import ModelAdmin

from accounts.models import (
    ApiKey,
    AuditLog,
    Membership,
    Organization,
    Project,
    SsoConnection,
    SsoDomain,
    User,
)
from accounts.principal import Principal
from accounts.sso import sso_domain_mark_verified
from accounts.two_factor import two_factor_reset
from core.errors import DomainError


class ReadOnlyAdmin(ModelAdmin):
    list_per_page = 50
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _customer(org: Organization) -> str:
    url = reverse("admin:backoffice-customer", args=[org.id])
    return format_html('<a href="{}">{}</a>', url, org.name)


admin.site.unregister(Group)
# Two-factor devices change only through enrolment and the reset action below: a device
# added by hand would be a second factor its owner never saw.
admin.site.unregister(TOTPDevice)
admin.site.unregister(StaticDevice)


@admin.register(Group)
class GroupAdmin(BaseGroupAdmin, ModelAdmin):
    """The staff roles ("billing admin", "support"); see billing/staff_roles.py."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_superuser)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_superuser)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_superuser)


@admin.register(User)
class UserAdmin(ModelAdmin):
    list_display = ("email", "full_name", "is_staff", "is_superuser", "is_active", "date_joined")
    list_filter = ("is_staff", "is_superuser", "is_active", "groups")
    search_fields = ("email", "full_name")
    fields = (
        "email",
        "full_name",
        "is_active",
        "is_staff",
        "is_superuser",
        "groups",
        "date_joined",
        "last_login",
    )
    readonly_fields = ("date_joined", "last_login")
    filter_horizontal = ("groups",)

    actions = ("reset_two_factor",)

    @admin.action(
        description="Reset two-factor devices (lost phone: they enrol again)",
        permissions=["change"],
    )
    def reset_two_factor(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        assert isinstance(request.user, User)
        principal = Principal(user=request.user, ip_address=request.META.get("REMOTE_ADDR"))
        for user in queryset:
            two_factor_reset(principal=principal, user=user)
        self.message_user(request, f"Two-factor devices reset for {queryset.count()} user(s).")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # people sign up or are invited through the console

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_superuser)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Organization)
class OrganizationAdmin(ReadOnlyAdmin):
    list_display = ("customer", "id", "region", "status", "created_at")
    search_fields = ("id", "name")
    list_filter = ("status", "region")
    ordering = ("name",)

    @admin.display(description="organization", ordering="name")
    def customer(self, obj: Organization) -> str:
        return _customer(obj)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # One page per customer: members, keys, money, usage, and the suspend action.
        return HttpResponseRedirect(reverse("admin:backoffice-customer", args=[object_id]))


@admin.register(Membership)
class MembershipAdmin(ReadOnlyAdmin):
    list_display = ("user", "organization", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__email", "organization__id", "organization__name")
    list_select_related = ("user", "organization")


@admin.register(Project)
class ProjectAdmin(ReadOnlyAdmin):
    list_display = ("id", "name", "organization", "is_default", "rpm_limit", "tpm_limit")
    search_fields = ("id", "name", "organization__id", "organization__name")
    list_select_related = ("organization",)


@admin.register(ApiKey)
class ApiKeyAdmin(ReadOnlyAdmin):
    list_display = ("id", "prefix", "name", "organization", "project", "status", "last_used_at")
    search_fields = ("id", "prefix", "organization__id", "organization__name")
    list_select_related = ("organization", "project")
    exclude = ("digest",)

    @admin.display(description="status")
    def status(self, obj: ApiKey) -> str:
        if obj.revoked_at is not None:
            return "revoked"
        if obj.expires_at is not None and obj.expires_at <= timezone.now():
            return "expired"
        return "active"


@admin.register(AuditLog)
class AuditLogAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "organization",
        "actor_label",
        "action",
        "target_type",
        "target_id",
        "reason",
        "ip_address",
    )
    list_filter = ("action",)
    search_fields = ("organization__id", "actor_label", "target_id", "action")
    list_select_related = ("organization",)
    ordering = ("-created_at", "-id")

    @admin.display(description="reason")
    def reason(self, obj: AuditLog) -> str:
        return str(obj.metadata.get("reason", "")) if isinstance(obj.metadata, dict) else ""


@admin.register(SsoConnection)
class SsoConnectionAdmin(ReadOnlyAdmin):
    """Organizations' identity providers; the sealed client secret is never shown."""

    list_display = ("organization", "issuer", "client_id", "enabled", "sso_required", "updated_at")
    list_filter = ("enabled", "sso_required")
    search_fields = ("organization__id", "organization__name", "issuer")
    list_select_related = ("organization",)
    exclude = ("client_secret_sealed",)


@admin.register(SsoDomain)
class SsoDomainAdmin(ReadOnlyAdmin):
    """Single sign-on domains. An operator who checked a customer's ownership another way
    (DNS the customer cannot edit, a support ticket from the domain's mailbox) verifies it
    here: superusers only, audited with their name (accounts/sso.py)."""

    list_display = ("domain", "organization", "verified_at", "verified_by", "created_at")
    list_filter = ("verified_by",)
    search_fields = ("domain", "connection__organization__id", "connection__organization__name")
    list_select_related = ("connection__organization",)
    actions = ("mark_verified",)

    @admin.display(description="organization")
    def organization(self, obj: SsoDomain) -> str:
        return _customer(obj.connection.organization)

    @admin.action(
        description="Mark verified (ownership checked by an operator)", permissions=["verify"]
    )
    def mark_verified(self, request: HttpRequest, queryset: QuerySet[SsoDomain]) -> None:
        assert isinstance(request.user, User)
        principal = Principal(user=request.user, ip_address=request.META.get("REMOTE_ADDR"))
        done = 0
        for domain in queryset.select_related("connection__organization"):
            try:
                sso_domain_mark_verified(principal=principal, domain=domain)
            except DomainError as exc:
                self.message_user(request, f"{domain.domain}: {exc.message}", messages.ERROR)
            else:
                done += 1
        self.message_user(request, f"{done} domain(s) verified.")

    def has_verify_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.is_superuser)
