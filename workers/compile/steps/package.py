"""The package step: the artifact directory, its manifest, sealed into the store (and published)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from workers.compile import artifacts
from workers.compile.steps.base import (
    EXTERNAL_DATA_FILE,
    FP32_VARIANT_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    Job,
    Model,
    Step,
    artifacts_limit,
    first_line,
    tree_bytes,
)
from workers.compile.validate import CompileError, GraphReport, validate_onnx
from workers.contract import CompileRequest, Runtime


def package(
    job: Job,
    step: Step,
    model: Model,
    candidate: Path,
    validation: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    work: Path,
    steps: Sequence[Step],
    full_precision: Path | None = None,
) -> dict[str, Any]:
    """Seal the artifact into the store; its sha256, size and location.

    A quantized causal LM keeps its full-precision graph beside it as the `fp32`
    variant (docs/artifacts.md): what the quality gate measured it against, and what
    an operator can serve instead.
    """
    final = work / "artifact"
    final.mkdir()
    _save_graph(candidate, final / MODEL_FILE)
    variants: dict[str, Any] = {}
    if full_precision is not None and job.runtime == Runtime.CAUSAL_LM and job.request.quantize:
        _save_graph(full_precision, final / FP32_VARIANT_FILE)
        variants["fp32"] = {"model_file": FP32_VARIANT_FILE, "weights": "fp32"}
    if tokenizer:
        (final / TOKENIZER_FILE).write_text(tokenizer["tokenizer_json"], encoding="utf-8")
    manifest = build_manifest(job, model, final, validation, tokenizer, steps)
    if variants:
        manifest["variants"] = variants
    path = artifacts.commit_artifact(job.store, final, manifest)
    sealed = artifacts.verify_artifact(path, fast=False)
    location = str(path.resolve())
    if job.remote:
        location = _publish(path, job.remote)
    step.metrics.update(
        {"sha256": sealed["sha256"], "size_bytes": sealed["size_bytes"], "location": location}
    )
    step.say("artifact %s (%d bytes) in %s", sealed["sha256"], sealed["size_bytes"], location)
    return {**sealed, "location": location}


def _save_graph(candidate: Path, dest: Path) -> None:
    """The candidate graph at `dest`, keeping only the opset domains its nodes use."""
    import onnx

    proto = onnx.load_model(str(candidate), load_external_data=True)
    # ONNX Runtime's saved graphs import every domain it knows; keep the used ones.
    used = {n.domain or "" for n in proto.graph.node} | {"", "ai.onnx"}
    kept = [o for o in proto.opset_import if (o.domain or "") in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    external = tree_bytes(candidate.parent) > artifacts_limit()
    onnx.save_model(
        proto,
        str(dest),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        # model.onnx.data for the served graph; a variant's data beside it under its own name.
        location=EXTERNAL_DATA_FILE if dest.name == MODEL_FILE else f"{dest.name}.data",
    )


def _publish(path: Path, remote: str) -> str:
    from workers.compile.remote import publish

    try:
        return publish(path, remote)
    except Exception as exc:  # fsspec backends raise their own errors
        raise CompileError(
            f"publishing the artifact to {remote} failed: {first_line(exc)}",
            code="store_unavailable",
        ) from exc


def build_manifest(
    job: Job,
    model: Model,
    final: Path,
    validation: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    steps: Sequence[Step],
) -> dict[str, Any]:
    """The artifact's manifest (docs/artifacts.md): the export's part, else what the graph says."""
    assert model.report is not None
    request, runtime = job.request, job.runtime
    partial = model.partial_manifest
    report = validate_onnx(final, MODEL_FILE, job.limits)
    manifest: dict[str, Any] = {
        "format": artifacts.MANIFEST_FORMAT,
        "name": request.model_name,
        "kind": request.kind,
        "family": partial.get("family", ""),
        "runtime": runtime,
        "licence": partial.get("licence", ""),
        "model_file": MODEL_FILE,
        "tokenizer_file": TOKENIZER_FILE if tokenizer else None,
        "context_length": int(
            partial.get("context_length") or graph_context_length(runtime, report)
        ),
        "chat_template": tokenizer.get("chat_template"),
        "bos_token_id": tokenizer.get("bos_token_id"),
        "eos_token_ids": list(tokenizer.get("eos_token_ids") or []),
        "pad_token_id": tokenizer.get("pad_token_id"),
        "io": partial.get("io") or {"inputs": report.inputs, "outputs": report.outputs},
    }
    if runtime == Runtime.CAUSAL_LM:
        manifest["causal_lm"] = partial.get("causal_lm") or causal_lm_section(report)
    if runtime == Runtime.ENCODER:
        manifest["embedding"] = partial.get("embedding") or embedding_section(
            report, manifest["context_length"]
        )
    manifest["validation"] = {
        **validation,
        **({"export": partial["validation"]} if partial.get("validation") else {}),
    }
    manifest["source"] = {
        "kind": request.source,
        **(
            partial.get("source", {})
            if partial
            else {"model_file": request.model_file, "graph": model.report.as_metrics()}
        ),
    }
    manifest["build"] = _build_section(request, partial, steps)
    quantize = next((s for s in steps if s.name == "quantize"), None)
    if request.quantize == "int4" and quantize is not None:
        from workers.compile.int4 import manifest_section

        manifest["quantization"] = manifest_section(quantize.metrics)
    return manifest


def _build_section(
    request: CompileRequest, partial: Mapping[str, Any], steps: Sequence[Step]
) -> dict[str, Any]:
    """How the artifact was built: the job's options, step durations, tool versions."""
    from workers.compile.common import versions

    return {
        "job_id": request.job_id,
        "optimization": request.optimization,
        "quantization": request.quantize or "none",
        "steps": {s.name: s.duration_s for s in steps if s.duration_s is not None},
        "toolchain": {
            **partial.get("build", {}).get("toolchain", {}),
            **versions("onnx", "onnxruntime", "numpy", "tokenizers"),
        },
    }


def graph_context_length(runtime: str, report: GraphReport) -> int:
    """The context length of an uploaded graph, which no export manifest states."""
    if runtime == Runtime.TENSOR:
        return 0
    # An uploaded graph does not say how long its inputs may be; the
    # sequence length of a fixed-size input does, else a safe default.
    shape = report.inputs.get("input_ids", {}).get("shape", [])
    if len(shape) == 2 and isinstance(shape[1], int):
        return shape[1]
    return 512 if runtime == Runtime.ENCODER else 2048


def causal_lm_section(report: GraphReport) -> dict[str, Any]:
    layers = sum(
        1 for n in report.inputs if n.startswith("past_key_values.") and n.endswith(".key")
    )
    past = report.inputs["past_key_values.0.key"]["shape"]
    logits = report.outputs["logits"]["shape"]
    if not (isinstance(past[1], int) and isinstance(past[3], int) and isinstance(logits[-1], int)):
        raise CompileError(
            "the causal LM graph must declare fixed kv-head, head-dim and vocabulary sizes",
            code="interface_mismatch",
        )
    return {
        "num_layers": layers,
        "num_kv_heads": past[1],
        "head_dim": past[3],
        "vocab_size": logits[-1],
        "logits": "last" if logits[1] == 1 else "all",
    }


def embedding_section(report: GraphReport, context_length: int) -> dict[str, Any]:
    shape = report.outputs["sentence_embedding"]["shape"]
    if len(shape) != 2 or not isinstance(shape[1], int):
        raise CompileError(
            "sentence_embedding must be [batch, dimensions] with a fixed dimension",
            code="interface_mismatch",
        )
    return {
        "dimensions": shape[1],
        "max_input_tokens": context_length,
        "pooling": "in-graph",
        "normalized": None,
    }
