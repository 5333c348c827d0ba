"""Endpoints through the management API: CRUD, pause, rollout and rollback, pools, the fleet."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from django.test import Client

from accounts.models import AuditLog
from accounts.permissions import Role
from catalog import specs
from catalog.models import AcceleratorPool, Endpoint, EndpointRevision, ModelVersion
from catalog.specs import EndpointSpec
from core.redis import get_redis
from tests.conftest import OrgWorld
from tests.factories import make_model_version, make_pool, tensor_artifact
from workers.contract import HEARTBEAT_TTL_S, pool_live_key, worker_info_key
from workers.heartbeat import Heartbeat, NodeStats

pytestmark = pytest.mark.django_db

Call = Callable[..., Any]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    store = tmp_path_factory.mktemp("endpoint-artifacts")
    return {
        "v1": tensor_artifact(store, offset=1.0),
        "v2": tensor_artifact(store, offset=2.0),
        "other": tensor_artifact(store, offset=3.0, name="other-ranker"),
    }


@pytest.fixture
def call(django_capture_on_commit_callbacks: Any) -> Call:
    """Calls the API and runs what its transaction scheduled on commit (the Redis publish)."""

    def do(client: Client, method: str, path: str, body: Any = None) -> Any:
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs = {"data": json.dumps(body), "content_type": "application/json"}
        with django_capture_on_commit_callbacks(execute=True):
            return getattr(client, method)(f"/api/v1{path}", **kwargs)

    return do


@pytest.fixture
def catalog(
    world: OrgWorld, other_world: OrgWorld, artifacts: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    cpu = make_pool("cpu", region="local")
    eu = make_pool("h200-eu", region="eu", providers=["CUDAExecutionProvider"])
    v1 = make_model_version(world.org, artifacts["v1"], model_name="acme-ranker")
    v2 = make_model_version(world.org, artifacts["v2"], model_name="acme-ranker")
    sibling = make_model_version(world.org, artifacts["other"], model_name="acme-moderation")
    foreign = make_model_version(other_world.org, artifacts["v1"], model_name="globex-ranker")
    return {"cpu": cpu, "eu": eu, "v1": v1, "v2": v2, "sibling": sibling, "foreign": foreign}


def path(world: OrgWorld, suffix: str = "") -> str:
    return f"/organizations/{world.org.id}{suffix}"


def published(endpoint_id: str) -> EndpointSpec | None:
    raw = get_redis().get(specs.endpoint_key(endpoint_id))
    # A deleted endpoint leaves a tombstone (tests/gateway/test_cache_fills.py).
    return EndpointSpec.from_json(raw) if raw and raw != specs.UNKNOWN else None


def create(call: Call, world: OrgWorld, version: ModelVersion, **body: Any) -> Any:
    payload = {"name": "ranker", "model_version_id": version.id, "pool": "cpu", **body}
    return call(world.client_for(Role.DEVELOPER), "post", path(world, "/endpoints"), payload)


def audit_actions(world: OrgWorld) -> list[str]:
    return list(
        AuditLog.objects.filter(organization=world.org, action__startswith="endpoint.")
        .order_by("id")
        .values_list("action", flat=True)
    )


# --- create ----------------------------------------------------------------------------------


def test_create_serves_a_version_on_a_pool_and_publishes_it(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    response = create(call, world, catalog["v1"], rpm_limit=120)
    assert response.status_code == 201
    body = response.json()
    endpoint = Endpoint.objects.get(id=body["id"])
    assert body == {
        "id": endpoint.id,
        "name": "ranker",
        "status": "active",
        "kind": "tensor",
        "model": "acme-ranker",
        "model_version_id": catalog["v1"].id,
        "model_version": 1,
        "previous_model_version_id": None,
        "pool": "cpu",
        "region": "local",
        "rpm_limit": 120,
        "tpm_limit": 1_000_000,
        "created_at": body["created_at"],
        "updated_at": body["updated_at"],
    }
    assert endpoint.organization_id == world.org.id
    spec = published(endpoint.id)
    assert spec is not None
    assert (spec.version_id, spec.version, spec.active, spec.queue, spec.rpm_limit) == (
        catalog["v1"].id,
        1,
        True,
        "inference.cpu",
        120,
    )
    assert spec.io["inputs"] == {"features": {"dtype": "float32", "shape": ["batch", 4]}}
    revisions = list(
        EndpointRevision.objects.filter(endpoint=endpoint).values_list("number", "action")
    )
    assert revisions == [(1, "created")]
    entry = AuditLog.objects.get(action="endpoint.created")
    assert (entry.target_id, entry.organization_id) == (endpoint.id, world.org.id)
    assert entry.metadata == {
        "name": "ranker",
        "model_version_id": catalog["v1"].id,
        "pool": "cpu",
    }


def test_a_pool_outside_the_organizations_region_is_refused_without_naming_its_region(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    response = create(call, world, catalog["v1"], pool="h200-eu")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "pool"
    # Refused like a pool that does not exist: where another pool is stays undisclosed.
    assert error["message"] == (
        "pool 'h200-eu' is not available in this organization's region; available: ['cpu']"
    )
    assert "eu'" not in error["message"].replace("h200-eu", "")
    assert Endpoint.objects.count() == 0
    assert audit_actions(world) == []
    assert get_redis().keys(f"{specs.ENDPOINT_KEY_PREFIX}*") == []


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        (
            {"pool": "tpu"},
            400,
            "pool",
            "pool 'tpu' is not available in this organization's region; available: ['cpu']",
        ),
        (
            {"model_version_id": "mv_nope"},
            404,
            "model_version_id",
            "model version 'mv_nope' not found",
        ),
        ({"name": "   "}, 400, "name", "name must not be empty"),
        ({"rpm_limit": 0}, 400, "rpm_limit", None),
        ({"colour": "blue"}, 400, "colour", "colour: unknown field"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_creates_nothing(
    call: Call,
    world: OrgWorld,
    catalog: dict[str, Any],
    body: dict[str, Any],
    status: int,
    param: str,
    message: str | None,
) -> None:
    response = create(call, world, catalog["v1"], **body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param
    if message is not None:
        assert error["message"] == message
    assert Endpoint.objects.count() == 0
    assert audit_actions(world) == []


def test_another_organizations_model_version_is_not_found(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    response = create(call, world, catalog["foreign"])
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model_version_id"
    assert Endpoint.objects.count() == 0


def test_a_version_that_is_not_ready_cannot_be_served(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    ModelVersion.objects.filter(id=catalog["v2"].id).update(status=ModelVersion.Status.FAILED)
    response = create(call, world, catalog["v2"])
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": f"model version '{catalog['v2'].id}' is failed; "
        "only ready versions can be served",
        "type": "invalid_request_error",
        "param": "model_version_id",
        "code": "invalid_request",
    }
    assert Endpoint.objects.count() == 0


def test_names_are_unique_within_an_organization(
    call: Call, world: OrgWorld, other_world: OrgWorld, catalog: dict[str, Any]
) -> None:
    assert create(call, world, catalog["v1"]).status_code == 201
    again = create(call, world, catalog["v2"])
    assert again.status_code == 409
    assert again.json()["error"]["param"] == "name"
    assert Endpoint.objects.count() == 1
    assert audit_actions(world) == ["endpoint.created"]
    # Another organization may use the same name.
    assert create(call, other_world, catalog["foreign"]).status_code == 201


@pytest.mark.parametrize(
    ("role", "status"),
    [
        (Role.OWNER, 201),
        (Role.ADMIN, 201),
        (Role.DEVELOPER, 201),
        (Role.BILLING, 403),
        (Role.VIEWER, 403),
    ],
)
def test_who_may_create(
    call: Call, world: OrgWorld, catalog: dict[str, Any], role: Role, status: int
) -> None:
    body = {"name": "ranker", "model_version_id": catalog["v1"].id, "pool": "cpu"}
    response = call(world.client_for(role), "post", path(world, "/endpoints"), body)
    assert response.status_code == status
    assert Endpoint.objects.count() == (1 if status == 201 else 0)


def test_an_admin_api_key_manages_endpoints(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    body = {"name": "ranker", "model_version_id": catalog["v1"].id, "pool": "cpu"}
    response = call(world.key_client(), "post", path(world, "/endpoints"), body)
    assert response.status_code == 201
    entry = AuditLog.objects.get(action="endpoint.created")
    assert entry.actor_label == f"api-key:{world.admin_key.id}"


# --- read ----------------------------------------------------------------------------------


def test_list_and_get_show_only_the_organizations_own_endpoints(
    call: Call, world: OrgWorld, other_world: OrgWorld, catalog: dict[str, Any]
) -> None:
    mine = create(call, world, catalog["v1"]).json()["id"]
    create(call, other_world, catalog["foreign"])
    viewer = world.client_for(Role.VIEWER)
    listed = call(viewer, "get", path(world, "/endpoints")).json()
    assert [e["id"] for e in listed] == [mine]
    got = call(viewer, "get", path(world, f"/endpoints/{mine}"))
    assert got.status_code == 200
    assert got.json()["id"] == mine


# --- other organizations' ids are 404 ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("get", "", None),
        ("patch", "", {"name": "mine now"}),
        ("delete", "", None),
        ("post", "/pause", None),
        ("post", "/resume", None),
        ("post", "/rollout", {"model_version_id": "mv_x"}),
        ("post", "/rollback", None),
        ("get", "/revisions", None),
    ],
)
def test_another_organizations_endpoint_is_not_found(
    call: Call,
    world: OrgWorld,
    other_world: OrgWorld,
    catalog: dict[str, Any],
    method: str,
    suffix: str,
    body: Any,
) -> None:
    theirs = create(call, other_world, catalog["foreign"]).json()["id"]
    before = Endpoint.objects.values().get(id=theirs)
    response = call(
        world.client_for(Role.OWNER), method, path(world, f"/endpoints/{theirs}{suffix}"), body
    )
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "endpoint_id"
    assert Endpoint.objects.values().get(id=theirs) == before
    assert audit_actions(world) == []


def test_another_organizations_path_is_not_found(
    call: Call, world: OrgWorld, other_world: OrgWorld, catalog: dict[str, Any]
) -> None:
    for suffix in ("/endpoints", "/pools", "/fleet"):
        response = call(world.client_for(Role.OWNER), "get", path(other_world, suffix))
        assert response.status_code == 404
        assert response.json()["error"]["param"] == "organization_id"


# --- update, pause, delete -----------------------------------------------------------------


def test_update_changes_only_the_fields_given_and_republishes(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    endpoint_id = create(call, world, catalog["v1"]).json()["id"]
    response = call(
        world.client_for(Role.DEVELOPER),
        "patch",
        path(world, f"/endpoints/{endpoint_id}"),
        {"name": "ranker-prod", "tpm_limit": 5000},
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["rpm_limit"], body["tpm_limit"], body["pool"]) == (
        "ranker-prod",
        600,
        5000,
        "cpu",
    )
    spec = published(endpoint_id)
    assert spec is not None and (spec.name, spec.tpm_limit) == ("ranker-prod", 5000)
    entry = AuditLog.objects.get(action="endpoint.updated")
    assert entry.metadata == {"name": "ranker-prod", "tpm_limit": 5000}


def test_moving_to_a_pool_of_another_region_is_refused_and_changes_nothing(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    endpoint_id = create(call, world, catalog["v1"]).json()["id"]
    response = call(
        world.client_for(Role.DEVELOPER),
        "patch",
        path(world, f"/endpoints/{endpoint_id}"),
        {"pool": "h200-eu", "rpm_limit": 5},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "pool"
    endpoint = Endpoint.objects.get(id=endpoint_id)
    assert (endpoint.pool.name, endpoint.rpm_limit) == ("cpu", 600)
    assert audit_actions(world) == ["endpoint.created"]


def test_pause_and_resume_switch_the_published_spec(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    endpoint_id = create(call, world, catalog["v1"]).json()["id"]
    client = world.client_for(Role.DEVELOPER)
    paused = call(client, "post", path(world, f"/endpoints/{endpoint_id}/pause"))
    assert (paused.status_code, paused.json()["status"]) == (200, "paused")
    assert published(endpoint_id).active is False  # type: ignore[union-attr]
    # Pausing again is a no-op, not a second audit entry.
    assert call(client, "post", path(world, f"/endpoints/{endpoint_id}/pause")).status_code == 200
    resumed = call(client, "post", path(world, f"/endpoints/{endpoint_id}/resume"))
    assert resumed.json()["status"] == "active"
    assert published(endpoint_id).active is True  # type: ignore[union-attr]
    assert audit_actions(world) == ["endpoint.created", "endpoint.paused", "endpoint.resumed"]


def test_a_viewer_cannot_pause(call: Call, world: OrgWorld, catalog: dict[str, Any]) -> None:
    endpoint_id = create(call, world, catalog["v1"]).json()["id"]
    response = call(
        world.client_for(Role.VIEWER), "post", path(world, f"/endpoints/{endpoint_id}/pause")
    )
    assert response.status_code == 403
    assert Endpoint.objects.get(id=endpoint_id).status == "active"


def test_delete_removes_the_endpoint_its_history_and_its_spec(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    endpoint_id = create(call, world, catalog["v1"]).json()["id"]
    assert published(endpoint_id) is not None
    response = call(
        world.client_for(Role.DEVELOPER), "delete", path(world, f"/endpoints/{endpoint_id}")
    )
    assert response.status_code == 204
    assert not Endpoint.objects.filter(id=endpoint_id).exists()
    assert not EndpointRevision.objects.filter(endpoint_id=endpoint_id).exists()
    assert published(endpoint_id) is None
    entry = AuditLog.objects.get(action="endpoint.deleted")
    assert (entry.target_id, entry.metadata) == (
        endpoint_id,
        {"name": "ranker", "model_version_id": catalog["v1"].id},
    )
    # The model version itself stays.
    assert ModelVersion.objects.filter(id=catalog["v1"].id).exists()


# --- rollout and rollback --------------------------------------------------------------------


def test_rollout_then_rollback_switch_versions_and_keep_the_history(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    endpoint_id = create(call, world, catalog["v1"]).json()["id"]
    client = world.client_for(Role.DEVELOPER)
    v1, v2 = catalog["v1"].id, catalog["v2"].id

    rolled = call(
        client, "post", path(world, f"/endpoints/{endpoint_id}/rollout"), {"model_version_id": v2}
    )
    assert rolled.status_code == 200
    assert (rolled.json()["model_version_id"], rolled.json()["previous_model_version_id"]) == (
        v2,
        v1,
    )
    assert published(endpoint_id).version_id == v2  # type: ignore[union-attr]

    back = call(client, "post", path(world, f"/endpoints/{endpoint_id}/rollback"))
    assert back.status_code == 200
    assert (back.json()["model_version_id"], back.json()["previous_model_version_id"]) == (v1, v2)
    assert published(endpoint_id).version_id == v1  # type: ignore[union-attr]

    # A second rollback undoes the first.
    again = call(client, "post", path(world, f"/endpoints/{endpoint_id}/rollback"))
    assert again.json()["model_version_id"] == v2

    history = call(client, "get", path(world, f"/endpoints/{endpoint_id}/revisions")).json()
    assert [(r["number"], r["action"], r["model_version_id"]) for r in history] == [
        (4, "rollback", v2),
        (3, "rollback", v1),
        (2, "rollout", v2),
        (1, "created", v1),
    ]
    assert audit_actions(world) == [
        "endpoint.created",
        "endpoint.rolled_out",
        "endpoint.rolled_back",
        "endpoint.rolled_back",
    ]
    entry = AuditLog.objects.filter(action="endpoint.rolled_out").get()
    assert entry.metadata == {"from": v1, "to": v2, "revision": 2}


def test_rollback_without_a_previous_version_is_a_conflict(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    endpoint_id = create(call, world, catalog["v1"]).json()["id"]
    response = call(
        world.client_for(Role.DEVELOPER), "post", path(world, f"/endpoints/{endpoint_id}/rollback")
    )
    assert response.status_code == 409
    assert response.json()["error"]["message"] == (
        "the endpoint has served only one version; there is nothing to roll back to"
    )
    assert EndpointRevision.objects.filter(endpoint_id=endpoint_id).count() == 1
    assert audit_actions(world) == ["endpoint.created"]


@pytest.mark.parametrize(
    ("target", "status", "message"),
    [
        ("v1", 400, "the endpoint already serves model version '{v1}'"),
        (
            "sibling",
            400,
            "model version '{sibling}' is a version of 'acme-moderation'; this endpoint serves "
            "'acme-ranker' (create another endpoint for it)",
        ),
        ("foreign", 404, "model version '{foreign}' not found"),
    ],
)
def test_rollout_refusals_name_the_version_and_change_nothing(
    call: Call, world: OrgWorld, catalog: dict[str, Any], target: str, status: int, message: str
) -> None:
    endpoint_id = create(call, world, catalog["v1"]).json()["id"]
    response = call(
        world.client_for(Role.DEVELOPER),
        "post",
        path(world, f"/endpoints/{endpoint_id}/rollout"),
        {"model_version_id": catalog[target].id},
    )
    assert response.status_code == status
    error = response.json()["error"]
    ids = {k: v.id for k, v in catalog.items() if isinstance(v, ModelVersion)}
    assert (error["param"], error["message"]) == ("model_version_id", message.format(**ids))
    endpoint = Endpoint.objects.get(id=endpoint_id)
    assert (endpoint.model_version_id, endpoint.previous_model_version_id) == (
        catalog["v1"].id,
        None,
    )
    assert published(endpoint_id).version_id == catalog["v1"].id  # type: ignore[union-attr]
    assert audit_actions(world) == ["endpoint.created"]


# --- pools and the fleet ---------------------------------------------------------------------


def test_pools_are_those_of_the_organizations_region(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    response = call(world.client_for(Role.VIEWER), "get", path(world, "/pools"))
    assert response.status_code == 200
    assert response.json() == [
        {
            "name": "cpu",
            "region": "local",
            "providers": [
                "TensorrtExecutionProvider",
                "CUDAExecutionProvider",
                "CANNExecutionProvider",
                "CPUExecutionProvider",
            ],
            "description": "",
        }
    ]


def test_fleet_shows_live_workers_from_their_heartbeats(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    client = get_redis()
    loaded = (catalog["v1"].id, catalog["foreign"].id)
    heartbeat = Heartbeat(
        client,
        node="node-a",
        pool="cpu",
        queues=("inference.cpu",),
        stats=lambda: NodeStats(
            providers=("CPUExecutionProvider",),
            models_loaded=loaded,
            free_slots=30,
            total_slots=32,
            tokens_per_s=12.345,
        ),
    )
    heartbeat.beat()
    # A node that stopped beating long ago, still listed in the pool's set: not shown.
    client.zadd(pool_live_key("cpu"), {"node-dead": time.time() - 2 * HEARTBEAT_TTL_S})
    # A node of a pool in another region: not this organization's fleet.
    client.zadd(pool_live_key("h200-eu"), {"node-eu": time.time()})
    client.set(worker_info_key("node-eu"), json.dumps({"node": "node-eu", "models_loaded": []}))

    response = call(world.client_for(Role.VIEWER), "get", path(world, "/fleet"))
    assert response.status_code == 200
    (pool,) = response.json()
    (worker,) = pool["workers"]
    assert {k: v for k, v in pool.items() if k != "workers"} == {
        "name": "cpu",
        "region": "local",
        "providers": list(AcceleratorPool.objects.get(name="cpu").providers),
        "providers_in_use": ["CPUExecutionProvider"],
        "live_workers": 1,
        "free_slots": 30,
        "total_slots": 32,
        "tokens_per_s": 12.35,
    }
    assert worker["node"] == "node-a"
    assert worker["providers"] == ["CPUExecutionProvider"]
    # Another organization's loaded version is counted, never named.
    assert worker["models_loaded"] == [
        {"model_version_id": catalog["v1"].id, "model": "acme-ranker", "version": 1}
    ]
    assert worker["other_models_loaded"] == 1
    assert (worker["free_slots"], worker["total_slots"], worker["tokens_per_s"]) == (30, 32, 12.35)
    assert 0 <= worker["heartbeat_age_s"] < HEARTBEAT_TTL_S
    beat_at = client.zscore(pool_live_key("cpu"), "node-a")
    beat = datetime.fromtimestamp(beat_at, UTC)
    # JSON carries milliseconds.
    assert datetime.fromisoformat(worker["last_heartbeat"]) == beat.replace(
        microsecond=beat.microsecond // 1000 * 1000
    )


def test_the_fleet_of_a_pool_without_workers_is_empty(
    call: Call, world: OrgWorld, catalog: dict[str, Any]
) -> None:
    response = call(world.client_for(Role.VIEWER), "get", path(world, "/fleet"))
    assert response.json()[0]["workers"] == []
    assert response.json()[0]["live_workers"] == 0
