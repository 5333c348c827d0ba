"""The compile pipeline: import or export, check, optimize, quantize, validate, package."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.chat_template import TemplateBudget, template_budget_from_env
from workers.compile import artifacts
from workers.compile.text_checks import check_chat_template, check_tokenizer
from workers.compile.validate import (
    CompileError,
    GraphReport,
    Limits,
    check_checkpoint,
    validate_onnx,
)
from workers.contract import CompileOutcome, CompileRequest, CompileSource, CompileStatus, Runtime
from workers.tokenizer_limits import TokenizerLimits

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

# Runs on a compile node in the platform venv: onnx, onnxruntime (its offline
# optimizer and quantizer), numpy, tokenizers. The Hugging Face export, which
# needs torch, runs as a child process in the prepare venv (export_hf.py).

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
SAMPLE_INPUTS_FILE = "sample_inputs.npz"
"""An upload may carry its own sample inputs (an .npz keyed by input name) for parity."""
LOG_LIMIT = 64 * 1024
"""Bytes of log kept per step: the start and end of a long export log matter most."""

RUNTIME_BY_KIND = {
    "chat": Runtime.CAUSAL_LM.value,
    "completion": Runtime.CAUSAL_LM.value,
    "embedding": Runtime.ENCODER.value,
    "tensor": Runtime.TENSOR.value,
}
QUANTIZATIONS = ("", "int8")
OPTIMIZATIONS = ("none", "basic", "extended")


@dataclass(frozen=True, slots=True)
class Gate:
    """A parity bound: `metric` must be >= bound (`higher_is_better`) or <= bound."""

    metric: str
    bound: float
    higher_is_better: bool

    def passes(self, value: float) -> bool:
        if value != value:  # NaN never passes
            return False
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def describe(self, value: float) -> str:
        op = ">=" if self.higher_is_better else "<="
        return f"{self.metric} {value:.6g} (required {op} {self.bound:g})"


# Defaults per runtime, fp32 and int8. fp32 bounds are a few times what the
# exporters measure (MiniLM 1.2e-7, SmolLM2 6e-5); int8 ones are what a
# variant must keep to be worth serving: MiniLM's int8 reaches only 0.96-0.98
# cosine to fp32 (docs/MODELS), so by default it is rejected, as it should be.
DEFAULT_GATES: dict[tuple[str, bool], Gate] = {
    (Runtime.ENCODER.value, False): Gate("min_cosine", 0.9999, higher_is_better=True),
    (Runtime.ENCODER.value, True): Gate("min_cosine", 0.99, higher_is_better=True),
    (Runtime.CAUSAL_LM.value, False): Gate("max_abs_logit_diff", 1e-3, higher_is_better=False),
    (Runtime.CAUSAL_LM.value, True): Gate("max_abs_logit_diff", 1.0, higher_is_better=False),
    (Runtime.TENSOR.value, False): Gate("max_abs_diff", 1e-4, higher_is_better=False),
    (Runtime.TENSOR.value, True): Gate("max_abs_diff", 0.05, higher_is_better=False),
}

DEFAULT_LIMITS = Limits()

Report = Callable[[Sequence[Mapping[str, Any]]], None]


@dataclass(slots=True)
class Step:
    name: str
    status: str = "pending"  # pending | running | succeeded | failed | skipped
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    log: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def say(self, message: str, *args: object) -> None:
        text = message % args if args else message
        logger.info("[%s] %s", self.name, text)
        self.log.append(text)

    def to_dict(self) -> dict[str, Any]:
        text = "\n".join(self.log)
        if len(text) > LOG_LIMIT:
            half = LOG_LIMIT // 2
            cut = len(text) - LOG_LIMIT
            text = f"{text[:half]}\n[... {cut} characters left out ...]\n{text[-half:]}"
        return {
            "name": self.name,
            "status": self.status,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": self.duration_s,
            "log": text,
            "metrics": self.metrics,
        }


@dataclass(slots=True)
class _Model:
    """The graph being compiled, where it is, and what is known about it."""

    path: Path
    report: GraphReport | None = None
    partial_manifest: dict[str, Any] = field(default_factory=dict)
    reference: Path | None = None
    tokenizer_dir: Path | None = None


def default_prepare_python(home: Path | None = None) -> Path:
    """The prepare venv's interpreter, found the way bin/_prepare.sh names it."""
    home = home or Path(os.environ.get("MANTLE_HOME", Path.home() / ".cache" / "mantle"))
    req = ROOT / "requirements"
    digest = hashlib.sha256(
        (req / "prepare.txt").read_bytes() + (req / "prepare-nodeps.txt").read_bytes()
    ).hexdigest()[:16]
    return home / "venvs" / f"prepare-{digest}" / "bin" / "python"


def gate_for(request: CompileRequest, runtime: str) -> Gate:
    gate = DEFAULT_GATES[(runtime, bool(request.quantize))]
    if request.tolerance is None:
        return gate
    return Gate(gate.metric, float(request.tolerance), gate.higher_is_better)


def check_request(request: CompileRequest) -> None:
    """Options the pipeline can not run with, refused before any work starts."""
    if request.kind not in RUNTIME_BY_KIND:
        raise CompileError(f"unknown model kind {request.kind!r}", code="invalid_request")
    if request.quantize not in QUANTIZATIONS:
        raise CompileError(
            f"unknown quantization {request.quantize!r} (choose int8 or none)",
            code="invalid_request",
        )
    if request.optimization not in OPTIMIZATIONS:
        raise CompileError(
            f"unknown optimization level {request.optimization!r} "
            f"(choose from {', '.join(OPTIMIZATIONS)})",
            code="invalid_request",
        )
    if request.source == CompileSource.HF_CHECKPOINT and request.kind == "tensor":
        raise CompileError(
            "Hugging Face checkpoints compile to chat, completion or embedding models; "
            "upload an ONNX graph for a tensor model",
            code="invalid_request",
        )


class Pipeline:
    """One compile job on this node. `run()` never raises: it returns the outcome."""

    def __init__(
        self,
        request: CompileRequest,
        *,
        store: Path,
        report: Report | None = None,
        prepare_python: Path | None = None,
        limits: Limits = DEFAULT_LIMITS,
        ort_threads: int = 2,
        remote: str | None = None,
        tokenizer_limits: TokenizerLimits | None = None,
        template_budget: TemplateBudget | None = None,
        tokenizer_probe_s: float = 10.0,
    ) -> None:
        self.request = request
        # The gateway's limits: what passes here is what the gateway will serve.
        self.tokenizer_limits = tokenizer_limits or TokenizerLimits.from_env()
        self.template_budget = template_budget or template_budget_from_env()
        self.tokenizer_probe_s = tokenizer_probe_s
        self.store = store
        self.remote = remote  # an fsspec URL the sealed artifact is published to
        self.runtime = RUNTIME_BY_KIND.get(request.kind, "")
        self.limits = limits
        self.ort_threads = ort_threads
        self.prepare_python = prepare_python
        self._report = report or (lambda steps: None)
        first = "export" if request.source == CompileSource.HF_CHECKPOINT else "import"
        names = (first, "check", "optimize", "quantize", "validate", "tokenizer", "package")
        self.steps = [Step(n) for n in names]

    # --- driving -------------------------------------------------------------------------

    def run(self) -> CompileOutcome:
        manifest: dict[str, Any] | None = None
        error, code = "", ""
        try:
            check_request(self.request)
            manifest = self._run()
        except CompileError as exc:
            error, code = exc.message, exc.code
        except Exception as exc:  # the job must end with an outcome, whatever happened
            logger.exception("compile job %s: unexpected error", self.request.job_id)
            step = next((s for s in self.steps if s.status == "failed"), None)
            where = f" in step {step.name}" if step else ""
            error, code = f"internal error{where}: {type(exc).__name__}: {exc}", "internal_error"
        finally:
            if self.request.delete_source:
                # A staged upload belongs to its job: gone once the job ends, either way.
                shutil.rmtree(self.request.source_path, ignore_errors=True)
        for step in self.steps:
            if step.status == "pending":
                step.status = "skipped"
        status = CompileStatus.FAILED if error else CompileStatus.SUCCEEDED
        return CompileOutcome(
            job_id=self.request.job_id,
            status=status.value,
            steps=self.step_dicts(),
            manifest=manifest,
            error=error,
            error_code=code,
        )

    def step_dicts(self) -> tuple[dict[str, Any], ...]:
        return tuple(s.to_dict() for s in self.steps)

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[Step]:
        step = next(s for s in self.steps if s.name == name)
        step.status = "running"
        step.started_at = time.time()
        started = time.monotonic()
        self._send()
        try:
            yield step
        except CompileError as exc:
            step.status = "failed"
            step.say("failed: %s", exc.message)
            raise
        except Exception as exc:
            step.status = "failed"
            step.say("failed: %s: %s", type(exc).__name__, exc)
            raise
        else:
            if step.status == "running":
                step.status = "succeeded"
        finally:
            step.finished_at = time.time()
            step.duration_s = round(time.monotonic() - started, 3)
            self._send()

    def _send(self) -> None:
        try:
            self._report(self.step_dicts())
        except Exception:  # progress is best effort; the outcome carries every step again
            logger.exception("compile job %s: progress report failed", self.request.job_id)

    def _run(self) -> dict[str, Any]:
        self.store.mkdir(parents=True, exist_ok=True)
        with artifacts.staging_dir(self.store, f"compile-{self.request.job_id}") as work:
            if self.request.source == CompileSource.HF_CHECKPOINT:
                with self._step("export") as step:
                    model = self._export(step, work)
            else:
                with self._step("import") as step:
                    model = self._import(step, work)
            with self._step("check") as step:
                self._check(step, model)
            with self._step("optimize") as step:
                optimized = self._optimize(step, model, work)
            with self._step("quantize") as step:
                candidate = self._quantize(step, optimized, work)
            with self._step("validate") as step:
                validation = self._validate(step, model, candidate, work)
            with self._step("tokenizer") as step:
                tokenizer = self._tokenizer(step, model)
            with self._step("package") as step:
                return self._package(step, model, candidate, validation, tokenizer, work)

    # --- steps -----------------------------------------------------------------------------

    def _import(self, step: Step, work: Path) -> _Model:
        src = Path(self.request.source_path)
        if not src.is_dir():
            raise CompileError(
                f"the job's source {src} is gone from this compile node (was it already run?)",
                code="missing_source",
            )
        report = validate_onnx(src, self.request.model_file, self.limits)
        step.metrics.update(report.as_metrics())
        step.say(
            "%s: %d nodes, %d tensors (%d bytes), opsets %s",
            report.model_file,
            sum(report.operators.values()),
            report.initializers,
            report.initializer_bytes,
            report.opsets,
        )
        self._check_interface(report)
        dest = work / "src"
        dest.mkdir()
        # Only what the graph references (and the tokenizer files) goes on: the
        # rest of an upload never reaches the artifact.
        wanted = [self.request.model_file, *report.external_files]
        for name in (TOKENIZER_FILE, "tokenizer_config.json", SAMPLE_INPUTS_FILE):
            if (src / name).is_file() and not (src / name).is_symlink():
                wanted.append(name)
        for rel in dict.fromkeys(wanted):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, target)
        if self.runtime != Runtime.TENSOR and not (dest / TOKENIZER_FILE).is_file():
            raise CompileError(
                f"a {self.request.kind} model needs its {TOKENIZER_FILE} (Hugging Face tokenizers "
                "format) in the upload, beside the graph",
                code="missing_tokenizer",
            )
        model_path = dest / self.request.model_file
        if report.external_files:
            _fold_external_data(model_path, report.external_files, step)
        return _Model(path=model_path, report=report, tokenizer_dir=dest)

    def _export(self, step: Step, work: Path) -> _Model:
        src = Path(self.request.source_path)
        # Again on the node: the directory may have changed since the control plane looked.
        check_checkpoint(src)
        python = self.prepare_python or default_prepare_python()
        if not Path(python).is_file():
            raise CompileError(
                "this compile node has no export environment (torch, transformers): run "
                "bin/prepare-models once, or set MANTLE_PREPARE_PYTHON",
                code="export_unavailable",
            )
        out = work / "export"
        reference = work / "reference.npz"
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
            self.request.kind,
            "--name",
            self.request.model_name,
            "--reference",
            str(reference),
        ]
        step.say("exporting %s with torch.onnx (dynamo) in %s", src, python)
        proc = subprocess.run(  # noqa: S603 - our own interpreter and module
            argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False
        )
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        step.log.extend(lines)
        if proc.returncode != 0:
            refused = [ln.split("refused: ", 1)[1] for ln in lines if "refused: " in ln]
            reason = refused[-1] if refused else (lines[-1] if lines else "no output")
            raise CompileError(f"exporting the checkpoint failed: {reason}", code="export_failed")
        partial = artifacts.read_manifest(out)
        (out / artifacts.MANIFEST_NAME).unlink()
        step.metrics.update(
            {
                "export_seconds": partial.get("build", {}).get("export_seconds"),
                "peak_rss_mb": partial.get("build", {}).get("peak_rss_mb"),
                "source_parity": partial.get("validation", {}),
                "toolchain": partial.get("build", {}).get("toolchain", {}),
            }
        )
        report = validate_onnx(out, MODEL_FILE, self.limits)
        step.metrics["graph"] = report.as_metrics()
        return _Model(
            path=out / MODEL_FILE,
            report=report,
            partial_manifest=partial,
            reference=reference,
            tokenizer_dir=out,
        )

    def _check(self, step: Step, model: _Model) -> None:
        import onnx

        try:
            onnx.checker.check_model(str(model.path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise CompileError(
                f"the ONNX checker refused the graph: {_first_line(exc)}", code="invalid_model"
            ) from exc
        step.say("onnx.checker: valid (full check, strict shape inference)")
        inferred = model.path.with_name(f"{model.path.stem}.inferred.onnx")
        try:
            onnx.shape_inference.infer_shapes_path(
                str(model.path), str(inferred), check_type=True, strict_mode=True
            )
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
            raise CompileError(
                f"shape inference failed: {_first_line(exc)}", code="invalid_model"
            ) from exc
        graph = onnx.load_model(str(inferred), load_external_data=False).graph
        unknown = [o.name for o in graph.output if not o.type.tensor_type.HasField("shape")]
        step.metrics.update(
            {"value_infos": len(graph.value_info), "outputs_without_shape": unknown}
        )
        step.say("shape inference: %d intermediate values typed", len(graph.value_info))
        # The optimizer reads the inferred graph: same external data, same directory.
        model.path = inferred

    def _optimize(self, step: Step, model: _Model, work: Path) -> Path:
        import onnxruntime as ort

        level = self.request.optimization
        if level == "none":
            step.status = "skipped"
            step.say("graph optimization switched off for this job")
            return model.path
        out_dir = work / "optimized"
        out_dir.mkdir()
        out = out_dir / MODEL_FILE
        opts = self._session_options()
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
        if _tree_bytes(model.path.parent) > artifacts_limit():
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
                f"ONNX Runtime can not load the graph: {_first_line(exc)}", code="invalid_model"
            ) from exc
        before, after = _node_count(model.path), _node_count(out)
        step.metrics.update(
            {
                "level": level,
                "nodes_before": before,
                "nodes_after": after,
                "bytes_before": _tree_bytes(model.path.parent, only=model.path),
                "bytes_after": _tree_bytes(out_dir),
                "seconds": round(time.monotonic() - started, 3),
            }
        )
        step.say("ONNX Runtime %s optimization: %d -> %d nodes", level, before, after)
        return out

    def _quantize(self, step: Step, model_path: Path, work: Path) -> Path:
        if not self.request.quantize:
            step.status = "skipped"
            step.say("no quantization requested")
            return model_path
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out_dir = work / "quantized"
        out_dir.mkdir()
        out = out_dir / MODEL_FILE
        started = time.monotonic()
        try:
            quantize_dynamic(
                str(model_path),
                str(out),
                weight_type=QuantType.QInt8,
                use_external_data_format=_tree_bytes(model_path.parent) > artifacts_limit(),
            )
        except Exception as exc:  # the quantizer raises plain exceptions on graphs it can't take
            raise CompileError(
                f"int8 quantization failed: {_first_line(exc)}", code="quantization_failed"
            ) from exc
        before = _tree_bytes(model_path.parent, only=model_path)
        after = _tree_bytes(out_dir)
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

    def _validate(self, step: Step, model: _Model, candidate: Path, work: Path) -> dict[str, Any]:
        import numpy as np

        feeds, expected, reference_kind = self._reference(model)
        session = self._session(candidate)
        started = time.monotonic()
        try:
            names = [o.name for o in session.get_outputs()]
            got = dict(zip(names, session.run(None, feeds), strict=True))
        except Exception as exc:  # ORT's runtime errors name the failing node
            raise CompileError(
                f"smoke run failed: {_first_line(exc)}", code="smoke_failed"
            ) from exc
        smoke_s = round(time.monotonic() - started, 3)
        for name, value in got.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise CompileError(
                    f"smoke run: output {name!r} has NaN or infinite values", code="smoke_failed"
                )
        smoke = {
            "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "outputs": {k: list(v.shape) for k, v in got.items()},
            "seconds": smoke_s,
            "passed": True,
        }
        step.say("smoke run: %s in %.3f s", smoke["outputs"], smoke_s)
        parity = self._parity(expected, got)
        gate = gate_for(self.request, self.runtime)
        value = float(parity[gate.metric])
        parity.update(
            {
                "reference": reference_kind,
                "variant": "int8" if self.request.quantize else "fp32",
                "gate": {
                    "metric": gate.metric,
                    "bound": gate.bound,
                    "higher_is_better": gate.higher_is_better,
                },
                "passed": gate.passes(value),
            }
        )
        step.metrics.update({"smoke": smoke, "parity": parity})
        step.say("parity with %s: %s", reference_kind, gate.describe(value))
        if not gate.passes(value):
            variant = "the int8 variant" if self.request.quantize else "the compiled graph"
            raise CompileError(
                f"quality gate failed: {variant} does not match the source model: "
                f"{gate.describe(value)}"
                + (
                    "; it is not shipped (compile without quantization, or accept a looser "
                    "tolerance)"
                    if self.request.quantize
                    else ""
                ),
                code="quality_gate_failed",
            )
        return {"smoke": smoke, "parity": parity}

    def _tokenizer(self, step: Step, model: _Model) -> dict[str, Any]:
        if self.runtime == Runtime.TENSOR:
            step.status = "skipped"
            step.say("tensor models take tensors, not text: no tokenizer")
            return {}
        from tokenizers import Tokenizer

        assert model.tokenizer_dir is not None
        path = model.tokenizer_dir / TOKENIZER_FILE
        check_tokenizer(step.say, path, self.tokenizer_limits, self.tokenizer_probe_s)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises bare Exceptions
            raise CompileError(
                f"{TOKENIZER_FILE} is not a valid Hugging Face tokenizers file: {_first_line(exc)}",
                code="invalid_tokenizer",
            ) from exc
        # Consumers truncate and pad themselves (docs/artifacts.md): counting
        # must count real tokens, so a baked-in truncation/padding is removed.
        data = json.loads(path.read_text(encoding="utf-8"))
        stripped = [k for k in ("truncation", "padding") if data.get(k) is not None]
        data["truncation"] = None
        data["padding"] = None
        info: dict[str, Any] = {"tokenizer_json": json.dumps(data, ensure_ascii=False)}
        partial = model.partial_manifest
        if partial:
            info.update(
                {
                    k: partial.get(k)
                    for k in ("chat_template", "bos_token_id", "eos_token_ids", "pad_token_id")
                }
            )
        else:
            info.update(self._special_tokens(model.tokenizer_dir, tok))
        if self.request.kind == "chat" and not info.get("chat_template"):
            raise CompileError(
                "a chat model needs a chat template (tokenizer_config.json `chat_template`): "
                "add one, or compile it as kind `completion`",
                code="missing_chat_template",
            )
        if info.get("chat_template"):
            step.metrics["chat_template_render"] = check_chat_template(
                step.say, str(info["chat_template"]), self.template_budget
            )
        step.metrics.update(
            {
                "vocab_size": tok.get_vocab_size(),
                "chat_template": bool(info.get("chat_template")),
                "bos_token_id": info.get("bos_token_id"),
                "eos_token_ids": info.get("eos_token_ids"),
                "pad_token_id": info.get("pad_token_id"),
                "removed": stripped,
            }
        )
        step.say(
            "tokenizer: %d tokens, chat template %s",
            tok.get_vocab_size(),
            "captured" if info.get("chat_template") else "none",
        )
        return info

    def _package(
        self,
        step: Step,
        model: _Model,
        candidate: Path,
        validation: Mapping[str, Any],
        tokenizer: Mapping[str, Any],
        work: Path,
    ) -> dict[str, Any]:
        import onnx

        final = work / "artifact"
        final.mkdir()
        proto = onnx.load_model(str(candidate), load_external_data=True)
        # ONNX Runtime's saved graphs import every domain it knows; keep the used ones.
        used = {n.domain or "" for n in proto.graph.node} | {"", "ai.onnx"}
        kept = [o for o in proto.opset_import if (o.domain or "") in used]
        del proto.opset_import[:]
        proto.opset_import.extend(kept)
        external = _tree_bytes(candidate.parent) > artifacts_limit()
        onnx.save_model(
            proto,
            str(final / MODEL_FILE),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
        )
        del proto
        if tokenizer:
            (final / TOKENIZER_FILE).write_text(tokenizer["tokenizer_json"], encoding="utf-8")
        manifest = self._manifest(model, final, validation, tokenizer)
        path = artifacts.commit_artifact(self.store, final, manifest)
        sealed = artifacts.verify_artifact(path, fast=False)
        location = str(path.resolve())
        if self.remote:
            from workers.compile.remote import publish

            try:
                location = publish(path, self.remote)
            except Exception as exc:  # fsspec backends raise their own errors
                raise CompileError(
                    f"publishing the artifact to {self.remote} failed: {_first_line(exc)}",
                    code="store_unavailable",
                ) from exc
        step.metrics.update(
            {"sha256": sealed["sha256"], "size_bytes": sealed["size_bytes"], "location": location}
        )
        step.say("artifact %s (%d bytes) in %s", sealed["sha256"], sealed["size_bytes"], location)
        return {**sealed, "location": location}

    # --- helpers -----------------------------------------------------------------------------

    def _check_interface(self, report: GraphReport) -> None:
        inputs, outputs = set(report.inputs), set(report.outputs)
        if self.runtime == Runtime.ENCODER:
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
        elif self.runtime == Runtime.CAUSAL_LM:
            layers = sum(
                1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")
            )
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

    def _session_options(self) -> ort.SessionOptions:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.ort_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return opts

    def _session(self, path: Path, *, optimize: bool = True) -> ort.InferenceSession:
        import onnxruntime as ort

        opts = self._session_options()
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimize
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's own exception types
            raise CompileError(
                f"ONNX Runtime can not load the graph: {_first_line(exc)}", code="invalid_model"
            ) from exc

    def _reference(self, model: _Model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
        """Sample inputs and the source model's outputs for them."""
        import numpy as np

        if model.reference is not None:
            with np.load(model.reference) as data:
                feeds = {k[3:]: data[k] for k in data.files if k.startswith("in.")}
                expected = {k[4:]: data[k] for k in data.files if k.startswith("out.")}
            return feeds, expected, "the source checkpoint run by torch"
        assert model.tokenizer_dir is not None and model.report is not None
        samples = model.tokenizer_dir / SAMPLE_INPUTS_FILE
        if samples.is_file():
            feeds = _load_samples(samples, model.report)
        else:
            feeds = _synthetic_inputs(model.report, self._vocab(model))
        # The uploaded graph as it came, without any of ONNX Runtime's rewrites.
        original = model.tokenizer_dir / self.request.model_file
        session = self._session(original, optimize=False)
        try:
            names = [o.name for o in session.get_outputs()]
            expected = dict(zip(names, session.run(None, feeds), strict=True))
        except Exception as exc:  # ORT's runtime errors name the failing node
            raise CompileError(
                f"the uploaded graph does not run on its sample inputs: {_first_line(exc)}",
                code="smoke_failed",
            ) from exc
        return feeds, expected, "the uploaded graph, unoptimized"

    def _vocab(self, model: _Model) -> int:
        if self.runtime == Runtime.TENSOR or model.tokenizer_dir is None:
            return 0
        from tokenizers import Tokenizer

        path = model.tokenizer_dir / TOKENIZER_FILE
        if path.is_file() and path.stat().st_size > self.tokenizer_limits.max_bytes:
            return 2  # the tokenizer step refuses it, in words
        try:
            return int(Tokenizer.from_file(str(path)).get_vocab_size())
        except Exception:  # the tokenizer step reports a broken tokenizer in words
            return 2

    def _parity(
        self, expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
    ) -> dict[str, Any]:
        import numpy as np

        missing = sorted(set(expected) - set(got))
        if missing:
            raise CompileError(f"the compiled graph lost outputs {missing}", code="smoke_failed")
        out: dict[str, Any] = {"outputs": {}}
        worst = 0.0
        for name, ref in expected.items():
            value = got[name]
            if value.shape != ref.shape:
                raise CompileError(
                    f"output {name!r} has shape {list(value.shape)}, the source model "
                    f"gives {list(ref.shape)}",
                    code="smoke_failed",
                )
            diff = (
                float(np.abs(value.astype(np.float64) - ref.astype(np.float64)).max())
                if ref.size
                else 0.0
            )
            out["outputs"][name] = {"max_abs_diff": diff}
            worst = max(worst, diff)
        out["max_abs_diff"] = worst
        if self.runtime == Runtime.ENCODER:
            a = got["sentence_embedding"].astype(np.float64)
            b = expected["sentence_embedding"].astype(np.float64)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            out["min_cosine"] = float(cos.min())
            out["mean_cosine"] = float(cos.mean())
            out["samples"] = int(a.shape[0])
        elif self.runtime == Runtime.CAUSAL_LM:
            a, b = got["logits"], expected["logits"]
            out["max_abs_logit_diff"] = float(np.abs(a - b).max())
            out["top1_agreement"] = float((a.argmax(-1) == b.argmax(-1)).mean())
            out["samples"] = int(a.shape[0])
        return out

    def _special_tokens(self, directory: Path, tok: Any) -> dict[str, Any]:
        """bos/eos/pad ids and the chat template of an uploaded tokenizer's config."""
        config: dict[str, Any] = {}
        path = directory / "tokenizer_config.json"
        if path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise CompileError(
                    f"tokenizer_config.json is not valid JSON: {exc}", code="invalid_tokenizer"
                ) from exc
            config = loaded if isinstance(loaded, dict) else {}

        def token_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        eos = token_id("eos_token")
        template = config.get("chat_template")
        return {
            "chat_template": template if isinstance(template, str) else None,
            "bos_token_id": token_id("bos_token"),
            "eos_token_ids": [eos] if eos is not None else [],
            "pad_token_id": token_id("pad_token"),
        }

    def _manifest(
        self,
        model: _Model,
        final: Path,
        validation: Mapping[str, Any],
        tokenizer: Mapping[str, Any],
    ) -> dict[str, Any]:
        from workers.compile.common import versions

        assert model.report is not None
        partial = model.partial_manifest
        report = validate_onnx(final, MODEL_FILE, self.limits)
        manifest: dict[str, Any] = {
            "format": artifacts.MANIFEST_FORMAT,
            "name": self.request.model_name,
            "kind": self.request.kind,
            "family": partial.get("family", ""),
            "runtime": self.runtime,
            "licence": partial.get("licence", ""),
            "model_file": MODEL_FILE,
            "tokenizer_file": TOKENIZER_FILE if tokenizer else None,
            "context_length": int(partial.get("context_length") or self._context_length(report)),
            "chat_template": tokenizer.get("chat_template"),
            "bos_token_id": tokenizer.get("bos_token_id"),
            "eos_token_ids": list(tokenizer.get("eos_token_ids") or []),
            "pad_token_id": tokenizer.get("pad_token_id"),
            "io": partial.get("io") or {"inputs": report.inputs, "outputs": report.outputs},
        }
        if self.runtime == Runtime.CAUSAL_LM:
            manifest["causal_lm"] = partial.get("causal_lm") or _causal_lm_section(report)
        if self.runtime == Runtime.ENCODER:
            manifest["embedding"] = partial.get("embedding") or _embedding_section(
                report, manifest["context_length"]
            )
        manifest["validation"] = {
            **validation,
            **({"export": partial["validation"]} if partial.get("validation") else {}),
        }
        manifest["source"] = {
            "kind": self.request.source,
            **(
                partial.get("source", {})
                if partial
                else {"model_file": self.request.model_file, "graph": model.report.as_metrics()}
            ),
        }
        manifest["build"] = {
            "job_id": self.request.job_id,
            "optimization": self.request.optimization,
            "quantization": self.request.quantize or "none",
            "steps": {s.name: s.duration_s for s in self.steps if s.duration_s is not None},
            "toolchain": {
                **partial.get("build", {}).get("toolchain", {}),
                **versions("onnx", "onnxruntime", "numpy", "tokenizers"),
            },
        }
        return manifest

    def _context_length(self, report: GraphReport) -> int:
        if self.runtime == Runtime.TENSOR:
            return 0
        # An uploaded graph does not say how long its inputs may be; the
        # sequence length of a fixed-size input does, else a safe default.
        shape = report.inputs.get("input_ids", {}).get("shape", [])
        if len(shape) == 2 and isinstance(shape[1], int):
            return shape[1]
        return 512 if self.runtime == Runtime.ENCODER else 2048


def _fold_external_data(model_path: Path, files: Sequence[str], step: Step) -> None:
    """Rewrite the graph with its external data in one place, beside it.

    Under the protobuf limit the weights go into the graph itself; above it,
    into one `model.onnx.data`. Either way every later step (ONNX Runtime's
    saved graphs, the quantizer) finds them relative to the file it reads.
    """
    import onnx

    proto = onnx.load_model(str(model_path), load_external_data=True)
    external = _tree_bytes(model_path.parent) > artifacts_limit()
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


def artifacts_limit() -> int:
    """Graphs bigger than this keep their weights in external data (protobuf's 2 GiB)."""
    return 1_800_000_000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load_model(str(path), load_external_data=False).graph.node)


def _tree_bytes(directory: Path, only: Path | None = None) -> int:
    if only is not None:
        return only.stat().st_size
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


_NUMPY_DTYPES = {
    "float32": "float32",
    "float16": "float16",
    "float64": "float64",
    "int64": "int64",
    "int32": "int32",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}


def _concrete_shape(shape: Sequence[int | str], name: str) -> list[int]:
    dims: list[int] = []
    for i, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif "past" in str(dim) and "+" not in str(dim) and name.startswith("past_key_values."):
            dims.append(0)  # the first decode step of a causal LM
        else:
            dims.append(2 if i == 0 else 5)
    return dims


def _synthetic_inputs(report: GraphReport, vocab: int) -> dict[str, np.ndarray]:
    """Deterministic sample inputs for every graph input, from its declared type and shape."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for name, spec in report.inputs.items():
        dtype = _NUMPY_DTYPES.get(str(spec["dtype"]))
        if dtype is None:
            raise CompileError(
                f"input {name!r} has type {spec['dtype']}: add {SAMPLE_INPUTS_FILE} to the "
                "upload with sample values for it",
                code="sample_inputs_needed",
            )
        shape = _concrete_shape(spec["shape"], name)
        if name == "input_ids" and vocab:
            feeds[name] = rng.integers(0, vocab, size=shape).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones(shape, dtype=dtype)
        elif name in ("token_type_ids",):
            feeds[name] = np.zeros(shape, dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
        elif dtype == "bool":
            feeds[name] = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.startswith(("int", "uint")):
            feeds[name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    if "attention_mask" in feeds and "input_ids" in feeds:
        # The causal LM mask spans past + seq; with no past that is the sequence.
        feeds["attention_mask"] = np.ones(feeds["input_ids"].shape, dtype=np.int64)
    return feeds


def _load_samples(path: Path, report: GraphReport) -> dict[str, np.ndarray]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise CompileError(
            f"{SAMPLE_INPUTS_FILE} is not a numpy .npz of arrays: {exc}", code="invalid_samples"
        ) from exc
    if set(feeds) != set(report.inputs):
        raise CompileError(
            f"{SAMPLE_INPUTS_FILE} has arrays {sorted(feeds)}; the graph's inputs are "
            f"{sorted(report.inputs)}",
            code="invalid_samples",
        )
    return feeds


def _causal_lm_section(report: GraphReport) -> dict[str, Any]:
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


def _embedding_section(report: GraphReport, context_length: int) -> dict[str, Any]:
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


def main_store() -> Path:
    """The node's artifact store (MANTLE_ARTIFACT_DIR), as the built-ins use it."""
    return Path(
        os.environ.get("MANTLE_ARTIFACT_DIR", Path.home() / ".cache" / "mantle" / "artifacts")
    ).expanduser()
