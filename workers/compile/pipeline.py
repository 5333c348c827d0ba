"""The compile pipeline: import or export, check, optimize, quantize, validate, package.

Each step is a module of workers/compile/steps/; this one runs them in order,
records every step's progress and turns whatever happened into the outcome.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from workers.chat_template import TemplateBudget, template_budget_from_env
from workers.compile import artifacts
from workers.compile.steps import optimize, package, parity, source, tokenizer
from workers.compile.steps.base import Job, Step
from workers.compile.validate import CompileError, Limits
from workers.contract import CompileOutcome, CompileRequest, CompileSource, CompileStatus, Runtime
from workers.tokenizer_limits import TokenizerLimits

# Runs on a compile node in the platform venv: onnx, onnxruntime (its offline
# optimizer and quantizer), numpy, tokenizers. The Hugging Face export, which
# needs torch, runs as a child process in the prepare venv (export_hf.py).

logger = logging.getLogger(__name__)

RUNTIME_BY_KIND = {
    "chat": Runtime.CAUSAL_LM.value,
    "completion": Runtime.CAUSAL_LM.value,
    "embedding": Runtime.ENCODER.value,
    "tensor": Runtime.TENSOR.value,
}
QUANTIZATIONS = ("", "int8", "int4")
OPTIMIZATIONS = ("none", "basic", "extended")

DEFAULT_LIMITS = Limits()

Report = Callable[[Sequence[Mapping[str, Any]]], None]


def check_request(request: CompileRequest) -> None:
    """Options the pipeline can not run with, refused before any work starts."""
    if request.kind not in RUNTIME_BY_KIND:
        raise CompileError(f"unknown model kind {request.kind!r}", code="invalid_request")
    if request.quantize not in QUANTIZATIONS:
        raise CompileError(
            f"unknown quantization {request.quantize!r} (choose int8, int4 or none)",
            code="invalid_request",
        )
    if request.quantize == "int4" and RUNTIME_BY_KIND.get(request.kind) != Runtime.CAUSAL_LM:
        raise CompileError(
            "int4 (4-bit weights) is for chat and completion models; use int8 or none",
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
        self.job = Job(
            request=request,
            runtime=RUNTIME_BY_KIND.get(request.kind, ""),
            store=store,
            remote=remote,
            prepare_python=prepare_python,
            limits=limits,
            ort_threads=ort_threads,
            tokenizer_limits=tokenizer_limits or TokenizerLimits.from_env(),
            template_budget=template_budget or template_budget_from_env(),
            tokenizer_probe_s=tokenizer_probe_s,
        )
        self._report = report or (lambda steps: None)
        first = "export" if request.source == CompileSource.HF_CHECKPOINT else "import"
        names = (first, "check", "optimize", "quantize", "validate", "tokenizer", "package")
        self.steps = [Step(n) for n in names]

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

    def _run(self) -> dict[str, Any]:
        job = self.job
        job.store.mkdir(parents=True, exist_ok=True)
        with artifacts.staging_dir(job.store, f"compile-{self.request.job_id}") as work:
            if self.request.source == CompileSource.HF_CHECKPOINT:
                with self._step("export") as step:
                    model = source.export_hf(job, step, work)
            else:
                with self._step("import") as step:
                    model = source.import_onnx(job, step, work)
            with self._step("check") as step:
                optimize.check(step, model)
            with self._step("optimize") as step:
                optimized = optimize.optimize(job, step, model, work)
            with self._step("quantize") as step:
                candidate = optimize.quantize(job, step, optimized, work)
            with self._step("validate") as step:
                validation = parity.validate(job, step, model, candidate, optimized)
            with self._step("tokenizer") as step:
                tokens = tokenizer.prepare(job, step, model)
            with self._step("package") as step:
                return package.package(
                    job, step, model, candidate, validation, tokens, work, self.steps, optimized
                )

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


def main_store() -> Path:
    """The node's artifact store (MANTLE_ARTIFACT_DIR), as the built-ins use it."""
    return Path(
        os.environ.get("MANTLE_ARTIFACT_DIR", Path.home() / ".cache" / "mantle" / "artifacts")
    ).expanduser()
