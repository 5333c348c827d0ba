"""Management API for organizations, members, projects, API keys and the audit log."""

from __future__ import annotations

from django.http import HttpRequest, StreamingHttpResponse
from django.utils import timezone
from ninja import Router, Status

from accounts import audit_log as audit
from accounts import selectors, services
from accounts.models import ApiKey, AuditLog, Invitation, Membership, Organization
from accounts.permissions import Perm, Role
from accounts.principal import Principal
from accounts.schemas import (
    ApiKeyCreated,
    ApiKeyIn,
    ApiKeyOut,
    AuditEntryOut,
    AuditPageOut,
    InvitationOut,
    MemberInvite,
    MemberOut,
    MemberPatch,
    MeOut,
    OrganizationIn,
    OrganizationOut,
    OrganizationPatch,
    ProjectIn,
    ProjectOut,
)
from core.errors import PermissionDenied

router = Router(tags=["accounts"])

ORG = "/organizations/{organization_id}"


def _principal(request: HttpRequest) -> Principal:
    principal: Principal = request.auth  # type: ignore[attr-defined]
    return principal


@router.get("/me", response=MeOut)
def me(request: HttpRequest) -> MeOut:
    principal = _principal(request)
    orgs = [OrganizationOut.from_orm(o) for o in selectors.organizations_for(principal)]
    user = principal.user
    return MeOut(
        id=user.pk if user else None, email=user.email if user else None, organizations=orgs
    )


# --- Organizations --------------------------------------------------------------------


@router.get("/organizations", response=list[OrganizationOut])
def organization_list(request: HttpRequest) -> list[Organization]:
    return list(selectors.organizations_for(_principal(request)))


@router.post("/organizations", response={201: OrganizationOut})
def organization_create(request: HttpRequest, payload: OrganizationIn) -> Status[Organization]:
    principal = _principal(request)
    if principal.user is None:
        raise PermissionDenied("organizations are created by a signed-in user, not an API key")
    org = services.organization_create(
        principal=principal, name=payload.name, owner=principal.user, region=payload.region
    )
    return Status(201, org)


@router.get(ORG, response=OrganizationOut)
def organization_get(request: HttpRequest, organization_id: str) -> Organization:
    return selectors.organization_for(_principal(request), organization_id, Perm.ORG_VIEW)


@router.patch(ORG, response=OrganizationOut)
def organization_update(
    request: HttpRequest, organization_id: str, payload: OrganizationPatch
) -> Organization:
    principal = _principal(request)
    org = selectors.organization_for(principal, organization_id, Perm.ORG_UPDATE)
    return services.organization_update(principal=principal, org=org, name=payload.name)


# --- Members --------------------------------------------------------------------------------


def _member_out(m: Membership) -> MemberOut:
    return MemberOut(
        id=m.id,
        email=m.user.email,
        full_name=m.user.full_name,
        role=Role(m.role),
        created_at=m.created_at,
    )


@router.get(f"{ORG}/members", response=list[MemberOut])
def member_list(request: HttpRequest, organization_id: str) -> list[MemberOut]:
    org = selectors.organization_for(_principal(request), organization_id, Perm.MEMBERS_VIEW)
    return [_member_out(m) for m in selectors.memberships(org)]


@router.post(f"{ORG}/members", response={201: InvitationOut})
def member_invite(
    request: HttpRequest, organization_id: str, payload: MemberInvite
) -> Status[InvitationOut]:
    """Invites a person: a pending invitation, mailed to them; nobody joins until the
    link in that email is accepted (the link is never part of this reply)."""
    principal = _principal(request)
    org = selectors.organization_for(principal, organization_id, Perm.MEMBERS_INVITE)
    invitation = services.member_invite(
        principal=principal, org=org, email=payload.email, role=payload.role
    )
    return Status(201, _invitation_out(invitation))


def _invitation_out(i: Invitation) -> InvitationOut:
    return InvitationOut(
        id=i.id,
        email=i.email,
        role=Role(i.role),
        status=i.status(),
        invited_by=i.invited_by.email if i.invited_by else None,
        created_at=i.created_at,
        expires_at=i.expires_at,
    )


@router.patch(f"{ORG}/members/{{membership_id}}", response=MemberOut)
def member_change_role(
    request: HttpRequest, organization_id: str, membership_id: str, payload: MemberPatch
) -> MemberOut:
    principal = _principal(request)
    org = selectors.organization_for(principal, organization_id, Perm.MEMBERS_CHANGE_ROLE)
    membership = selectors.membership_get(org, membership_id)
    return _member_out(
        services.member_change_role(principal=principal, membership=membership, role=payload.role)
    )


@router.delete(f"{ORG}/members/{{membership_id}}", response={204: None})
def member_remove(request: HttpRequest, organization_id: str, membership_id: str) -> Status[None]:
    principal = _principal(request)
    org = selectors.organization_for(principal, organization_id, Perm.MEMBERS_REMOVE)
    services.member_remove(
        principal=principal, membership=selectors.membership_get(org, membership_id)
    )
    return Status(204, None)


# --- Projects -------------------------------------------------------------------------------


@router.get(f"{ORG}/projects", response=list[ProjectOut])
def project_list(request: HttpRequest, organization_id: str) -> list[object]:
    org = selectors.organization_for(_principal(request), organization_id, Perm.PROJECTS_VIEW)
    return list(selectors.projects(org))


@router.post(f"{ORG}/projects", response={201: ProjectOut})
def project_create(
    request: HttpRequest, organization_id: str, payload: ProjectIn
) -> Status[object]:
    principal = _principal(request)
    org = selectors.organization_for(principal, organization_id, Perm.PROJECTS_MANAGE)
    return Status(201, services.project_create(principal=principal, org=org, name=payload.name))


@router.get(f"{ORG}/projects/{{project_id}}", response=ProjectOut)
def project_get(request: HttpRequest, organization_id: str, project_id: str) -> object:
    org = selectors.organization_for(_principal(request), organization_id, Perm.PROJECTS_VIEW)
    return selectors.project_get(org, project_id)


@router.patch(f"{ORG}/projects/{{project_id}}", response=ProjectOut)
def project_update(
    request: HttpRequest, organization_id: str, project_id: str, payload: ProjectIn
) -> object:
    principal = _principal(request)
    org = selectors.organization_for(principal, organization_id, Perm.PROJECTS_MANAGE)
    project = selectors.project_get(org, project_id)
    return services.project_update(principal=principal, project=project, name=payload.name)


# --- API keys ---------------------------------------------------------------------------------


def _key_out(key: ApiKey, cls: type[ApiKeyOut] = ApiKeyOut, **extra: str) -> ApiKeyOut:
    if key.revoked_at is not None:
        status = "revoked"
    elif key.expires_at is not None and key.expires_at <= timezone.now():
        status = "expired"
    else:
        status = "active"
    return cls(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        project_id=key.project_id,
        scopes=list(key.scopes),
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        status=status,
        created_by=key.created_by.email if key.created_by else None,
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        last_used_at=key.last_used_at,
        monthly_budget=None if key.monthly_budget is None else str(key.monthly_budget),
        budget_mode=key.budget_mode,
        allowed_models=list(key.allowed_models or ()),
        **extra,
    )


@router.get(f"{ORG}/api-keys", response=list[ApiKeyOut])
def api_key_list(
    request: HttpRequest, organization_id: str, project_id: str | None = None
) -> list[ApiKeyOut]:
    org = selectors.organization_for(_principal(request), organization_id, Perm.KEYS_VIEW)
    project = selectors.project_get(org, project_id) if project_id else None
    return [_key_out(k) for k in selectors.api_keys(org, project)]


@router.post(f"{ORG}/projects/{{project_id}}/api-keys", response={201: ApiKeyCreated})
def api_key_create(
    request: HttpRequest, organization_id: str, project_id: str, payload: ApiKeyIn
) -> Status[ApiKeyOut]:
    principal = _principal(request)
    org = selectors.organization_for(principal, organization_id, Perm.KEYS_CREATE)
    project = selectors.project_get(org, project_id)
    key, secret = services.api_key_create(
        principal=principal,
        project=project,
        name=payload.name,
        scopes=[s.value for s in payload.scopes],
        expires_at=payload.expires_at,
        rpm_limit=payload.rpm_limit,
        tpm_limit=payload.tpm_limit,
    )
    return Status(201, _key_out(key, ApiKeyCreated, secret=secret))


@router.get(f"{ORG}/api-keys/{{key_id}}", response=ApiKeyOut)
def api_key_get(request: HttpRequest, organization_id: str, key_id: str) -> ApiKeyOut:
    org = selectors.organization_for(_principal(request), organization_id, Perm.KEYS_VIEW)
    return _key_out(selectors.api_key_get(org, key_id))


@router.post(f"{ORG}/api-keys/{{key_id}}/revoke", response=ApiKeyOut)
def api_key_revoke(request: HttpRequest, organization_id: str, key_id: str) -> ApiKeyOut:
    principal = _principal(request)
    org = selectors.organization_for(principal, organization_id, Perm.KEYS_REVOKE)
    key = services.api_key_revoke(principal=principal, key=selectors.api_key_get(org, key_id))
    return _key_out(key)


# --- Audit log ------------------------------------------------------------------------------


def _audit_out(e: AuditLog) -> AuditEntryOut:
    return AuditEntryOut(
        id=e.id,
        action=e.action,
        actor=e.actor_label,
        target_type=e.target_type,
        target_id=e.target_id,
        ip_address=e.ip_address,
        metadata=e.metadata,
        created_at=e.created_at,
    )


_AUDIT_PARAMS = [
    ("actor", "An actor: a person's email, `api-key:<key id>` or `system` (any case)"),
    ("action", "An action, e.g. `api_key.created`"),
    ("target_type", "The target's type, e.g. `apikey`, `membership`, `organization`"),
    ("target_id", "The target's id"),
    ("since", "From this time (inclusive): ISO 8601 or Unix seconds; no offset: UTC"),
    ("until", "Before this time (exclusive): ISO 8601 or Unix seconds"),
]
_AUDIT_OPENAPI = {
    "parameters": [
        {
            "in": "query",
            "name": n,
            "required": False,
            "schema": {"type": "string"},
            "description": d,
        }
        for n, d in _AUDIT_PARAMS
    ]
}


def _audit_params(request: HttpRequest) -> dict[str, str]:
    return {name: request.GET.get(name, "") for name in request.GET}


@router.get(
    f"{ORG}/audit-log",
    response=AuditPageOut,
    openapi_extra={
        "parameters": [
            *_AUDIT_OPENAPI["parameters"],
            {
                "in": "query",
                "name": "limit",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": audit.MAX_PAGE_SIZE},
                "description": f"Entries per page (default {audit.DEFAULT_PAGE_SIZE})",
            },
            {
                "in": "query",
                "name": "cursor",
                "required": False,
                "schema": {"type": "string"},
                "description": "The next_cursor of the previous page",
            },
        ]
    },
)
def audit_log(request: HttpRequest, organization_id: str) -> AuditPageOut:
    """The organization's audit log, newest first, filtered and paged by cursor."""
    org = selectors.organization_for(_principal(request), organization_id, Perm.AUDIT_VIEW)
    page = audit.audit_page(org, audit.parse_query(_audit_params(request)))
    return AuditPageOut(
        data=[_audit_out(e) for e in page.entries],
        has_more=page.next_cursor is not None,
        next_cursor=page.next_cursor,
    )


@router.get(f"{ORG}/audit-log.csv", openapi_extra=_AUDIT_OPENAPI)
def audit_log_csv(request: HttpRequest, organization_id: str) -> StreamingHttpResponse:
    """Every entry that matches the filters (no paging), newest first, as CSV."""
    org = selectors.organization_for(_principal(request), organization_id, Perm.AUDIT_VIEW)
    query = audit.parse_query({k: v for k, v in _audit_params(request).items() if k != "cursor"})
    return audit.audit_csv_response(org, query)
