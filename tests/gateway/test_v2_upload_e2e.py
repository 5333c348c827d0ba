"""An ONNX model built in the test: uploaded, compiled, served, inferred through v2 in batches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import numpy as np
import pytest
from django.test.utils import override_settings

from accounts.permissions import Role
from billing.models import Price
from catalog.models import Endpoint
from core.redis import get_redis
from tests.catalog import test_compile_e2e as compile_e2e
from tests.conftest import build_world
from tests.factories import make_api_key, make_pool
from tests.gateway import test_v2_e2e as v2_e2e
from tests.gateway.conftest import LiveStack
from tests.gateway.test_v2_e2e import BATCH_ROWS, POOL, usage_by_request
from tests.support.stack import Process, Stack
from tests.workers.compile_support import BIAS, WEIGHTS, ranker_bytes, tar_bytes
from workers.contract import response_stream_key

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(600),
    pytest.mark.models,
]

# The compile node and control worker of the compile tests, and the v2 tests' tensor worker.
nodes = compile_e2e.nodes
paths = compile_e2e.paths
tensor_worker = v2_e2e.tensor_worker


def test_an_uploaded_model_is_served_over_v2_with_dynamic_batching(
    live: LiveStack, tensor_worker: Process, nodes: Stack, paths: dict[str, Path]
) -> None:
    make_pool(POOL, region="local", providers=["CPUExecutionProvider"])
    with override_settings(MANTLE_ARTIFACT_DIR=paths["store"], MANTLE_UPLOAD_DIR=paths["uploads"]):
        world = build_world("Upload Co")
        console = world.client_for(Role.DEVELOPER)
        # Given a tensor model uploaded as an archive and compiled by a compile node
        uploaded = console.post(
            f"/api/v1/organizations/{world.org.id}/compile-jobs/upload"
            "?model_name=upload-ranker&kind=tensor",
            data=tar_bytes({"model.onnx": ranker_bytes()}),
            content_type="application/gzip",
        )
        assert uploaded.status_code == 201, uploaded.content
        job = compile_e2e.wait_finished(uploaded.json()["id"], nodes)
        assert job.status == "succeeded", job.steps
        assert job.model_version is not None
        # Priced at the operator's default for compiled models (the control worker runs with
        # MANTLE_COMPILED_MODEL_PRICES): a model nothing prices would be refused (403). Batch
        # lines at half of each (billing/starter_prices.py).
        assert dict(
            Price.objects.filter(model_name="upload-ranker").values_list("token_kind", "unit_price")
        ) == {
            "request": Decimal("2"),
            "compute_ms": Decimal("0.5"),
            "batch_request": Decimal("1"),
            "batch_compute_ms": Decimal("0.25"),
        }
        # And an endpoint serving it on the tensor pool
        created = console.post(
            f"/api/v1/organizations/{world.org.id}/endpoints",
            {"name": "ranker", "model_version_id": job.model_version.id, "pool": POOL},
            content_type="application/json",
        )
        assert created.status_code == 201, created.content
    endpoint = Endpoint.objects.get(id=created.json()["id"])
    key, secret = make_api_key(world.org, scopes=["inference"])
    client = httpx.Client(
        base_url=live.url, headers={"authorization": f"Bearer {secret}"}, timeout=60
    )
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 8)).astype(np.float32) for _ in range(BATCH_ROWS)]

    def infer(x: np.ndarray) -> httpx.Response:
        body = {
            "inputs": [
                {"name": "features", "shape": [1, 8], "datatype": "FP32", "data": x.tolist()}
            ]
        }
        return client.post(f"/v2/models/{endpoint.id}/infer", json=body)

    # When eight clients call it at once
    with client, ThreadPoolExecutor(BATCH_ROWS) as pool:
        responses = list(pool.map(infer, xs))
    # Then each gets its own score, all from one batched session run, each metered once
    usage = usage_by_request({r.headers["x-request-id"] for r in responses})
    for x, response in zip(xs, responses, strict=True):
        assert response.status_code == 200, response.text
        (score,) = response.json()["outputs"]
        assert (score["name"], score["datatype"], score["shape"]) == ("score", "FP32", [1, 1])
        np.testing.assert_allclose(score["data"], (x @ WEIGHTS + BIAS).ravel(), rtol=1e-5)
        request_id = response.headers["x-request-id"]
        tensors = [
            fields
            for _, fields in get_redis().xrange(response_stream_key(request_id))  # type: ignore[union-attr]
            if fields["type"] == "tensors"
        ]
        assert tensors[0]["batch_requests"] == str(BATCH_ROWS)
        event = usage[request_id]
        assert (event["model_version_id"], event["api_key_id"]) == (
            job.model_version.id,
            key.id,
        )
        assert (event["input_tokens"], event["status"]) == ("0", "stop")
