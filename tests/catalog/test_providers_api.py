"""An organization's own providers and its endpoints' route targets through the management
API: only while MANTLE_PROVIDER_BYOK is on, the credential never in a response,
organizations kept apart, the gateway's spec published."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client

from accounts.models import AuditLog
from accounts.permissions import Role
from accounts.principal import SYSTEM
from catalog import providers as svc
from catalog import specs
from catalog.models import Endpoint, Provider, RouteTarget
from catalog.services import endpoint_create
from catalog.specs import EndpointSpec
from core import secretbox
from core.redis import get_redis
from tests.conftest import OrgWorld
from tests.factories import UNSERVED_ENCODER, make_model_version, make_pool

pytestmark = pytest.mark.django_db

SECRET = "sk-byok-credential-9d2e71"
Call = Callable[..., Any]


@pytest.fixture
def call(django_capture_on_commit_callbacks: Any) -> Call:
    """Calls the API and runs what its transaction scheduled on commit (the Redis publish).
    Every response is checked to carry no credential."""

    def do(client: Client, method: str, path: str, body: Any = None) -> Any:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs = {"data": json.dumps(body), "content_type": "application/json"}
        with django_capture_on_commit_callbacks(execute=True):
            response = getattr(client, method)(f"/api/v1{path}", **kwargs)
        assert SECRET.encode() not in response.content
        assert b"credential_encrypted" not in response.content
        for provider in Provider.objects.exclude(credential_encrypted=""):
            assert provider.credential_encrypted.encode() not in response.content
        return response

    return do


@pytest.fixture
def byok(settings: Any) -> None:
    settings.MANTLE_PROVIDER_BYOK = True


def endpoint_of(world: OrgWorld) -> Endpoint:
    make_pool("cpu")
    version = make_model_version(
        world.org,
        {**UNSERVED_ENCODER, "sha256": world.org.id.ljust(64, "0")[:64]},
        model_name=f"ranker-{world.org.id}",
    )
    return endpoint_create(
        principal=SYSTEM, org=world.org, name="ranker", model_version_id=version.id, pool="cpu"
    )


def admin(world: OrgWorld) -> Client:
    return world.client_for(Role.ADMIN)


def create(call: Call, world: OrgWorld, **body: Any) -> Any:
    payload = {
        "name": "own vllm",
        "kind": "openai-compatible",
        "base_url": "https://vllm.example.com/v1",
        "credential": SECRET,
        **body,
    }
    return call(admin(world), "post", f"/organizations/{world.org.id}/providers", payload)


def published(endpoint_id: str) -> EndpointSpec:
    raw = get_redis().get(specs.endpoint_key(endpoint_id))
    assert raw and raw != specs.UNKNOWN
    return EndpointSpec.from_json(raw)


def test_off_unless_the_operator_allows_it(call: Call, world: OrgWorld) -> None:
    endpoint = endpoint_of(world)
    org = f"/organizations/{world.org.id}"
    for method, path, body in [
        ("get", "/providers", None),
        ("post", "/providers", {"name": "x", "kind": "openai", "base_url": "https://a.b"}),
        ("put", f"/endpoints/{endpoint.id}/targets", {"targets": []}),
        ("get", f"/endpoints/{endpoint.id}/targets", None),
    ]:
        response = call(admin(world), method, org + path, body)
        assert response.status_code == 403, (path, response.content)
        error = response.json()["error"]
        assert error["code"] == "providers_not_enabled"
        assert "MANTLE_PROVIDER_BYOK" in error["message"]
    assert not Provider.objects.exists()


@pytest.mark.usefixtures("byok")
def test_an_admin_manages_its_providers_and_the_credential_is_write_only(
    call: Call, world: OrgWorld
) -> None:
    response = create(call, world, max_concurrency=12)
    assert response.status_code == 201, response.content
    body = response.json()
    assert "credential" not in body
    assert body["has_credential"] is True
    assert (body["name"], body["kind"], body["max_concurrency"]) == (
        "own vllm",
        "openai-compatible",
        12,
    )
    provider = Provider.objects.get(id=body["id"])
    assert provider.organization_id == world.org.id
    assert secretbox.unseal(provider.credential_encrypted) == SECRET
    base = f"/organizations/{world.org.id}/providers"

    listed = call(admin(world), "get", base).json()
    assert [p["id"] for p in listed] == [provider.id]
    assert call(admin(world), "get", f"{base}/{provider.id}").json()["has_credential"] is True

    # A patch without a credential keeps it; with one, replaces it.
    patched = call(admin(world), "patch", f"{base}/{provider.id}", {"first_byte_timeout_s": 9})
    assert patched.status_code == 200, patched.content
    assert patched.json()["first_byte_timeout_s"] == 9.0
    provider.refresh_from_db()
    assert secretbox.unseal(provider.credential_encrypted) == SECRET
    call(admin(world), "patch", f"{base}/{provider.id}", {"credential": "sk-rotated"})
    provider.refresh_from_db()
    assert secretbox.unseal(provider.credential_encrypted) == "sk-rotated"

    disabled = call(admin(world), "patch", f"{base}/{provider.id}", {"enabled": False})
    assert disabled.json()["enabled"] is False

    assert call(admin(world), "delete", f"{base}/{provider.id}").status_code == 204
    assert not Provider.objects.exists()
    actions = list(
        AuditLog.objects.filter(organization=world.org, action__startswith="provider.")
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == [
        "provider.created",
        "provider.updated",
        "provider.updated",
        "provider.disabled",
        "provider.deleted",
    ]
    assert all(SECRET not in json.dumps(a.metadata) for a in AuditLog.objects.all())


@pytest.mark.usefixtures("byok")
def test_bad_fields_are_400_naming_them(call: Call, world: OrgWorld) -> None:
    response = create(call, world, base_url="http://169.254.169.254/latest")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "base_url"
    response = create(call, world, kind="azure-openai", base_url="https://r.openai.azure.com")
    assert response.json()["error"]["param"] == "api_version"
    assert create(call, world).status_code == 201
    duplicate = create(call, world)
    assert duplicate.status_code == 409
    assert duplicate.json()["error"]["param"] == "name"


@pytest.mark.usefixtures("byok")
def test_developers_and_viewers_may_not_manage_providers(call: Call, world: OrgWorld) -> None:
    for role in (Role.DEVELOPER, Role.VIEWER, Role.BILLING):
        response = call(world.client_for(role), "get", f"/organizations/{world.org.id}/providers")
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "permission_denied"
    key = world.key_client()  # an admin-scoped key acts as an admin
    assert call(key, "get", f"/organizations/{world.org.id}/providers").status_code == 200


@pytest.mark.usefixtures("byok")
def test_targets_of_an_endpoint_are_set_and_published(call: Call, world: OrgWorld) -> None:
    endpoint = endpoint_of(world)
    provider_id = create(call, world).json()["id"]
    path = f"/organizations/{world.org.id}/endpoints/{endpoint.id}/targets"
    body = {
        "targets": [
            {"kind": "pool"},
            {
                "kind": "provider",
                "provider_id": provider_id,
                "upstream_model": "meta-llama/Llama-3.1-8B-Instruct",
                "position": 1,
                "weight": 2,
                "cost_input": "0.0000001",
                "cost_output": 0.0000002,
            },
        ]
    }
    response = call(world.client_for(Role.DEVELOPER), "put", path, body)
    assert response.status_code == 200, response.content
    targets = response.json()
    assert [(t["kind"], t["provider_id"], t["position"], t["weight"]) for t in targets] == [
        ("pool", None, 0, 1),
        ("provider", provider_id, 1, 2),
    ]
    assert targets[1]["provider_name"] == "own vllm"
    assert (targets[1]["cost_input"], targets[1]["cost_output"], targets[0]["cost_input"]) == (
        "0.000000100",
        "0.000000200",
        "0.000000000",
    )
    assert [t["kind"] for t in published(endpoint.id).targets] == ["pool", "provider"]
    assert call(world.client_for(Role.VIEWER), "get", path).json() == targets

    refused = call(admin(world), "put", path, {"targets": [{**body["targets"][1], "weight": 0}]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "targets[0].weight"
    assert RouteTarget.objects.filter(endpoint=endpoint).count() == 2

    # In use: the provider cannot be deleted until the targets let it go.
    base = f"/organizations/{world.org.id}/providers/{provider_id}"
    assert call(admin(world), "delete", base).status_code == 409
    assert call(admin(world), "put", path, {"targets": []}).json() == []
    assert published(endpoint.id).targets == ()
    assert call(admin(world), "delete", base).status_code == 204


@pytest.mark.usefixtures("byok")
def test_organizations_never_see_or_use_each_others_providers(
    call: Call, world: OrgWorld, other_world: OrgWorld
) -> None:
    theirs = create(call, other_world, name="globex vllm").json()["id"]
    mine = endpoint_of(world)
    org = f"/organizations/{world.org.id}"

    assert call(admin(world), "get", f"{org}/providers").json() == []
    for method, body in [("get", None), ("patch", {"max_concurrency": 1}), ("delete", None)]:
        response = call(admin(world), method, f"{org}/providers/{theirs}", body)
        assert response.status_code == 404, (method, response.content)
    # Through the other organization's path: not found, as for any organization not one's own.
    response = call(admin(world), "get", f"/organizations/{other_world.org.id}/providers")
    assert response.status_code == 404

    target = {"kind": "provider", "provider_id": theirs, "upstream_model": "m"}
    refused = call(admin(world), "put", f"{org}/endpoints/{mine.id}/targets", {"targets": [target]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "targets[0].provider_id"
    assert "not found" in refused.json()["error"]["message"]

    # The operator's providers are routed by the operator, not through this API.
    operator = svc.provider_create(
        principal=SYSTEM,
        organization=None,
        name="operator openai",
        kind="openai",
        base_url="https://api.openai.com/v1",
        credential=SECRET,
    )
    target = {"kind": "provider", "provider_id": operator.id, "upstream_model": "gpt-4o"}
    refused = call(admin(world), "put", f"{org}/endpoints/{mine.id}/targets", {"targets": [target]})
    assert refused.status_code == 400
    assert not RouteTarget.objects.exists()
    Provider.objects.get(id=theirs).refresh_from_db()  # untouched


@pytest.mark.usefixtures("byok")
def test_the_operators_targets_on_an_endpoint_stay_the_operators(
    call: Call, world: OrgWorld
) -> None:
    endpoint = endpoint_of(world)
    operator = svc.provider_create(
        principal=SYSTEM,
        organization=None,
        name="operator openai",
        kind="openai",
        base_url="https://api.openai.com/v1",
        credential=SECRET,
    )
    svc.route_targets_set(
        principal=SYSTEM,
        endpoint=endpoint,
        targets=[
            {
                "kind": "provider",
                "provider_id": operator.id,
                "upstream_model": "gpt-4o-mini",
                "cost_input": "0.00000015",
            }
        ],
    )
    path = f"/organizations/{world.org.id}/endpoints/{endpoint.id}/targets"
    [shown] = call(admin(world), "get", path).json()
    assert shown["operator"] is True
    assert (shown["cost_input"], shown["cost_output"], shown["provider_name"]) == (
        None,
        None,
        "operator openai",
    )
    # Kept and moved behind the pool: the operator's costs stay, whatever is sent.
    kept = {**shown, "position": 1, "weight": 5, "cost_input": "0"}
    for field in ("id", "provider_name", "operator", "cost_output", "cost_cached_input"):
        kept.pop(field)
    response = call(admin(world), "put", path, {"targets": [{"kind": "pool"}, kept]})
    assert response.status_code == 200, response.content
    row = RouteTarget.objects.get(endpoint=endpoint, provider=operator)
    assert (row.position, row.weight, row.cost_input) == (1, 5, Decimal("0.00000015"))
    # Another of the operator's models is not the organization's to add.
    other = {**kept, "upstream_model": "gpt-4o"}
    refused = call(admin(world), "put", path, {"targets": [other]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "targets[0].provider_id"
    # Removing it is.
    assert call(admin(world), "put", path, {"targets": []}).json() == []
