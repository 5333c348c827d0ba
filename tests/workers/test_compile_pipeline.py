"""The compile pipeline in this process, on small ONNX models built here (no torch needed)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests.workers.compile_support import (
    BIAS,
    WEIGHTS,
    external_upload,
    ranker_bytes,
    tree,
)
from workers.compile import artifacts
from workers.compile.jobs import job_run
from workers.compile.pipeline import Pipeline
from workers.compile.settings import CompileSettings
from workers.contract import (
    CompileOutcome,
    CompileProgress,
    CompileRequest,
    TaskName,
    from_payload,
)

STEPS = ["import", "check", "optimize", "quantize", "validate", "tokenizer", "package"]


def upload(tmp_path: Path, files: Mapping[str, bytes]) -> Path:
    src = tmp_path / "upload"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    return src


def request_for(src: Path, **kwargs: Any) -> CompileRequest:
    fields: dict[str, Any] = {
        "job_id": "cj_test",
        "organization_id": "org_test",
        "model_name": "ranker",
        "kind": "tensor",
        "source": "onnx",
        "source_path": str(src),
        **kwargs,
    }
    return CompileRequest(**fields)


def test_a_tensor_model_compiles_into_a_content_addressed_artifact(tmp_path: Path) -> None:
    src = upload(tmp_path, external_upload())
    store = tmp_path / "store"
    reports: list[list[str]] = []

    def report(steps: Sequence[Mapping[str, Any]]) -> None:
        reports.append([f"{s['name']}:{s['status']}" for s in steps])

    outcome = Pipeline(request_for(src, delete_source=True), store=store, report=report).run()

    assert (outcome.status, outcome.error, outcome.error_code) == ("succeeded", "", "")
    assert [(s["name"], s["status"]) for s in outcome.steps] == [
        ("import", "succeeded"),
        ("check", "succeeded"),
        ("optimize", "succeeded"),
        ("quantize", "skipped"),
        ("validate", "succeeded"),
        ("tokenizer", "skipped"),
        ("package", "succeeded"),
    ]
    assert all(s["duration_s"] is not None and s["log"] for s in outcome.steps)
    # Two reports per step: when it starts and when it ends.
    assert len(reports) == 2 * len(STEPS)
    assert reports[0][0] == "import:running"
    manifest = outcome.manifest
    assert manifest is not None
    sha = manifest["sha256"]
    assert manifest["location"] == str((store / sha).resolve())
    assert (manifest["kind"], manifest["runtime"], manifest["tokenizer_file"]) == (
        "tensor",
        "onnx-tensor",
        None,
    )
    assert manifest["io"] == {
        "inputs": {"features": {"dtype": "float32", "shape": ["batch", 8]}},
        "outputs": {"score": {"dtype": "float32", "shape": ["batch", 1]}},
    }
    assert manifest["validation"]["parity"]["max_abs_diff"] < 1e-6
    assert manifest["validation"]["parity"]["passed"] is True
    assert artifacts.verify_artifact(store / sha)["sha256"] == sha
    # External data folded in (a 44-byte graph needs none), staging gone, upload gone.
    assert tree(store) == [sha, f"{sha}/mantle.json", f"{sha}/model.onnx"]
    assert not src.exists()
    session = ort.InferenceSession(str(store / sha / "model.onnx"))
    x = np.ones((3, 8), dtype=np.float32)
    (score,) = session.run(None, {"features": x})
    np.testing.assert_allclose(score, x @ WEIGHTS + BIAS, rtol=1e-6)


def test_the_same_model_twice_is_the_same_artifact(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = Pipeline(
        request_for(upload(tmp_path, {"model.onnx": ranker_bytes()})), store=store
    ).run()
    again_src = tmp_path / "again"
    again_src.mkdir()
    (again_src / "model.onnx").write_bytes(ranker_bytes())
    second = Pipeline(request_for(again_src, job_id="cj_other"), store=store).run()

    assert first.manifest is not None and second.manifest is not None
    assert first.manifest["sha256"] == second.manifest["sha256"]
    assert [p for p in tree(store) if "/" not in p] == [first.manifest["sha256"]]


def test_a_quantized_variant_over_its_gate_is_rejected_with_the_numbers(tmp_path: Path) -> None:
    src = upload(tmp_path, {"model.onnx": ranker_bytes()})
    store = tmp_path / "store"

    outcome = Pipeline(
        request_for(src, quantize="int8", tolerance=1e-6, delete_source=True), store=store
    ).run()

    steps = {s["name"]: s for s in outcome.steps}
    measured = steps["validate"]["metrics"]["parity"]["max_abs_diff"]
    assert outcome.status == "failed"
    assert outcome.error_code == "quality_gate_failed"
    assert measured > 1e-6
    assert outcome.error == (
        "quality gate failed: the int8 variant does not match the source model: "
        f"max_abs_diff {measured:.6g} (required <= 1e-06); it is not shipped (compile "
        "without quantization, or accept a looser tolerance)"
    )
    assert steps["quantize"]["status"] == "succeeded"
    assert steps["quantize"]["metrics"]["bytes_after"] > 0
    assert (steps["validate"]["status"], steps["package"]["status"]) == ("failed", "skipped")
    assert steps["validate"]["metrics"]["parity"]["passed"] is False
    assert outcome.manifest is None
    assert tree(store) == []  # not shipped: nothing in the store, staging included
    assert not src.exists()


def test_the_default_int8_gate_passes_a_linear_model(tmp_path: Path) -> None:
    src = upload(tmp_path, {"model.onnx": ranker_bytes()})

    outcome = Pipeline(request_for(src, quantize="int8"), store=tmp_path / "store").run()

    assert outcome.status == "succeeded"
    assert outcome.manifest is not None
    assert outcome.manifest["build"]["quantization"] == "int8"
    assert outcome.manifest["validation"]["parity"]["variant"] == "int8"
    assert outcome.manifest["validation"]["parity"]["gate"]["bound"] == 0.05


@pytest.mark.parametrize("kind", ["tensor", "embedding"])
def test_int4_is_refused_for_models_that_are_not_causal_lms(tmp_path: Path, kind: str) -> None:
    src = upload(tmp_path, {"model.onnx": ranker_bytes()})

    outcome = Pipeline(request_for(src, kind=kind, quantize="int4"), store=tmp_path / "store").run()

    assert (outcome.status, outcome.error_code) == ("failed", "invalid_request")
    assert (
        outcome.error == "int4 (4-bit weights) is for chat and completion models; use int8 or none"
    )
    assert tree(tmp_path / "store") == []


@pytest.mark.parametrize(
    ("files", "kind", "code"),
    [
        ({"model.onnx": b"\x08\x09"}, "tensor", "invalid_model"),
        (
            {"model.onnx": ranker_bytes(op_domain="com.acme", op_type="X")},
            "tensor",
            "unsupported_operator",
        ),
        ({"model.onnx": ranker_bytes()}, "embedding", "interface_mismatch"),
    ],
)
def test_bad_uploads_fail_the_job_and_leave_nothing(
    tmp_path: Path, files: Mapping[str, bytes], kind: str, code: str
) -> None:
    src = upload(tmp_path, files)
    store = tmp_path / "store"

    outcome = Pipeline(request_for(src, kind=kind, delete_source=True), store=store).run()

    assert (outcome.status, outcome.error_code) == ("failed", code)
    assert outcome.steps[0]["status"] == "failed"
    assert outcome.steps[0]["log"].endswith(f"failed: {outcome.error}")
    assert [s["status"] for s in outcome.steps[1:]] == ["skipped"] * 6
    assert tree(store) == []
    assert not src.exists()


def test_a_checkpoint_source_never_deleted_and_a_missing_one_said_so(tmp_path: Path) -> None:
    outcome = Pipeline(
        request_for(tmp_path / "gone", source="onnx"), store=tmp_path / "store"
    ).run()

    assert outcome.error_code == "missing_source"
    assert "is gone from this compile node" in outcome.error


def test_job_run_reports_progress_then_the_outcome_on_the_control_queue(tmp_path: Path) -> None:
    src = upload(tmp_path, {"model.onnx": ranker_bytes()})
    sent: list[tuple[str, dict[str, Any]]] = []
    settings = CompileSettings(
        broker_url="memory://",
        artifact_dir=tmp_path / "default-store",
        prepare_python=None,
        time_limit_s=60,
        ort_threads=1,
        max_tensor_bytes=1 << 20,
    )

    outcome = job_run(
        request=request_for(src, store=str(tmp_path / "store")),
        settings=settings,
        send=lambda name, payload: sent.append((name, json.loads(json.dumps(payload)))),
    )

    names = [n for n, _ in sent]
    assert names == [TaskName.COMPILE_STEP.value] * 14 + [TaskName.COMPILE_FINISHED.value]
    seqs = [from_payload(CompileProgress, p).seq for _, p in sent[:-1]]
    assert seqs == sorted(set(seqs))  # strictly increasing
    final = from_payload(CompileOutcome, sent[-1][1])
    assert final == outcome
    assert final.manifest is not None
    assert final.manifest["location"].startswith(str((tmp_path / "store").resolve()))
    assert tree(tmp_path / "default-store") == []


def test_a_remote_store_gets_the_sealed_artifact_manifest_last(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    url = "memory://mantle-compile-test/artifacts"
    src = upload(tmp_path, {"model.onnx": ranker_bytes()})
    settings = CompileSettings(
        broker_url="memory://",
        artifact_dir=tmp_path / "cache",
        prepare_python=None,
        time_limit_s=60,
        ort_threads=1,
        max_tensor_bytes=1 << 20,
    )
    try:
        outcome = job_run(
            request=request_for(src, store=url), settings=settings, send=lambda n, p: None
        )

        assert outcome.manifest is not None
        sha = outcome.manifest["sha256"]
        assert outcome.manifest["location"] == f"{url}/{sha}"
        remote = json.loads(fs.cat(f"/mantle-compile-test/artifacts/{sha}/mantle.json"))
        assert remote["sha256"] == sha
        assert (
            fs.cat(f"/mantle-compile-test/artifacts/{sha}/model.onnx")
            == (tmp_path / "cache" / sha / "model.onnx").read_bytes()
        )
        assert tree(tmp_path / "cache") == [sha, f"{sha}/mantle.json", f"{sha}/model.onnx"]
    finally:
        fs.rm("/mantle-compile-test", recursive=True)
