"""The validate step: a smoke run of the candidate graph and its parity with the source model."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.compile import lm_gate
from workers.compile.steps.base import (
    SAMPLE_INPUTS_FILE,
    TOKENIZER_FILE,
    Job,
    Model,
    Step,
    first_line,
    open_session,
)
from workers.compile.validate import CompileError, GraphReport
from workers.contract import CompileRequest, Runtime

if TYPE_CHECKING:
    import numpy as np


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
# Quantized causal LMs (int8, int4) have the calibrated LM gate instead (lm_quality).
DEFAULT_GATES: dict[tuple[str, bool], Gate] = {
    (Runtime.ENCODER.value, False): Gate("min_cosine", 0.9999, higher_is_better=True),
    (Runtime.ENCODER.value, True): Gate("min_cosine", 0.99, higher_is_better=True),
    (Runtime.CAUSAL_LM.value, False): Gate("max_abs_logit_diff", 1e-3, higher_is_better=False),
    (Runtime.TENSOR.value, False): Gate("max_abs_diff", 1e-4, higher_is_better=False),
    (Runtime.TENSOR.value, True): Gate("max_abs_diff", 0.05, higher_is_better=False),
}


def gate_for(request: CompileRequest, runtime: str) -> Gate:
    gate = DEFAULT_GATES[(runtime, bool(request.quantize))]
    if request.tolerance is None:
        return gate
    return Gate(gate.metric, float(request.tolerance), gate.higher_is_better)


def validate(
    job: Job, step: Step, model: Model, candidate: Path, full_precision: Path
) -> dict[str, Any]:
    """Smoke-run the candidate on sample inputs, then hold it to the gate against the source.

    A quantized causal LM is held to the language-model gate instead (greedy agreement
    and perplexity against `full_precision`, the graph before quantization): a bound on
    raw logits says little about what a 4- or 8-bit model still answers.
    """
    feeds, expected, reference_kind = reference(job, model)
    got, smoke = _smoke(job, candidate, feeds)
    step.say("smoke run: %s in %.3f s", smoke["outputs"], smoke["seconds"])
    parity = compare(job.runtime, expected, got)
    if job.runtime == Runtime.CAUSAL_LM and job.request.quantize:
        parity.update({"reference": reference_kind, "variant": job.request.quantize})
        step.metrics.update({"smoke": smoke, "parity": parity})
        step.say(
            "logits against %s: max |diff| %.4g, top-1 agreement %.3f (not gated)",
            reference_kind,
            parity["max_abs_logit_diff"],
            parity["top1_agreement"],
        )
        quality = lm_quality(job, step, model, full_precision, candidate)
        return {"smoke": smoke, "parity": parity, "quality_gate": quality}
    gate = gate_for(job.request, job.runtime)
    value = float(parity[gate.metric])
    parity.update(
        {
            "reference": reference_kind,
            "variant": "int8" if job.request.quantize else "fp32",
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
        raise _gate_failed(job.request, gate, value)
    return {"smoke": smoke, "parity": parity}


def lm_thresholds(request: CompileRequest) -> lm_gate.Thresholds:
    """The calibrated LM gate; `tolerance` replaces its token-disagreement bound."""
    base = lm_gate.DEFAULT_THRESHOLDS
    if request.tolerance is None:
        return base
    return dataclasses.replace(base, min_token_agreement=1.0 - float(request.tolerance))


def lm_quality(
    job: Job, step: Step, model: Model, full_precision: Path, candidate: Path
) -> dict[str, Any]:
    """The quantized causal LM against its full-precision graph (workers/compile/lm_gate.py)."""
    from tokenizers import Tokenizer

    assert model.tokenizer_dir is not None
    try:
        tok = Tokenizer.from_file(str(model.tokenizer_dir / TOKENIZER_FILE))
    except Exception as exc:  # the tokenizer step reports a broken tokenizer in words
        raise CompileError(
            f"the quality gate needs the model's tokenizer: {first_line(exc)}",
            code="invalid_tokenizer",
        ) from exc
    prompts = [tok.encode(p, add_special_tokens=False).ids or [0] for p in lm_gate.PROMPTS]
    texts = [tok.encode(t, add_special_tokens=False).ids for t in lm_gate.gate_texts()]
    eos = [int(e) for e in model.partial_manifest.get("eos_token_ids") or []]
    pad = int(model.partial_manifest.get("pad_token_id") or 0)
    try:
        measured = lm_gate.measure(
            lm_gate.Decoder(open_session(job, full_precision), pad),
            lm_gate.Decoder(open_session(job, candidate), pad),
            prompts,
            texts,
            eos,
        )
    except CompileError:
        raise
    except Exception as exc:  # ORT's runtime errors name the failing node
        raise CompileError(f"smoke run failed: {first_line(exc)}", code="smoke_failed") from exc
    gate = lm_gate.verdict(measured, lm_thresholds(job.request))
    step.metrics["quality_gate"] = gate
    step.say(
        "quality gate against the full-precision graph: token agreement %.4f, exact match "
        "%.2f, perplexity %.3f -> %.3f (%+.1f %%) in %.0f s",
        measured["token_agreement"],
        measured["exact_match"],
        measured["reference_ppl"],
        measured["candidate_ppl"],
        100 * measured["ppl_increase"],
        measured["seconds"],
    )
    if not gate["passed"]:
        raise CompileError(
            f"quality gate failed: the {job.request.quantize} variant drifts from the "
            f"full-precision model: {'; '.join(gate['failed'])}; it is not shipped (compile "
            "without quantization, or accept a looser tolerance)",
            code="quality_gate_failed",
        )
    return gate


def _smoke(
    job: Job, candidate: Path, feeds: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The candidate's outputs on `feeds`, all finite, and what the run did."""
    import numpy as np

    session = open_session(job, candidate)
    started = time.monotonic()
    try:
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, feeds), strict=True))
    except Exception as exc:  # ORT's runtime errors name the failing node
        raise CompileError(f"smoke run failed: {first_line(exc)}", code="smoke_failed") from exc
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
    return got, smoke


def _gate_failed(request: CompileRequest, gate: Gate, value: float) -> CompileError:
    variant = "the int8 variant" if request.quantize else "the compiled graph"
    return CompileError(
        f"quality gate failed: {variant} does not match the source model: "
        f"{gate.describe(value)}"
        + (
            "; it is not shipped (compile without quantization, or accept a looser tolerance)"
            if request.quantize
            else ""
        ),
        code="quality_gate_failed",
    )


def reference(job: Job, model: Model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
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
        feeds = load_samples(samples, model.report)
    else:
        feeds = synthetic_inputs(model.report, _vocab(job, model))
    # The uploaded graph as it came, without any of ONNX Runtime's rewrites.
    original = model.tokenizer_dir / job.request.model_file
    session = open_session(job, original, optimize=False)
    try:
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(None, feeds), strict=True))
    except Exception as exc:  # ORT's runtime errors name the failing node
        raise CompileError(
            f"the uploaded graph does not run on its sample inputs: {first_line(exc)}",
            code="smoke_failed",
        ) from exc
    return feeds, expected, "the uploaded graph, unoptimized"


def _vocab(job: Job, model: Model) -> int:
    if job.runtime == Runtime.TENSOR or model.tokenizer_dir is None:
        return 0
    from tokenizers import Tokenizer

    path = model.tokenizer_dir / TOKENIZER_FILE
    if path.is_file() and path.stat().st_size > job.tokenizer_limits.max_bytes:
        return 2  # the tokenizer step refuses it, in words
    try:
        return int(Tokenizer.from_file(str(path)).get_vocab_size())
    except Exception:  # the tokenizer step reports a broken tokenizer in words
        return 2


def compare(
    runtime: str, expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """Per-output max |diff|, and the runtime's own measures (cosine, logits)."""
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
    if runtime == Runtime.ENCODER:
        a = got["sentence_embedding"].astype(np.float64)
        b = expected["sentence_embedding"].astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out["min_cosine"] = float(cos.min())
        out["mean_cosine"] = float(cos.mean())
        out["samples"] = int(a.shape[0])
    elif runtime == Runtime.CAUSAL_LM:
        a, b = got["logits"], expected["logits"]
        out["max_abs_logit_diff"] = float(np.abs(a - b).max())
        out["top1_agreement"] = float((a.argmax(-1) == b.argmax(-1)).mean())
        out["samples"] = int(a.shape[0])
    return out


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


def synthetic_inputs(report: GraphReport, vocab: int) -> dict[str, np.ndarray]:
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


def load_samples(path: Path, report: GraphReport) -> dict[str, np.ndarray]:
    """An upload's own sample inputs, one array per graph input."""
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
