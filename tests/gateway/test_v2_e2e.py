"""The v2 inference protocol end to end: real gateway and worker, ONNX models built in the test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from accounts.models import ApiKey, AuditLog, Organization
from catalog.models import Endpoint, ModelVersion
from core.redis import get_redis
from tests.factories import (
    OrganizationFactory,
    make_api_key,
    make_model_version,
    make_pool,
    tensor_artifact,
)
from tests.gateway.conftest import LiveStack
from tests.support.stack import Process
from workers.contract import USAGE_STREAM, response_stream_key, task_claim_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

POOL = "tensor-e2e"
BATCH_ROWS = 8
WINDOW_MS = 1500  # a batch closes when full or this long after its first request


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    store = tmp_path_factory.mktemp("v2-artifacts")
    return {
        "v1": tensor_artifact(store, offset=1.0),
        "v2": tensor_artifact(store, offset=2.0),
    }


@pytest.fixture(scope="module")
def tensor_worker(live: LiveStack) -> Iterator[Process]:
    proc = live.stack.worker(
        POOL,
        name="endpoints-tensor-worker",
        concurrency=16,
        MANTLE_TENSOR_MAX_BATCH=str(BATCH_ROWS),
        MANTLE_TENSOR_MAX_WAIT_MS=str(WINDOW_MS),
        MANTLE_ORT_THREADS="1",
    )
    try:
        yield proc
    finally:
        live.stack.stop(proc)


@dataclass
class Tenant:
    url: str
    org: Organization
    key: ApiKey
    secret: str
    admin_secret: str
    versions: dict[str, ModelVersion]
    endpoint_id: str = ""
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, secret: str | None = None) -> httpx.Client:
        client = httpx.Client(
            base_url=self.url,
            headers={"authorization": f"Bearer {secret or self.secret}"},
            timeout=60,
        )
        self.clients.append(client)
        return client

    def admin(self) -> httpx.Client:
        client = httpx.Client(base_url=self.url, **admin_auth(self.admin_secret), timeout=60)
        self.clients.append(client)
        return client

    def api(self, method: str, suffix: str, body: Any = None) -> httpx.Response:
        return self.admin().request(
            method, f"/api/v1/organizations/{self.org.id}{suffix}", json=body
        )


@pytest.fixture
def tenant(
    live: LiveStack, tensor_worker: Process, transactional_db: None, artifacts: dict[str, Any]
) -> Iterator[Tenant]:
    make_pool(POOL, region="local", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    org = OrganizationFactory()
    key, secret = make_api_key(org, scopes=["inference"])
    _, admin_secret = make_api_key(org, scopes=["admin"])
    versions = {
        name: make_model_version(org, manifest, model_name=f"ranker-{org.id[-6:]}")
        for name, manifest in artifacts.items()
    }
    tenant = Tenant(live.url, org, key, secret, admin_secret, versions)
    created = tenant.api(
        "post",
        "/endpoints",
        {"name": "ranker", "model_version_id": versions["v1"].id, "pool": POOL},
    )
    assert created.status_code == 201, created.text
    tenant.endpoint_id = created.json()["id"]
    try:
        yield tenant
    finally:
        for client in tenant.clients:
            client.close()


def admin_auth(secret: str) -> dict[str, Any]:
    """An admin key, plus a CSRF token pair.

    The management API checks CSRF for the console session before it tries the
    bearer key (ninja's SessionAuth raises instead of passing), so an unsafe
    call with a key alone is refused over real HTTP; see the report to the lead.
    """
    token = "t" * 32
    return {
        "headers": {"authorization": f"Bearer {secret}", "x-csrftoken": token},
        "cookies": {"csrftoken": token},
    }


def features(rows: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + start) / 4


def infer_body(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
        ],
        **extra,
    }


def usage_by_request(request_ids: set[str], timeout: float = 30) -> dict[str, dict[str, str]]:
    """The usage events of these requests (the worker appends each after the answer)."""
    deadline = time.time() + timeout
    while True:
        entries = get_redis().xrange(USAGE_STREAM)
        found = {f["request_id"]: f for _, f in entries if f["request_id"] in request_ids}  # type: ignore[index,union-attr]
        if len(found) == len(request_ids) or time.time() > deadline:
            return found
        time.sleep(0.1)


def bucket_exists(key: ApiKey) -> bool:
    return bool(get_redis().exists(f"mantle:rl:key:{key.id}:req"))


# --- metadata, readiness, listing ----------------------------------------------------------


def test_metadata_ready_and_list_describe_the_tensor_model(tenant: Tenant) -> None:
    client = tenant.client()
    ep = tenant.endpoint_id
    meta = client.get(f"/v2/models/{ep}")
    assert meta.status_code == 200
    assert meta.json() == {
        "name": ep,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "shifted", "datatype": "FP32", "shape": [-1, 4]},
        ],
    }
    assert client.get(f"/v2/models/{ep}/versions/1").json() == meta.json()
    assert client.get(f"/v2/models/{ep}/ready").json() == {"name": ep, "ready": True}
    listed = client.get("/v2/models").json()
    assert listed == {"models": [{"name": ep, "version": "1", "state": "READY"}]}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{tenant.url}/v2/").json()["name"] == "mantle"


def test_a_paused_endpoint_is_not_ready_and_refuses_inference(tenant: Tenant) -> None:
    assert tenant.api("post", f"/endpoints/{tenant.endpoint_id}/pause").status_code == 200
    client = tenant.client()
    ready = client.get(f"/v2/models/{tenant.endpoint_id}/ready")
    assert (ready.status_code, ready.json()["ready"]) == (400, False)
    refused = client.post(f"/v2/models/{tenant.endpoint_id}/infer", json=infer_body(features(1)))
    assert refused.status_code == 403
    assert refused.json()["code"] == "endpoint_paused"
    assert bucket_exists(tenant.key) is False


def test_other_organizations_and_unknown_models_are_not_found(tenant: Tenant) -> None:
    stranger = OrganizationFactory()
    _, secret = make_api_key(stranger, scopes=["inference"])
    for path in ("", "/ready", "/infer"):
        method = "post" if path == "/infer" else "get"
        body = infer_body(features(1)) if path == "/infer" else None
        response = tenant.client(secret).request(
            method, f"/v2/models/{tenant.endpoint_id}{path}", json=body
        )
        assert response.status_code == 404
        assert response.json() == {
            "error": f"The model `{tenant.endpoint_id}` does not exist or you do not have "
            "access to it.",
            "code": "model_not_found",
            "param": "model",
        }
    assert tenant.client().get("/v2/models/ep-nope").status_code == 404
    wrong_version = tenant.client().get(f"/v2/models/{tenant.endpoint_id}/versions/7")
    assert (wrong_version.status_code, wrong_version.json()["code"]) == (
        404,
        "model_version_not_found",
    )
    assert tenant.client("sk-" + "x" * 48).get("/v2/models").status_code == 401


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {
                "inputs": [
                    {"name": "features", "shape": [1, 4], "datatype": "FP64", "data": [0] * 4}
                ]
            },
            "inputs.0.datatype",
            "Input `features` must be FP32, not FP64.",
        ),
        (
            {
                "inputs": [
                    {"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [0] * 3}
                ]
            },
            "inputs.0.shape.1",
            "Input `features`: dimension 1 must be 4, not 3.",
        ),
        (
            {
                "inputs": [
                    {"name": "features", "shape": [2, 4], "datatype": "FP32", "data": [0] * 4}
                ]
            },
            "inputs.0.data",
            "Input `features`: shape [2, 4] needs 8 values, data holds 4.",
        ),
        (
            {
                "inputs": [
                    {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ["a"] * 4}
                ]
            },
            "inputs.0.data",
            "Input `features`: data holds values that are not FP32.",
        ),
        (
            {"inputs": [{"name": "feats", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]},
            "inputs.0.name",
            "The model has no input `feats`; its inputs are ['features'].",
        ),
        (
            {
                "inputs": [
                    {"name": "features", "shape": [1, 4], "datatype": "STRING", "data": [0] * 4}
                ]
            },
            "inputs.0.datatype",
            "Input `features`: datatype 'STRING' is not supported; use one of ['BOOL', 'FP16', "
            "'FP32', 'FP64', 'INT16', 'INT32', 'INT64', 'INT8', 'UINT16', 'UINT32', 'UINT64', "
            "'UINT8'].",
        ),
        (
            {
                **infer_body(features(1)),
                "outputs": [{"name": "logits"}],
            },
            "outputs.0.name",
            "The model has no output `logits`; its outputs are ['score', 'shifted'].",
        ),
        (
            {**infer_body(features(1)), "parameters": {"binary_data_output": True}},
            "parameters.binary_data_output",
            "The parameter `binary_data_output` is not supported: Mantle speaks the JSON form of "
            "the protocol only (no binary tensor data, no shared memory).",
        ),
        (
            {**infer_body(features(1)), "priority": 3},
            "priority",
            "Unrecognized request argument supplied: priority",
        ),
        ({"inputs": []}, "inputs", None),
    ],
)
def test_bad_requests_are_refused_naming_the_field_before_anything_runs(
    tenant: Tenant, body: dict[str, Any], param: str, message: str | None
) -> None:
    response = tenant.client().post(f"/v2/models/{tenant.endpoint_id}/infer", json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["param"] == param
    if message is not None:
        assert error["error"] == message
    # Refused before admission: no rate-limit bucket was touched, nothing was dispatched.
    assert bucket_exists(tenant.key) is False


# --- inference with dynamic batching --------------------------------------------------------


def test_concurrent_requests_are_batched_by_the_worker_and_metered(tenant: Tenant) -> None:
    client = tenant.client()
    xs = [features(1, start=100 * i) for i in range(BATCH_ROWS)]

    def one(x: np.ndarray) -> httpx.Response:
        return client.post(f"/v2/models/{tenant.endpoint_id}/infer", json=infer_body(x, id="q"))

    with ThreadPoolExecutor(BATCH_ROWS) as pool:
        responses = list(pool.map(one, xs))
    usage = usage_by_request({r.headers["x-request-id"] for r in responses})
    for x, response in zip(xs, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model_name"], body["model_version"], body["id"]) == (
            tenant.endpoint_id,
            "1",
            "q",
        )
        shifted, score = body["outputs"]
        assert (shifted["name"], shifted["datatype"], shifted["shape"]) == (
            "shifted",
            "FP32",
            [1, 4],
        )
        assert shifted["data"] == (x + 1.0).ravel().tolist()
        assert (score["name"], score["shape"], score["data"]) == (
            "score",
            [1],
            [float((x + 1.0).sum())],
        )
        assert int(response.headers["x-ratelimit-limit-requests"]) > 0
        request_id = response.headers["x-request-id"]
        # All eight shared one session run (the batch closed when it was full).
        tensors = [
            f
            for _, f in get_redis().xrange(response_stream_key(request_id))  # type: ignore[union-attr]
            if f["type"] == "tensors"
        ]
        assert tensors[0]["batch_requests"] == str(BATCH_ROWS)
        event = usage[request_id]
        assert (event["organization_id"], event["api_key_id"], event["endpoint_id"]) == (
            tenant.org.id,
            tenant.key.id,
            tenant.endpoint_id,
        )
        assert (event["model_version_id"], event["status"]) == (tenant.versions["v1"].id, "stop")
        assert (event["input_tokens"], event["output_tokens"]) == ("0", "0")
        assert int(event["compute_ms"]) >= 0


def test_outputs_can_be_chosen_and_several_rows_sent_at_once(tenant: Tenant) -> None:
    x = features(3)
    response = tenant.client().post(
        f"/v2/models/{tenant.endpoint_id}/versions/1/infer",
        json=infer_body(x, outputs=[{"name": "score"}]),
    )
    assert response.status_code == 200, response.text
    (score,) = response.json()["outputs"]
    assert (score["name"], score["shape"]) == ("score", [3])
    assert score["data"] == (x + 1.0).sum(axis=1).tolist()


def test_the_endpoints_request_limit_applies(tenant: Tenant) -> None:
    assert (
        tenant.api("patch", f"/endpoints/{tenant.endpoint_id}", {"rpm_limit": 2}).status_code == 200
    )
    client = tenant.client()

    def one(_: int) -> httpx.Response:
        return client.post(f"/v2/models/{tenant.endpoint_id}/infer", json=infer_body(features(1)))

    with ThreadPoolExecutor(3) as pool:
        statuses = sorted(r.status_code for r in pool.map(one, range(3)))
    assert statuses == [200, 200, 429]


# --- rolling update under continuous load ---------------------------------------------------


@dataclass
class Sample:
    sent: float
    returned: float
    status: int
    request_id: str
    version: str = ""
    offset: float = 0.0


def _claims() -> set[str]:
    prefix = task_claim_key("")
    return {k.removeprefix(prefix) for k in get_redis().scan_iter(f"{prefix}*", count=1000)}  # type: ignore[union-attr]


async def _load(tenant: Tenant, stop: asyncio.Event, samples: list[Sample], start: float) -> None:
    x = features(1, start=start)
    headers = {"authorization": f"Bearer {tenant.secret}"}
    async with httpx.AsyncClient(base_url=tenant.url, headers=headers, timeout=60) as client:
        while not stop.is_set():
            sent = time.monotonic()
            response = await client.post(
                f"/v2/models/{tenant.endpoint_id}/infer", json=infer_body(x)
            )
            sample = Sample(
                sent,
                time.monotonic(),
                response.status_code,
                response.headers.get("x-request-id", ""),
            )
            if response.status_code == 200:
                body = response.json()
                sample.version = body["model_version"]
                # Which graph really ran: v1 adds 1, v2 adds 2.
                sample.offset = round(body["outputs"][0]["data"][0] - float(x[0, 0]), 4)
            samples.append(sample)


async def _wait_for(samples: list[Sample], after: float, offset: float, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sum(1 for s in samples if s.sent > after and s.offset == offset) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {count} answers of offset {offset} after the switch")


async def _switch(
    tenant: Tenant, samples: list[Sample], earlier: set[str], suffix: str, body: Any = None
) -> tuple[float, float, set[str]]:
    """Calls the management API once requests are at the worker: when the call started and
    ended, and what the worker had claimed before it started.

    A batch of the load returns all at once, and its clients' next requests reach the
    worker a moment later: a switch begun in that gap would have no request in flight. So
    the switch begins right after a scan of the worker's claims finds one whose client has
    not had its answer; no await lies between that check and the start, so the answer is
    recorded after the start. Claims live for a day: `earlier` are those of requests made
    before this test's load (other tests'), which prove nothing.
    """
    deadline = time.monotonic() + 15
    while True:
        claimed = await asyncio.to_thread(_claims)
        started = time.monotonic()
        if claimed - earlier - {s.request_id for s in samples}:
            break
        assert started < deadline, "no request reached the worker within 15 s"
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient(
        base_url=tenant.url, **admin_auth(tenant.admin_secret), timeout=60
    ) as admin:
        response = await admin.post(
            f"/api/v1/organizations/{tenant.org.id}/endpoints/{tenant.endpoint_id}{suffix}",
            json=body,
        )
    assert response.status_code == 200, response.text
    return started, time.monotonic(), claimed


def test_rollout_and_rollback_under_continuous_load_fail_no_request(tenant: Tenant) -> None:
    v1, v2 = tenant.versions["v1"], tenant.versions["v2"]
    samples: list[Sample] = []

    async def scenario() -> tuple[tuple[float, float, set[str]], tuple[float, float, set[str]]]:
        earlier = await asyncio.to_thread(_claims)
        stop = asyncio.Event()
        loaders = [asyncio.create_task(_load(tenant, stop, samples, 10.0 * i)) for i in range(4)]
        try:
            await _wait_for(samples, 0.0, 1.0, 4)
            rollout = await _switch(
                tenant, samples, earlier, "/rollout", {"model_version_id": v2.id}
            )
            await _wait_for(samples, rollout[1], 2.0, 4)
            rollback = await _switch(tenant, samples, earlier, "/rollback")
            await _wait_for(samples, rollback[1], 1.0, 4)
        finally:
            stop.set()
            await asyncio.gather(*loaders)
        return rollout, rollback

    (out_start, out_end, out_claimed), (back_start, back_end, back_claimed) = asyncio.run(
        scenario()
    )

    # Zero failed requests, through both switches.
    assert [s for s in samples if s.status != 200] == []
    # Every answer is what the version it reports computes.
    assert {(s.version, s.offset) for s in samples} == {("1", 1.0), ("2", 2.0)}
    # A request resolved after a switch runs on the new version: surely so when it was
    # sent after the switch returned. (One sent just before may still be resolved after.)
    for s in samples:
        if out_end < s.sent and s.returned < back_start:
            assert s.offset == 2.0
        elif s.sent > back_end or s.returned < out_start:
            assert s.offset == 1.0
    # Requests already at the worker when a switch began finished on the version they had.
    # (In flight when it began: claimed by the worker before, returned after the start. How
    # long the switch call itself takes against the batch window is not the property.)
    in_flight_out = [s for s in samples if s.request_id in out_claimed and s.returned > out_start]
    in_flight_back = [
        s for s in samples if s.request_id in back_claimed and s.returned > back_start
    ]
    assert in_flight_out and {s.offset for s in in_flight_out} == {1.0}
    assert in_flight_back and {s.offset for s in in_flight_back} == {2.0}
    # Each request was metered once, against the version that ran it.
    usage = usage_by_request({s.request_id for s in samples})
    assert len(usage) == len(samples)
    for s in samples:
        expected = v1.id if s.offset == 1.0 else v2.id
        assert usage[s.request_id]["model_version_id"] == expected
    assert list(
        AuditLog.objects.filter(organization=tenant.org, action__startswith="endpoint.")
        .order_by("id")
        .values_list("action", flat=True)
    ) == ["endpoint.created", "endpoint.rolled_out", "endpoint.rolled_back"]
    assert Endpoint.objects.get(id=tenant.endpoint_id).model_version_id == v1.id
