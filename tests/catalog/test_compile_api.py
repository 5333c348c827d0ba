"""Compile jobs through the management API: uploads refused or staged, reads, node reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.conf import settings
from django.test import Client
from django.test.utils import override_settings
from onnx import numpy_helper

from accounts.models import AuditLog
from accounts.permissions import Role
from catalog import compile as compile_jobs
from catalog.models import CompileJob, Model, ModelVersion
from tests.conftest import OrgWorld
from tests.workers.compile_support import (
    WEIGHTS,
    external_upload,
    ranker_bytes,
    ranker_model,
    tar_bytes,
    tree,
    with_external_weights,
    zip_bytes,
)
from workers.contract import CompileOutcome, CompileProgress, CompileSource, CompileStatus

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def upload_dir(tmp_path: Path) -> Any:
    uploads = tmp_path / "uploads"
    with override_settings(MANTLE_UPLOAD_DIR=uploads, MANTLE_ARTIFACT_DIR=tmp_path / "store"):
        yield uploads


def jobs_url(world: OrgWorld) -> str:
    return f"/api/v1/organizations/{world.org.id}/compile-jobs"


def upload(
    client: Client, world: OrgWorld, body: bytes, **params: str
) -> tuple[int, dict[str, Any]]:
    query = {"model_name": "ranker", "kind": "tensor", **params}
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    response = client.post(
        f"{jobs_url(world)}/upload?{qs}", data=body, content_type="application/octet-stream"
    )
    return response.status_code, response.json()


def test_an_onnx_upload_is_staged_and_becomes_a_queued_job(
    world: OrgWorld, upload_dir: Path
) -> None:
    client = world.client_for(Role.DEVELOPER)

    status, body = upload(client, world, ranker_bytes(), quantize="int8", filename="r.onnx")

    assert status == 201, body
    job = CompileJob.objects.get(id=body["id"])
    assert body["id"].startswith("cj_")
    assert (body["status"], body["model_name"], body["kind"], body["source"]) == (
        "queued",
        "ranker",
        "tensor",
        "onnx",
    )
    assert body["options"] == {"quantize": "int8", "optimization": "basic", "tolerance": None}
    assert body["steps"] == []
    assert body["model_version_id"] is None
    assert "path" not in body["source_detail"]  # the staging path is not the caller's business
    assert body["source_detail"]["filename"] == "r.onnx"
    assert body["source_detail"]["upload_bytes"] == len(ranker_bytes())
    staged = Path(job.source_detail["path"])
    assert staged.parent == upload_dir
    assert tree(staged) == ["model.onnx"]
    assert tree(upload_dir) == [staged.name, f"{staged.name}/model.onnx"]
    assert AuditLog.objects.filter(action="compile_job.created", target_id=job.id).count() == 1


def test_an_upload_with_external_data_in_an_archive_is_staged(
    world: OrgWorld, upload_dir: Path
) -> None:
    archive = tar_bytes({f"ranker/{k}": v for k, v in external_upload().items()})

    status, body = upload(world.client_for(Role.ADMIN), world, archive)

    assert status == 201, body
    staged = Path(CompileJob.objects.get(id=body["id"]).source_detail["path"])
    assert tree(staged) == ["model.onnx", "weights.bin"]
    assert body["source_detail"]["files"] == ["ranker/model.onnx", "ranker/weights.bin"]
    assert body["source_detail"]["graph"]["external_files"] == ["weights.bin"]


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        (
            tar_bytes(
                {
                    "model.onnx": with_external_weights(
                        ranker_model(), "../../../etc/weights.bin"
                    ).SerializeToString(),
                    "weights.bin": WEIGHTS.tobytes(),
                }
            ),
            400,
            "unsafe_path",
            "leaves the model's directory (..)",
        ),
        (tar_bytes({"../model.onnx": ranker_bytes()}), 400, "unsafe_archive", "leaves the archive"),
        (zip_bytes({"/model.onnx": ranker_bytes()}), 400, "unsafe_archive", "absolute path"),
        (b"\x08\x09", 400, "invalid_model", "is not a valid ONNX model"),
        (b"<html>hello</html>", 400, "invalid_model", "neither an ONNX model file nor"),
        (b"", 400, "invalid_model", "the upload is empty"),
        (
            ranker_bytes(op_domain="com.acme", op_type="FastMatMul"),
            400,
            "unsupported_operator",
            "custom domain 'com.acme'",
        ),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing(
    world: OrgWorld,
    upload_dir: Path,
    tmp_path: Path,
    body: bytes,
    status: int,
    code: str,
    words: str,
) -> None:
    got, error = upload(world.client_for(Role.DEVELOPER), world, body)

    assert got == status
    assert error["error"]["code"] == code
    assert words in error["error"]["message"]
    assert error["error"]["param"] == "file"
    assert CompileJob.objects.count() == 0
    assert tree(upload_dir) == []
    assert tree(tmp_path / "store") == []
    assert AuditLog.objects.filter(action="compile_job.created").count() == 0


def test_an_upload_over_the_size_limit_is_413_and_leaves_nothing(
    world: OrgWorld, upload_dir: Path
) -> None:
    with override_settings(MANTLE_MAX_UPLOAD_BYTES=40):
        status, error = upload(world.client_for(Role.DEVELOPER), world, ranker_bytes())

    assert status == 413
    assert error["error"]["code"] == "payload_too_large"
    assert error["error"]["message"] == (
        "the upload is larger than the 40 bytes allowed (MANTLE_MAX_UPLOAD_BYTES)"
    )
    assert CompileJob.objects.count() == 0
    assert tree(upload_dir) == []


@pytest.mark.parametrize(
    ("params", "param", "words"),
    [
        ({"model_name": "Bad Name"}, "model_name", "model_name must be 1-120 characters"),
        ({"kind": "vision"}, "kind", "kind"),
        ({"quantize": "int2"}, "quantize", "quantize"),
        ({"model_file": "../x.onnx"}, "model_file", "plain file name"),
    ],
)
def test_bad_parameters_are_refused_before_anything_is_staged(
    world: OrgWorld, upload_dir: Path, params: dict[str, str], param: str, words: str
) -> None:
    status, error = upload(world.client_for(Role.DEVELOPER), world, ranker_bytes(), **params)

    assert status == 400
    assert error["error"]["param"] == param
    assert words in error["error"]["message"]
    assert CompileJob.objects.count() == 0
    assert tree(upload_dir) == []


def test_a_name_of_another_organization_is_refused(
    world: OrgWorld, other_world: OrgWorld, upload_dir: Path
) -> None:
    Model.objects.create(
        name="ranker", organization=other_world.org, kind="tensor", context_length=0
    )

    status, error = upload(world.client_for(Role.DEVELOPER), world, ranker_bytes())

    assert status == 409
    assert error["error"]["message"] == "the model name 'ranker' is taken; choose another"
    assert tree(upload_dir) == []


def test_viewers_read_but_do_not_create(world: OrgWorld, upload_dir: Path) -> None:
    status, body = upload(world.client_for(Role.DEVELOPER), world, ranker_bytes())
    viewer = world.client_for(Role.VIEWER)

    refused, error = upload(viewer, world, ranker_bytes())
    listed = viewer.get(jobs_url(world))
    one = viewer.get(f"{jobs_url(world)}/{body['id']}")

    assert (status, refused) == (201, 403)
    assert error["error"]["code"] == "permission_denied"
    assert [j["id"] for j in listed.json()] == [body["id"]]
    assert one.status_code == 200
    assert one.json()["id"] == body["id"]
    assert CompileJob.objects.count() == 1
    assert len(tree(upload_dir)) == 2


def test_another_organizations_job_is_404(
    world: OrgWorld, other_world: OrgWorld, upload_dir: Path
) -> None:
    _, body = upload(world.client_for(Role.DEVELOPER), world, ranker_bytes())
    outsider = other_world.client_for(Role.OWNER)

    by_own_org = outsider.get(f"{jobs_url(other_world)}/{body['id']}")
    by_their_org = outsider.get(f"{jobs_url(world)}/{body['id']}")
    upload_there, _ = upload(outsider, world, ranker_bytes())

    assert by_own_org.status_code == 404
    assert by_own_org.json()["error"]["code"] == "not_found"
    assert by_their_org.status_code == 404
    assert upload_there == 404
    assert outsider.get(jobs_url(other_world)).json() == []
    assert CompileJob.objects.count() == 1


def test_a_checkpoint_path_must_be_inside_an_allowed_root(world: OrgWorld, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"x")
    client = world.client_for(Role.DEVELOPER)
    payload = {"model_name": "enc", "kind": "embedding", "path": str(checkpoint)}

    with override_settings(MANTLE_CHECKPOINT_ROOTS=[]):
        refused = client.post(jobs_url(world), payload, content_type="application/json")
    with override_settings(MANTLE_CHECKPOINT_ROOTS=[tmp_path]):
        escaped = client.post(
            jobs_url(world),
            {**payload, "path": f"{checkpoint}/../../etc"},
            content_type="application/json",
        )
        accepted = client.post(jobs_url(world), payload, content_type="application/json")
        tensor = client.post(
            jobs_url(world), {**payload, "kind": "tensor"}, content_type="application/json"
        )

    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "path"
    assert "MANTLE_CHECKPOINT_ROOTS" in refused.json()["error"]["message"]
    assert escaped.status_code == 400
    assert accepted.status_code == 201
    assert accepted.json()["source"] == "hf-checkpoint"
    assert accepted.json()["source_detail"] == {"path": str(checkpoint)}
    assert tensor.status_code == 400
    assert tensor.json()["error"]["param"] == "kind"
    assert CompileJob.objects.count() == 1


# --- What compile nodes report ----------------------------------------------------------


def step(name: str, status: str) -> dict[str, Any]:
    return {
        "name": name,
        "status": status,
        "started_at": 1.0,
        "finished_at": 2.0,
        "duration_s": 1.0,
        "log": f"{name} log",
        "metrics": {},
    }


def queued_job(world: OrgWorld, upload_dir: Path) -> CompileJob:
    _, body = upload(world.client_for(Role.DEVELOPER), world, ranker_bytes())
    return CompileJob.objects.get(id=body["id"])


def manifest_for(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "format": 1,
        "name": "ranker",
        "kind": "tensor",
        "runtime": "onnx-tensor",
        "sha256": "a" * 64,
        "size_bytes": 123,
        "location": str(tmp_path / ("a" * 64)),
        "model_file": "model.onnx",
        "tokenizer_file": None,
        "context_length": 0,
        "io": {"inputs": {}, "outputs": {}},
        **extra,
    }


def test_progress_is_applied_in_order_and_late_reports_are_dropped(
    world: OrgWorld, upload_dir: Path
) -> None:
    job = queued_job(world, upload_dir)

    newer = compile_jobs.compile_job_progress(
        progress=CompileProgress(job_id=job.id, seq=20, steps=(step("import", "succeeded"),))
    )
    older = compile_jobs.compile_job_progress(
        progress=CompileProgress(job_id=job.id, seq=10, steps=(step("import", "running"),))
    )
    job.refresh_from_db()

    assert (newer, older) == (True, False)
    assert job.status == "running"
    assert job.started_at is not None
    assert job.progress_seq == 20
    assert job.steps == [step("import", "succeeded")]


def test_a_success_registers_a_ready_version_once(
    world: OrgWorld, upload_dir: Path, tmp_path: Path
) -> None:
    job = queued_job(world, upload_dir)
    outcome = CompileOutcome(
        job_id=job.id,
        status="succeeded",
        steps=(step("import", "succeeded"), step("package", "succeeded")),
        manifest=manifest_for(tmp_path),
    )

    compile_jobs.compile_job_finish(outcome=outcome)
    compile_jobs.compile_job_finish(outcome=outcome)  # redelivered
    late = compile_jobs.compile_job_progress(
        progress=CompileProgress(job_id=job.id, seq=99, steps=(step("import", "running"),))
    )
    job.refresh_from_db()
    body = world.client_for(Role.VIEWER).get(f"{jobs_url(world)}/{job.id}").json()

    version = ModelVersion.objects.get()
    assert late is False
    assert (job.status, job.error, job.model_version_id) == ("succeeded", "", version.id)
    assert (version.status, version.runtime, version.sha256, version.version) == (
        "ready",
        "onnx-tensor",
        "a" * 64,
        1,
    )
    assert version.model.organization_id == world.org.id
    assert (version.model.name, version.model.kind) == ("ranker", "tensor")
    assert body["model_version_id"] == version.id
    assert body["sha256"] == "a" * 64
    assert [s["name"] for s in body["steps"]] == ["import", "package"]
    assert body["steps"][0]["log"] == "import log"


def test_a_failure_keeps_its_reason_and_registers_nothing(
    world: OrgWorld, upload_dir: Path
) -> None:
    job = queued_job(world, upload_dir)

    compile_jobs.compile_job_finish(
        outcome=CompileOutcome(
            job_id=job.id,
            status="failed",
            steps=(step("validate", "failed"),),
            error="quality gate failed: min_cosine 0.92 (required >= 0.99)",
            error_code="quality_gate_failed",
        )
    )
    body = world.client_for(Role.VIEWER).get(f"{jobs_url(world)}/{job.id}").json()

    assert (body["status"], body["error_code"]) == ("failed", "quality_gate_failed")
    assert body["error"] == "quality gate failed: min_cosine 0.92 (required >= 0.99)"
    assert body["model_version_id"] is None
    assert ModelVersion.objects.count() == 0
    assert Model.objects.count() == 0


def test_a_manifest_of_the_wrong_kind_fails_the_job(
    world: OrgWorld, upload_dir: Path, tmp_path: Path
) -> None:
    job = queued_job(world, upload_dir)

    compile_jobs.compile_job_finish(
        outcome=CompileOutcome(
            job_id=job.id,
            status="succeeded",
            steps=(),
            manifest=manifest_for(tmp_path, kind="embedding", runtime="onnx-encoder"),
        )
    )
    job.refresh_from_db()

    assert (job.status, job.error_code) == ("failed", "invalid_artifact")
    assert job.error == (
        "the compiled artifact is a embedding/onnx-encoder model, the job asked for tensor"
    )
    assert ModelVersion.objects.count() == 0


def test_stale_jobs_fail_and_their_upload_is_removed(world: OrgWorld, upload_dir: Path) -> None:
    job = queued_job(world, upload_dir)
    fresh = queued_job(world, upload_dir)
    CompileJob.objects.filter(id=job.id).update(created_at="2020-01-01T00:00:00Z")

    failed = compile_jobs.compile_jobs_fail_stale(older_than_s=3600)
    job.refresh_from_db()
    fresh.refresh_from_db()

    assert failed == 1
    assert (job.status, job.error_code) == ("failed", "stale")
    assert job.error.startswith("no word from the compile node for 3600 s")
    assert fresh.status == "queued"
    assert not Path(job.source_detail["path"]).exists()
    assert Path(fresh.source_detail["path"]).exists()


def test_the_openapi_schema_lists_the_compile_endpoints(world: OrgWorld) -> None:
    schema = json.loads(world.client_for(Role.VIEWER).get("/api/v1/openapi.json").content)

    paths = [p for p in schema["paths"] if "compile-jobs" in p]
    assert sorted(paths) == [
        "/api/v1/organizations/{organization_id}/compile-jobs",
        "/api/v1/organizations/{organization_id}/compile-jobs/upload",
        "/api/v1/organizations/{organization_id}/compile-jobs/{job_id}",
    ]


def test_a_checkpoint_archive_is_staged_for_export(world: OrgWorld, upload_dir: Path) -> None:
    archive = tar_bytes({"mymodel/config.json": b"{}", "mymodel/model.safetensors": b"x"})

    status, body = upload(
        world.client_for(Role.DEVELOPER), world, archive, kind="embedding", source="hf-checkpoint"
    )

    assert status == 201, body
    assert body["source"] == "hf-checkpoint"
    staged = Path(CompileJob.objects.get(id=body["id"]).source_detail["path"])
    assert tree(staged) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (tar_bytes({"model.safetensors": b"x"}), "invalid_checkpoint"),
        (tar_bytes({"config.json": b"{}"}), "invalid_checkpoint"),
        # Pickled weights run code when loaded: refused even beside safetensors.
        (
            tar_bytes({"config.json": b"{}", "model.safetensors": b"x", "pytorch_model.bin": b"x"}),
            "unsafe_checkpoint",
        ),
        (tar_bytes({"config.json": b"{}", "sub/weights.pt": b"x"}), "unsafe_checkpoint"),
        (ranker_bytes(), "invalid_archive"),
    ],
)
def test_a_checkpoint_upload_that_is_no_checkpoint_is_refused(
    world: OrgWorld, upload_dir: Path, body: bytes, code: str
) -> None:
    status, error = upload(
        world.client_for(Role.DEVELOPER), world, body, kind="embedding", source="hf-checkpoint"
    )

    assert status == 400
    assert error["error"]["code"] == code
    assert CompileJob.objects.count() == 0
    assert tree(upload_dir) == []


def test_job_statuses_and_sources_are_the_contracts_values() -> None:
    assert CompileJob.Status.values == [s.value for s in CompileStatus]
    assert CompileJob.Source.values == [s.value for s in CompileSource]


def test_uploads_are_not_bound_by_the_json_body_limit(world: OrgWorld, upload_dir: Path) -> None:
    model = ranker_model()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(800_000, np.float32), "pad"))
    body = model.SerializeToString()
    assert len(body) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    status, job = upload(world.client_for(Role.DEVELOPER), world, body)

    assert status == 201, job
    assert job["source_detail"]["upload_bytes"] == len(body)


def test_a_node_checkpoint_with_pickled_weights_is_refused(world: OrgWorld, tmp_path: Path) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "pytorch_model.bin").write_bytes(b"x")
    payload = {"model_name": "enc", "kind": "embedding", "path": str(checkpoint)}

    with override_settings(MANTLE_CHECKPOINT_ROOTS=[tmp_path]):
        refused = world.client_for(Role.DEVELOPER).post(
            jobs_url(world), payload, content_type="application/json"
        )

    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "path"
    assert "pickled weights (pytorch_model.bin)" in refused.json()["error"]["message"]
    assert CompileJob.objects.count() == 0
