"""Every management API operation, by role, by action, in the own or another organization."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import transaction
from django.test import Client

from accounts.models import ApiKey, AuditLog, Membership, Organization, Project
from accounts.permissions import Perm, Role, role_allows
from accounts.principal import SYSTEM
from billing.invoicing import invoice_finalize, invoice_refresh_draft
from billing.models import Budget, Invoice
from catalog.models import CompileJob, Endpoint, Provider, RouteTarget
from catalog.services import endpoint_create, endpoint_rollout
from config.api import api
from tests.billing.factories import CHAT, at, price_book, staff_principal, usage
from tests.conftest import OrgWorld, build_world
from tests.factories import (
    UNSERVED_ENCODER,
    add_member,
    default_project,
    make_api_key,
    make_model_version,
    make_pool,
)

pytestmark = pytest.mark.django_db

ADMIN_KEY = "admin-key"  # an admin-scoped API key made by the owner: acts as an admin
PRINCIPALS = [*(r.value for r in Role), ADMIN_KEY]
USER_ONLY = "user-only"  # any signed-in user, but no API key


@dataclass(frozen=True)
class Op:
    method: str
    path: str  # with ninja's parameter names; {organization_id} etc. filled per case
    perm: Perm | str | None  # None: any principal
    ok: int
    body: dict[str, Any] | None = None
    # People are managed by a signed-in person only: an admin key gets 403 even where its
    # role would allow it (checked after the ids are looked up, so another organization's
    # ids are still 404).
    person_only: bool = False
    query: str = ""  # appended to the path when called
    # The usage API: a key with the read-usage scope reads it too (any other key is 403).
    read_usage: bool = False


ORG = "/organizations/{organization_id}"
# Marks the upload operation: query parameters, and a body that is not an ONNX file.
RAW_UPLOAD = {"raw": True}
UPLOAD_QUERY = "?model_name=m&kind=embedding"
USAGE_QUERY = "?start_time=2026-09-01T00:00:00Z&end_time=2026-10-01T00:00:00Z&group_by=model"
OPS = [
    Op("get", "/me", None, 200),
    Op("get", "/organizations", None, 200),
    Op("post", "/organizations", USER_ONLY, 201, {"name": "Spin-off"}),
    Op("get", ORG, Perm.ORG_VIEW, 200),
    Op("patch", ORG, Perm.ORG_UPDATE, 200, {"name": "Renamed"}),
    Op("get", f"{ORG}/members", Perm.MEMBERS_VIEW, 200),
    Op(
        "post",
        f"{ORG}/members",
        Perm.MEMBERS_INVITE,
        201,
        {"email": "n@example.com"},
        person_only=True,
    ),
    Op(
        "patch",
        f"{ORG}/members/{{membership_id}}",
        Perm.MEMBERS_CHANGE_ROLE,
        200,
        {"role": "viewer"},
        person_only=True,
    ),
    Op(
        "delete",
        f"{ORG}/members/{{membership_id}}",
        Perm.MEMBERS_REMOVE,
        204,
        person_only=True,
    ),
    Op("get", f"{ORG}/projects", Perm.PROJECTS_VIEW, 200),
    Op("post", f"{ORG}/projects", Perm.PROJECTS_MANAGE, 201, {"name": "Second"}),
    Op("get", f"{ORG}/projects/{{project_id}}", Perm.PROJECTS_VIEW, 200),
    Op("patch", f"{ORG}/projects/{{project_id}}", Perm.PROJECTS_MANAGE, 200, {"name": "Third"}),
    Op("post", f"{ORG}/projects/{{project_id}}/api-keys", Perm.KEYS_CREATE, 201, {"name": "ci"}),
    Op("get", f"{ORG}/api-keys", Perm.KEYS_VIEW, 200),
    Op("get", f"{ORG}/api-keys/{{key_id}}", Perm.KEYS_VIEW, 200),
    Op("post", f"{ORG}/api-keys/{{key_id}}/revoke", Perm.KEYS_REVOKE, 200),
    Op("get", f"{ORG}/api-keys/{{key_id}}/controls", Perm.KEYS_VIEW, 200),
    # The allowlist alone (the budget unchanged) needs keys.create; a budget, billing.manage too.
    Op(
        "put",
        f"{ORG}/api-keys/{{key_id}}/controls",
        Perm.KEYS_CREATE,
        200,
        {"allowed_models": [], "budget_mode": "hard"},
    ),
    Op("get", f"{ORG}/audit-log", Perm.AUDIT_VIEW, 200),
    Op("get", f"{ORG}/audit-log.csv", Perm.AUDIT_VIEW, 200),
    Op("get", f"{ORG}/billing/balance", Perm.BILLING_VIEW, 200),
    Op("get", f"{ORG}/billing/credits", Perm.BILLING_VIEW, 200),
    Op("get", f"{ORG}/billing/invoices", Perm.BILLING_VIEW, 200),
    Op("get", f"{ORG}/billing/invoices/{{invoice_id}}", Perm.BILLING_VIEW, 200),
    Op("get", f"{ORG}/billing/invoices/{{invoice_id}}/pdf", Perm.BILLING_VIEW, 200),
    Op("get", f"{ORG}/billing/details", Perm.BILLING_VIEW, 200),
    Op(
        "put",
        f"{ORG}/billing/details",
        Perm.BILLING_MANAGE,
        200,
        {"legal_name": "Acme GmbH", "address": "Hauptstrasse 5", "country": "DE"},
    ),
    Op("get", f"{ORG}/billing/budgets", Perm.BILLING_VIEW, 200),
    Op(
        "put",
        f"{ORG}/billing/budgets",
        Perm.BILLING_MANAGE,
        200,
        {"budgets": [{"monthly_amount": "10"}]},
    ),
    Op("get", f"{ORG}/billing/alerts", Perm.BILLING_VIEW, 200),
    Op("get", f"{ORG}/usage", Perm.BILLING_VIEW, 200, query=USAGE_QUERY, read_usage=True),
    Op("get", f"{ORG}/costs", Perm.BILLING_VIEW, 200, query=USAGE_QUERY, read_usage=True),
    Op("get", f"{ORG}/endpoints", Perm.ENDPOINTS_VIEW, 200),
    Op("post", f"{ORG}/endpoints", Perm.ENDPOINTS_MANAGE, 201, {"name": "fresh", "pool": "cpu"}),
    Op("get", f"{ORG}/endpoints/{{endpoint_id}}", Perm.ENDPOINTS_VIEW, 200),
    Op("patch", f"{ORG}/endpoints/{{endpoint_id}}", Perm.ENDPOINTS_MANAGE, 200, {"rpm_limit": 7}),
    Op("delete", f"{ORG}/endpoints/{{endpoint_id}}", Perm.ENDPOINTS_MANAGE, 204),
    Op("post", f"{ORG}/endpoints/{{endpoint_id}}/pause", Perm.ENDPOINTS_MANAGE, 200),
    Op("post", f"{ORG}/endpoints/{{endpoint_id}}/resume", Perm.ENDPOINTS_MANAGE, 200),
    Op("post", f"{ORG}/endpoints/{{endpoint_id}}/rollout", Perm.ENDPOINTS_MANAGE, 200, {}),
    Op("post", f"{ORG}/endpoints/{{endpoint_id}}/rollback", Perm.ENDPOINTS_MANAGE, 200),
    Op("get", f"{ORG}/endpoints/{{endpoint_id}}/revisions", Perm.ENDPOINTS_VIEW, 200),
    Op("get", f"{ORG}/endpoints/{{endpoint_id}}/targets", Perm.ENDPOINTS_VIEW, 200),
    Op(
        "put",
        f"{ORG}/endpoints/{{endpoint_id}}/targets",
        Perm.ENDPOINTS_MANAGE,
        200,
        {"targets": [{"kind": "pool"}]},
    ),
    # The organization's own providers (MANTLE_PROVIDER_BYOK on in this module).
    Op("get", f"{ORG}/providers", Perm.PROVIDERS_MANAGE, 200),
    Op(
        "post",
        f"{ORG}/providers",
        Perm.PROVIDERS_MANAGE,
        201,
        {"name": "fresh", "kind": "openai-compatible", "base_url": "https://vllm.example.com/v1"},
    ),
    Op("get", f"{ORG}/providers/{{provider_id}}", Perm.PROVIDERS_MANAGE, 200),
    Op(
        "patch",
        f"{ORG}/providers/{{provider_id}}",
        Perm.PROVIDERS_MANAGE,
        200,
        {"max_concurrency": 7},
    ),
    Op("delete", f"{ORG}/providers/{{provider_id}}", Perm.PROVIDERS_MANAGE, 204),
    Op("get", f"{ORG}/pools", Perm.ENDPOINTS_VIEW, 200),
    Op("get", f"{ORG}/fleet", Perm.ENDPOINTS_VIEW, 200),
    Op("get", f"{ORG}/compile-jobs", Perm.ENDPOINTS_VIEW, 200),
    Op("get", f"{ORG}/compile-jobs/{{job_id}}", Perm.ENDPOINTS_VIEW, 200),
    # Allowed callers get past authorization to the input checks: a checkpoint path that
    # does not exist, and an upload that is not an ONNX file, are refused with nothing written.
    Op(
        "post",
        f"{ORG}/compile-jobs",
        Perm.ENDPOINTS_MANAGE,
        400,
        {"model_name": "m", "kind": "embedding", "path": "/nonexistent/checkpoint"},
    ),
    Op("post", f"{ORG}/compile-jobs/upload", Perm.ENDPOINTS_MANAGE, 400, RAW_UPLOAD),
]


def op_id(op: Op) -> str:
    return f"{op.method.upper()} {op.path}"


@dataclass
class Tenant:
    """An organization with a member of each role, an admin key, and one of every resource."""

    world: OrgWorld
    target_member: Membership  # a developer that role changes and removals act on
    project: Project
    key: ApiKey
    invoice: Invoice
    endpoint: Endpoint
    versions: tuple[str, str]  # the endpoint's model version and a second one to roll out
    job: CompileJob
    provider: Provider

    @property
    def org(self) -> Organization:
        return self.world.org

    def ids(self) -> dict[str, str]:
        return {
            "organization_id": self.org.id,
            "membership_id": self.target_member.id,
            "project_id": self.project.id,
            "key_id": self.key.id,
            "invoice_id": str(self.invoice.id),
            "endpoint_id": self.endpoint.id,
            "job_id": self.job.id,
            "provider_id": self.provider.id,
        }

    def client(self, principal: str) -> Client:
        if principal == ADMIN_KEY:
            return self.world.key_client()
        return self.world.client_for(Role(principal))


def make_tenant(name: str) -> Tenant:
    world = build_world(name)
    target = add_member(world.org, Role.DEVELOPER)
    key, _ = make_api_key(world.org)
    usage(world.org, at(9, 3), input_tokens=1_000_000, output_tokens=100_000)
    draft = invoice_refresh_draft(org=world.org, month=at(9))
    assert draft is not None
    invoice = invoice_finalize(principal=staff_principal(), invoice=draft)
    pool = make_pool("cpu")
    first = make_model_version(world.org, UNSERVED_ENCODER, model_name=f"ranker-{world.org.id}")
    second = make_model_version(
        world.org, {**UNSERVED_ENCODER, "sha256": "1" * 64}, model_name=f"ranker-{world.org.id}"
    )
    endpoint = endpoint_create(
        principal=SYSTEM, org=world.org, name="ranker", model_version_id=first.id, pool=pool.name
    )
    endpoint_rollout(principal=SYSTEM, endpoint=endpoint, model_version_id=second.id)
    job = CompileJob.objects.create(
        organization=world.org, model_name="enc", kind="embedding", source="onnx"
    )
    provider = Provider.objects.create(
        organization=world.org,
        name="own",
        kind=Provider.Kind.OPENAI_COMPATIBLE,
        base_url="https://vllm.example.com/v1",
    )
    return Tenant(
        world=world,
        target_member=Membership.objects.get(organization=world.org, user=target),
        project=default_project(world.org),
        key=key,
        invoice=invoice,
        endpoint=endpoint,
        versions=(first.id, second.id),
        job=job,
        provider=provider,
    )


@pytest.fixture(scope="module")
def built_tenants(django_db_setup: None, django_db_blocker: Any) -> Iterator[tuple[Tenant, Tenant]]:
    """Both organizations, built once for the ~800 cases (as Django's setUpTestData does).

    They live in a transaction that is rolled back after the module; each case runs in a
    savepoint inside it (the `db` fixture), so what one case changes the next never sees.
    """
    with django_db_blocker.unblock(), transaction.atomic():
        price_book(CHAT, input_price="1", output_price="2")
        yield make_tenant("Acme"), make_tenant("Globex")
        transaction.set_rollback(True)


@pytest.fixture
def tenants(built_tenants: tuple[Tenant, Tenant], db: None, settings: Any) -> tuple[Tenant, Tenant]:
    settings.MANTLE_PROVIDER_BYOK = True  # organizations may manage their own providers
    return built_tenants


def fingerprint(org: Organization) -> tuple[Any, ...]:
    """Everything the operations above can change in an organization."""
    org.refresh_from_db()
    return (
        org.name,
        sorted(Membership.objects.filter(organization=org).values_list("id", "role")),
        sorted(Project.objects.filter(organization=org).values_list("id", "name")),
        sorted(ApiKey.objects.filter(organization=org).values_list("id", "revoked_at")),
        Budget.objects.filter(organization=org).count(),
        AuditLog.objects.filter(organization=org).count(),
        sorted(
            Endpoint.objects.filter(organization=org).values_list(
                "id", "name", "status", "rpm_limit", "model_version_id"
            )
        ),
        CompileJob.objects.filter(organization=org).count(),
        sorted(
            Provider.objects.filter(organization=org).values_list(
                "id", "name", "max_concurrency", "enabled"
            )
        ),
        sorted(
            RouteTarget.objects.filter(endpoint__organization=org).values_list(
                "id", "kind", "provider_id"
            )
        ),
    )


def state(*tenants: Tenant) -> tuple[Any, ...]:
    return (*(fingerprint(t.org) for t in tenants), Organization.objects.count())


def call(client: Client, op: Op, ids: dict[str, str], tenant: Tenant | None = None) -> Any:
    path = "/api/v1" + op.path.format(**ids) + op.query
    if op.body is RAW_UPLOAD:
        return client.post(
            path + UPLOAD_QUERY, data=b"not an onnx file", content_type="application/octet-stream"
        )
    body = dict(op.body) if op.body is not None else None
    if body is not None and tenant is not None:
        # Bodies that name a model version name the caller's own.
        if op.path.endswith("/endpoints"):
            body["model_version_id"] = tenant.versions[0]
        if op.path.endswith("/rollout"):
            body["model_version_id"] = tenant.versions[0]
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs = {"data": json.dumps(body), "content_type": "application/json"}
    return getattr(client, op.method)(path, **kwargs)


def role_allowed(principal: str, op: Op) -> bool:
    """Whether the principal's role passes the operation's permission check."""
    if op.perm is None:
        return True
    if op.perm == USER_ONLY:
        return principal != ADMIN_KEY
    role = Role.ADMIN if principal == ADMIN_KEY else Role(principal)
    return role_allows(role, Perm(op.perm))


def allowed(principal: str, op: Op) -> bool:
    return role_allowed(principal, op) and not (op.person_only and principal == ADMIN_KEY)


def test_the_matrix_covers_every_operation_of_the_api() -> None:
    schema = api.get_openapi_schema()
    served = {
        (method, path.removeprefix("/api/v1"))
        for path, item in schema["paths"].items()
        for method in item
    }
    assert served == {(op.method, op.path) for op in OPS}


@pytest.mark.parametrize("principal", PRINCIPALS)
@pytest.mark.parametrize("op", OPS, ids=op_id)
def test_own_organization_by_role(tenants: tuple[Tenant, Tenant], op: Op, principal: str) -> None:
    mine, theirs = tenants
    before = state(mine, theirs)
    response = call(mine.client(principal), op, mine.ids(), mine)
    if allowed(principal, op):
        assert response.status_code == op.ok, response.content
        assert fingerprint(theirs.org) == before[1]
    else:
        assert response.status_code == 403, response.content
        assert response.json()["error"]["code"] == "permission_denied"
        assert state(mine, theirs) == before


@pytest.mark.parametrize("principal", PRINCIPALS)
@pytest.mark.parametrize("op", [op for op in OPS if "{organization_id}" in op.path], ids=op_id)
def test_other_organization_is_404_and_untouched(
    tenants: tuple[Tenant, Tenant], op: Op, principal: str
) -> None:
    mine, theirs = tenants
    before = state(mine, theirs)
    response = call(mine.client(principal), op, theirs.ids(), theirs)
    assert response.status_code == 404, response.content
    assert response.json()["error"]["code"] == "not_found"
    assert state(mine, theirs) == before


SUB_RESOURCE_OPS = [op for op in OPS if op.path.count("{") >= 2]


@pytest.mark.parametrize("principal", PRINCIPALS)
@pytest.mark.parametrize("op", SUB_RESOURCE_OPS, ids=op_id)
def test_other_organizations_ids_under_own_organization(
    tenants: tuple[Tenant, Tenant], op: Op, principal: str
) -> None:
    mine, theirs = tenants
    ids = {**theirs.ids(), "organization_id": mine.org.id}
    before = state(mine, theirs)
    response = call(mine.client(principal), op, ids, theirs)
    # The role is checked on the caller's own organization first: 403 when it is not
    # allowed at all; otherwise the other organization's id is simply not found.
    assert response.status_code == (404 if role_allowed(principal, op) else 403), response.content
    assert state(mine, theirs) == before


@pytest.mark.parametrize("op", OPS, ids=op_id)
def test_anonymous_is_401(tenants: tuple[Tenant, Tenant], op: Op) -> None:
    mine, _ = tenants
    before = state(mine)
    response = call(Client(), op, mine.ids())
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert state(mine) == before


@pytest.mark.parametrize("op", [op for op in OPS if "{organization_id}" in op.path], ids=op_id)
def test_keys_without_the_admin_scope_are_refused(tenants: tuple[Tenant, Tenant], op: Op) -> None:
    mine, theirs = tenants
    _, secret = make_api_key(mine.org, scopes=["inference", "read-usage"])
    _, inference = make_api_key(mine.org, scopes=["inference"])
    before = state(mine)
    reader = Client(headers={"authorization": f"Bearer {secret}"})
    response = call(reader, op, mine.ids())
    if op.read_usage:
        # The usage API reads with read-usage, never with a key without it (403 naming
        # the scope), and never another organization's (404).
        assert response.status_code == 200, response.content
        refused = call(Client(headers={"authorization": f"Bearer {inference}"}), op, mine.ids())
        assert refused.status_code == 403 and "read-usage" in refused.json()["error"]["message"]
        assert call(reader, op, theirs.ids()).status_code == 404
    else:
        assert response.status_code == 401
    assert state(mine) == before
