"""The first step: import an uploaded ONNX graph, or export a Hugging Face checkpoint to one."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workers.compile import artifacts
from workers.compile.steps.base import (
    EXTERNAL_DATA_FILE,
    MODEL_FILE,
    SAMPLE_INPUTS_FILE,
    TOKENIZER_FILE,
    Job,
    Model,
    Step,
    artifacts_limit,
    tree_bytes,
)
from workers.compile.validate import CompileError, GraphReport, check_checkpoint, validate_onnx
from workers.contract import Runtime

ROOT = Path(__file__).resolve().parents[3]


def default_prepare_python(home: Path | None = None) -> Path:
    """The prepare venv's interpreter, found the way bin/_prepare.sh names it."""
    home = home or Path(os.environ.get("MANTLE_HOME", Path.home() / ".cache" / "mantle"))
    req = ROOT / "requirements"
    digest = hashlib.sha256(
        (req / "prepare.txt").read_bytes() + (req / "prepare-nodeps.txt").read_bytes()
    ).hexdigest()[:16]
    return home / "venvs" / f"prepare-{digest}" / "bin" / "python"


# --- import (an ONNX upload) ---------------------------------------------------------------


def import_onnx(job: Job, step: Step, work: Path) -> Model:
    request = job.request
    src = Path(request.source_path)
    if not src.is_dir():
        raise CompileError(
            f"the job's source {src} is gone from this compile node (was it already run?)",
            code="missing_source",
        )
    report = validate_onnx(src, request.model_file, job.limits)
    step.metrics.update(report.as_metrics())
    step.say(
        "%s: %d nodes, %d tensors (%d bytes), opsets %s",
        report.model_file,
        sum(report.operators.values()),
        report.initializers,
        report.initializer_bytes,
        report.opsets,
    )
    check_interface(job.runtime, report)
    dest = _copy_upload(src, work / "src", [request.model_file, *report.external_files])
    if job.runtime != Runtime.TENSOR and not (dest / TOKENIZER_FILE).is_file():
        raise CompileError(
            f"a {request.kind} model needs its {TOKENIZER_FILE} (Hugging Face tokenizers "
            "format) in the upload, beside the graph",
            code="missing_tokenizer",
        )
    model_path = dest / request.model_file
    if report.external_files:
        fold_external_data(model_path, report.external_files, step)
    return Model(path=model_path, report=report, tokenizer_dir=dest)


def _copy_upload(src: Path, dest: Path, graph_files: Sequence[str]) -> Path:
    """Copy only what the graph references (and the tokenizer files) into `dest`.

    The rest of an upload never reaches the artifact.
    """
    dest.mkdir()
    wanted = list(graph_files)
    for name in (TOKENIZER_FILE, "tokenizer_config.json", SAMPLE_INPUTS_FILE):
        if (src / name).is_file() and not (src / name).is_symlink():
            wanted.append(name)
    for rel in dict.fromkeys(wanted):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)
    return dest


def check_interface(runtime: str, report: GraphReport) -> None:
    """The graph's inputs and outputs are the ones its kind's runtime serves."""
    inputs, outputs = set(report.inputs), set(report.outputs)
    if runtime == Runtime.ENCODER:
        allowed = {"input_ids", "attention_mask", "token_type_ids"}
        if not {"input_ids", "attention_mask"} <= inputs <= allowed or outputs != {
            "sentence_embedding"
        }:
            raise CompileError(
                f"an embedding model's graph takes input_ids, attention_mask (and optionally "
                f"token_type_ids) and returns sentence_embedding; this one takes "
                f"{sorted(inputs)} and returns {sorted(outputs)}",
                code="interface_mismatch",
            )
    elif runtime == Runtime.CAUSAL_LM:
        layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        want_in = {"input_ids", "attention_mask", "position_ids"} | {
            f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")
        }
        want_out = {"logits"} | {
            f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")
        }
        if layers == 0 or inputs != want_in or outputs != want_out:
            raise CompileError(
                "a chat or completion model's graph must follow the causal LM interface of "
                "docs/artifacts.md (input_ids, attention_mask, position_ids, "
                "past_key_values.{i}.key|value -> logits, present.{i}.key|value)",
                code="interface_mismatch",
            )
    if not outputs:
        raise CompileError("the graph has no outputs", code="invalid_model")


def fold_external_data(model_path: Path, files: Sequence[str], step: Step) -> None:
    """Rewrite the graph with its external data in one place, beside it.

    Under the protobuf limit the weights go into the graph itself; above it,
    into one `model.onnx.data`. Either way every later step (ONNX Runtime's
    saved graphs, the quantizer) finds them relative to the file it reads.
    """
    import onnx

    proto = onnx.load_model(str(model_path), load_external_data=True)
    external = tree_bytes(model_path.parent) > artifacts_limit()
    for rel in files:
        (model_path.parent / rel).unlink()
    onnx.save_model(
        proto,
        str(model_path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
    )
    step.say(
        "external data %s folded into %s",
        list(files),
        EXTERNAL_DATA_FILE if external else model_path.name,
    )


# --- export (a Hugging Face checkpoint) ----------------------------------------------------


def export_hf(job: Job, step: Step, work: Path) -> Model:
    src = Path(job.request.source_path)
    # Again on the node: the directory may have changed since the control plane looked.
    check_checkpoint(src)
    python = job.prepare_python or default_prepare_python()
    if not Path(python).is_file():
        raise CompileError(
            "this compile node has no export environment (torch, transformers): run "
            "bin/prepare-models once, or set MANTLE_PREPARE_PYTHON",
            code="export_unavailable",
        )
    out = work / "export"
    reference = work / "reference.npz"
    step.say("exporting %s with torch.onnx (dynamo) in %s", src, python)
    _run_export_child(job, step, Path(python), src, out, reference)
    partial = artifacts.read_manifest(out)
    (out / artifacts.MANIFEST_NAME).unlink()
    step.metrics.update(_export_metrics(partial))
    report = validate_onnx(out, MODEL_FILE, job.limits)
    step.metrics["graph"] = report.as_metrics()
    return Model(
        path=out / MODEL_FILE,
        report=report,
        partial_manifest=partial,
        reference=reference,
        tokenizer_dir=out,
    )


def _run_export_child(
    job: Job, step: Step, python: Path, src: Path, out: Path, reference: Path
) -> None:
    """`python -m workers.compile.export_hf` in the prepare venv, its stderr into the log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("DJANGO_SETTINGS_MODULE",):
        env.pop(var, None)
    argv = [
        str(python),
        "-m",
        "workers.compile.export_hf",
        "--source",
        str(src),
        "--out",
        str(out),
        "--kind",
        job.request.kind,
        "--name",
        job.request.model_name,
        "--reference",
        str(reference),
    ]
    proc = subprocess.run(  # noqa: S603 - our own interpreter and module
        argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    step.log.extend(lines)
    if proc.returncode != 0:
        refused = [ln.split("refused: ", 1)[1] for ln in lines if "refused: " in ln]
        reason = refused[-1] if refused else (lines[-1] if lines else "no output")
        raise CompileError(f"exporting the checkpoint failed: {reason}", code="export_failed")


def _export_metrics(partial: dict[str, Any]) -> dict[str, Any]:
    return {
        "export_seconds": partial.get("build", {}).get("export_seconds"),
        "peak_rss_mb": partial.get("build", {}).get("peak_rss_mb"),
        "source_parity": partial.get("validation", {}),
        "toolchain": partial.get("build", {}).get("toolchain", {}),
    }
