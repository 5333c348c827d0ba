"""Request and response shapes of the accounts part of the management API."""

from __future__ import annotations

import re
from datetime import datetime

from ninja import Schema
from pydantic import ConfigDict, Field, field_validator

from accounts.permissions import Role, Scope

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class In(Schema):
    """Inputs refuse unknown fields, so a typo is an error rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


class OrganizationIn(In):
    name: str = Field(min_length=1, max_length=120)
    region: str | None = Field(default=None, max_length=64)


class OrganizationPatch(In):
    name: str = Field(min_length=1, max_length=120)


class OrganizationOut(Schema):
    id: str
    name: str
    region: str
    status: str
    mfa_required: bool = Field(
        description="Owners and admins need an authenticator to reach the organization"
    )
    created_at: datetime


class MemberInvite(In):
    email: str = Field(max_length=254)
    role: Role = Role.DEVELOPER

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        if not _EMAIL.match(value):
            raise ValueError("not a valid email address")
        return value.strip().lower()


class InvitationOut(Schema):
    id: str
    email: str
    role: Role
    status: str = Field(description="pending, accepted, revoked or expired")
    invited_by: str | None
    created_at: datetime
    expires_at: datetime


class MemberPatch(In):
    role: Role


class MemberOut(Schema):
    id: str
    email: str
    full_name: str
    role: Role
    created_at: datetime


class ProjectIn(In):
    name: str = Field(min_length=1, max_length=120)


class ProjectOut(Schema):
    id: str
    name: str
    is_default: bool
    created_at: datetime


class ApiKeyIn(In):
    name: str = Field(min_length=1, max_length=120)
    scopes: list[Scope] = Field(default_factory=lambda: [Scope.INFERENCE], min_length=1)
    expires_at: datetime | None = None
    rpm_limit: int | None = Field(default=None, ge=1, description="requests per minute")
    tpm_limit: int | None = Field(default=None, ge=1, description="tokens per minute")


class ApiKeyOut(Schema):
    id: str
    name: str
    prefix: str
    project_id: str
    scopes: list[str]
    rpm_limit: int | None
    tpm_limit: int | None
    status: str
    created_by: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    monthly_budget: str | None = Field(
        default=None, description="The key's monthly budget (decimal string); null: none"
    )
    budget_mode: str = Field(default="hard", description="hard (refused) or soft (alerts)")
    allowed_models: list[str] = Field(
        default_factory=list, description="Models the key may use; empty: every model"
    )


class ApiKeyCreated(ApiKeyOut):
    secret: str = Field(description="The key itself. Shown once: store it now.")


class AuditEntryOut(Schema):
    id: int
    action: str
    actor: str
    target_type: str
    target_id: str
    ip_address: str | None
    metadata: dict[str, object]
    created_at: datetime


class AuditPageOut(Schema):
    object: str = "list"
    data: list[AuditEntryOut]
    has_more: bool
    next_cursor: str | None = Field(
        description="Pass as `cursor` (with the same filters) for the next, older page"
    )


class MeOut(Schema):
    id: int | None
    email: str | None
    organizations: list[OrganizationOut]


class ErrorDetail(Schema):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorOut(Schema):
    error: ErrorDetail
