"""What every compile step shares: its progress record, the job's options, the graph, file names."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.chat_template import TemplateBudget
from workers.compile.validate import CompileError, GraphReport, Limits
from workers.contract import CompileRequest
from workers.tokenizer_limits import TokenizerLimits

if TYPE_CHECKING:
    import onnxruntime as ort

# Step logs keep the logger they have always had, so log routing and filters
# written for the pipeline see the same records.
logger = logging.getLogger("workers.compile.pipeline")

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
FP32_VARIANT_FILE = "model.fp32.onnx"
"""A quantized causal LM's full-precision graph, kept beside it (manifest `variants.fp32`)."""
TOKENIZER_FILE = "tokenizer.json"
SAMPLE_INPUTS_FILE = "sample_inputs.npz"
"""An upload may carry its own sample inputs (an .npz keyed by input name) for parity."""
LOG_LIMIT = 64 * 1024
"""Bytes of log kept per step: the start and end of a long export log matter most."""


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

    def skip(self, reason: str) -> None:
        """Mark the step skipped (the pipeline keeps that status) and say why."""
        self.status = "skipped"
        self.say(reason)

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


@dataclass(frozen=True, slots=True)
class Job:
    """One compile job's request and the node's options for it, as every step reads them."""

    request: CompileRequest
    runtime: str
    store: Path
    remote: str | None  # an fsspec URL the sealed artifact is published to
    prepare_python: Path | None
    limits: Limits
    ort_threads: int
    # The gateway's limits: what passes here is what the gateway will serve.
    tokenizer_limits: TokenizerLimits
    template_budget: TemplateBudget
    tokenizer_probe_s: float


@dataclass(slots=True)
class Model:
    """The graph being compiled, where it is, and what is known about it."""

    path: Path
    report: GraphReport | None = None
    partial_manifest: dict[str, Any] = field(default_factory=dict)
    reference: Path | None = None
    tokenizer_dir: Path | None = None


def artifacts_limit() -> int:
    """Graphs bigger than this keep their weights in external data (protobuf's 2 GiB)."""
    return 1_800_000_000


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load_model(str(path), load_external_data=False).graph.node)


def tree_bytes(directory: Path, only: Path | None = None) -> int:
    if only is not None:
        return only.stat().st_size
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def session_options(job: Job) -> ort.SessionOptions:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = job.ort_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def open_session(job: Job, path: Path, *, optimize: bool = True) -> ort.InferenceSession:
    import onnxruntime as ort

    opts = session_options(job)
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types
        raise CompileError(
            f"ONNX Runtime can not load the graph: {first_line(exc)}", code="invalid_model"
        ) from exc
