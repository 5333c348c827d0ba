"""The graph steps: check (checker and shape inference), optimize, and quantize."""

from __future__ import annotations

import time
from pathlib import Path

from workers.compile.steps.base import (
    EXTERNAL_DATA_FILE,
    MODEL_FILE,
    Job,
    Model,
    Step,
    artifacts_limit,
    first_line,
    node_count,
    session_options,
    tree_bytes,
)
from workers.compile.validate import CompileError


def check(step: Step, model: Model) -> None:
    """The full ONNX checker, then strict shape inference; the model moves to the typed graph."""
    import onnx

    try:
        onnx.checker.check_model(str(model.path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CompileError(
            f"the ONNX checker refused the graph: {first_line(exc)}", code="invalid_model"
        ) from exc
    step.say("onnx.checker: valid (full check, strict shape inference)")
    inferred = model.path.with_name(f"{model.path.stem}.inferred.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(
            str(model.path), str(inferred), check_type=True, strict_mode=True
        )
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise CompileError(
            f"shape inference failed: {first_line(exc)}", code="invalid_model"
        ) from exc
    graph = onnx.load_model(str(inferred), load_external_data=False).graph
    unknown = [o.name for o in graph.output if not o.type.tensor_type.HasField("shape")]
    step.metrics.update({"value_infos": len(graph.value_info), "outputs_without_shape": unknown})
    step.say("shape inference: %d intermediate values typed", len(graph.value_info))
    # The optimizer reads the inferred graph: same external data, same directory.
    model.path = inferred


def optimize(job: Job, step: Step, model: Model, work: Path) -> Path:
    """ONNX Runtime's offline optimizer at the job's level; the optimized graph's path."""
    import onnxruntime as ort

    level = job.request.optimization
    if level == "none":
        step.skip("graph optimization switched off for this job")
        return model.path
    out_dir = work / "optimized"
    out_dir.mkdir()
    out = out_dir / MODEL_FILE
    opts = session_options(job)
    # basic: provider-independent rewrites (constant folding, redundant
    # node removal), so the artifact runs on every pool's execution
    # provider; extended adds CPU/CUDA-only fusions. Nodes apply the
    # rest online when they load a model.
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if level == "basic"
        else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    )
    opts.optimized_model_filepath = str(out)
    if tree_bytes(model.path.parent) > artifacts_limit():
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", EXTERNAL_DATA_FILE
        )
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    started = time.monotonic()
    try:
        ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types, all with a message
        raise CompileError(
            f"ONNX Runtime can not load the graph: {first_line(exc)}", code="invalid_model"
        ) from exc
    before, after = node_count(model.path), node_count(out)
    step.metrics.update(
        {
            "level": level,
            "nodes_before": before,
            "nodes_after": after,
            "bytes_before": tree_bytes(model.path.parent, only=model.path),
            "bytes_after": tree_bytes(out_dir),
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    step.say("ONNX Runtime %s optimization: %d -> %d nodes", level, before, after)
    return out


def quantize(job: Job, step: Step, model_path: Path, work: Path) -> Path:
    """int8 dynamic or int4 weight-only quantization when the job asks; the candidate's path."""
    if not job.request.quantize:
        step.skip("no quantization requested")
        return model_path
    out_dir = work / "quantized"
    out_dir.mkdir()
    out = out_dir / MODEL_FILE
    if job.request.quantize == "int4":
        return _int4(step, model_path, out)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    started = time.monotonic()
    try:
        quantize_dynamic(
            str(model_path),
            str(out),
            weight_type=QuantType.QInt8,
            use_external_data_format=tree_bytes(model_path.parent) > artifacts_limit(),
        )
    except Exception as exc:  # the quantizer raises plain exceptions on graphs it can't take
        raise CompileError(
            f"int8 quantization failed: {first_line(exc)}", code="quantization_failed"
        ) from exc
    before = tree_bytes(model_path.parent, only=model_path)
    after = tree_bytes(out_dir)
    step.metrics.update(
        {
            "scheme": "int8 dynamic (weights QInt8, activations per batch)",
            "bytes_before": before,
            "bytes_after": after,
            "ratio": round(after / before, 4) if before else None,
            "seconds": round(time.monotonic() - started, 3),
        }
    )
    step.say("int8 dynamic quantization: %d -> %d bytes", before, after)
    return out


def _int4(step: Step, model_path: Path, out: Path) -> Path:
    """4-bit weights (MatMulNBits, block 32, integer zero points), the tied head included."""
    from workers.compile import int4

    if tree_bytes(model_path.parent) > artifacts_limit():
        raise CompileError(
            "int4 quantization takes graphs under 1.8 GB (fp32) for now", code="quantization_failed"
        )
    try:
        report = int4.quantize(model_path, out, int4.Options())
    except Exception as exc:  # the quantizer raises plain exceptions on graphs it can't take
        raise CompileError(
            f"int4 quantization failed: {first_line(exc)}", code="quantization_failed"
        ) from exc
    if not report["matmul_nbits"]:
        raise CompileError(
            "int4 quantization found no MatMul with constant weights", code="quantization_failed"
        )
    step.metrics.update(
        {**report, "ratio": round(report["bytes_after"] / report["bytes_before"], 4)}
    )
    step.say(
        "int4 weights: %d MatMulNBits, %d bytes -> %d",
        report["matmul_nbits"],
        report["bytes_before"],
        report["bytes_after"],
    )
    return out
