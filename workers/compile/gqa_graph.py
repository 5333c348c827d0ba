"""A Llama-family causal LM as an ONNX graph of ONNX Runtime's fused operators.

Built node by node from a transformers model's weights (not traced): per layer one
`SkipSimplifiedLayerNormalization` per RMSNorm (the residual Add folded in), the q/k/v,
o and MLP projections as `MatMul` with constant weights (which workers/compile/int4.py
turns into `MatMulNBits`), and one `GroupQueryAttention` with rotary inside it that
writes the KV cache in place (workers/engine/inplace.py has the interface). The LM head
runs on one position per row, chosen by `logits_index`, so prompts of different lengths
share a call right-padded.

Against the traced graph (~1,900 nodes, rotary as Split/Neg/Concat/Mul and attention as
Transpose/MatMul/Softmax around a `Concat` that copies the whole cache every step) this is
~13 nodes per layer, and a decode step copies no cache.

Runs in the prepare venv (torch for the weights, onnx to write the graph).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.compile.common import cache_names
from workers.engine.inplace import IN_PLACE_INPUTS

if TYPE_CHECKING:
    import numpy as np
    import onnx

log = logging.getLogger("mantle.compile")

OPSET = 21
IR_VERSION = 10
"""What the platform's ONNX Runtime reads (it refuses IR versions newer than it knows)."""


def input_names(num_layers: int) -> list[str]:
    """The in-place interface's inputs (workers/engine/inplace.py), in graph order."""
    return [*IN_PLACE_INPUTS, *cache_names(num_layers, "past_key_values")]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *cache_names(num_layers, "present")]


def supports(cfg: Any) -> str:
    """Why this builder cannot express a model of this config ('' when it can)."""
    if getattr(cfg, "model_type", "") != "llama":
        return f"model type {getattr(cfg, 'model_type', '?')!r} is not llama"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "projection biases are not supported"
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        return f"rope scaling {scaling!r} is not supported"
    return ""


def _rotary_caches(model: Any, max_positions: int, head_dim: int) -> tuple[Any, Any]:
    """cos and sin [max_positions, head_dim / 2] from the model's own inverse frequencies."""
    import numpy as np

    inv_freq = model.model.rotary_emb.inv_freq.detach().double().numpy()
    if inv_freq.shape != (head_dim // 2,):
        raise RuntimeError(f"inv_freq shape {inv_freq.shape}, expected ({head_dim // 2},)")
    scaling = float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    cos = (np.cos(angles) * scaling).astype(np.float32)
    sin = (np.sin(angles) * scaling).astype(np.float32)
    return cos, sin


def build(
    model: Any, path: Path, *, max_positions: int, mlp_smoothing: Sequence[Any] | None = None
) -> dict[str, int]:
    """Write the fp32 graph of `model` (LlamaForCausalLM) to `path`; its op counts.

    `mlp_smoothing` (one vector per layer, workers/compile/w8a8.py): each MLP's up
    projection divided and its down projection multiplied by the layer's scale per
    intermediate channel, which moves activation outliers into the weights and leaves
    the fp32 function as it was (`act @ down` = `(act / s) @ (s * down)`, `act` linear in
    `up`)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.config
    problem = supports(cfg)
    if problem:
        raise RuntimeError(f"the GroupQueryAttention graph cannot express this model: {problem}")
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    vocab = int(cfg.vocab_size)
    eps = float(cfg.rms_norm_eps)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    for i, scale in enumerate(mlp_smoothing or ()):
        up, down = f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"
        # New arrays: the state's arrays share memory with the torch model's tensors.
        state[up] = state[up] / scale[:, None]
        state[down] = state[down] * scale[None, :]

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def linear(x: str, weights: list[str], out: str) -> str:
        # torch's Linear is x @ W^T: the constant is W^T [in, out], a MatMul the 4-bit
        # quantizer takes. Projections of one input are one MatMul (their W^T side by
        # side): blocks run along the input, so each output column quantizes the same.
        joined = np.concatenate([state[w].T for w in weights], axis=1)
        w = const(f"{weights[0]}.T" if len(weights) == 1 else f"{out}.weight.T", joined)
        nodes.append(helper.make_node("MatMul", [x, w], [out], name=f"{out}.matmul"))
        return out

    def skip_norm(x: str, skip: str, weight: str, out: str, residual: str) -> None:
        nodes.append(
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [x, skip, const(weight, state[weight])],
                [out, "", "", residual],
                name=f"{out}.norm",
                domain="com.microsoft",
                epsilon=eps,
            )
        )

    cos, sin = _rotary_caches(model, max_positions, head_dim)
    const("rotary.cos", cos)
    const("rotary.sin", sin)
    embed = "model.embed_tokens.weight"
    nodes.append(
        helper.make_node("Gather", [const(embed, state[embed]), "input_ids"], ["h.0"], "embed")
    )
    nodes.append(
        helper.make_node(
            "SimplifiedLayerNormalization",
            [
                "h.0",
                const(
                    "model.layers.0.input_layernorm.weight",
                    state["model.layers.0.input_layernorm.weight"],
                ),
            ],
            ["l0.normed"],
            name="l0.input_norm",
            axis=-1,
            epsilon=eps,
            stash_type=1,
        )
    )
    residual = "h.0"
    for i in range(layers):
        p = f"model.layers.{i}"
        normed = f"l{i}.normed"
        # q, k and v packed in one tensor, which GroupQueryAttention splits itself.
        qkv = linear(
            normed, [f"{p}.self_attn.{x}_proj.weight" for x in ("q", "k", "v")], f"l{i}.qkv"
        )
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    qkv,
                    "",
                    "",
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    "seqlens_k",
                    "total_sequence_length",
                    "rotary.cos",
                    "rotary.sin",
                ],
                [f"l{i}.attn", f"present.{i}.key", f"present.{i}.value"],
                name=f"l{i}.attention",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                do_rotary=1,
                rotary_interleaved=0,
            )
        )
        o = linear(f"l{i}.attn", [f"{p}.self_attn.o_proj.weight"], f"l{i}.o")
        after_attn = f"l{i}.after_attn"
        skip_norm(o, residual, f"{p}.post_attention_layernorm.weight", f"l{i}.mlp_in", after_attn)
        both = linear(
            f"l{i}.mlp_in",
            [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"],
            f"l{i}.gate_up",
        )
        gate, up = f"l{i}.gate", f"l{i}.up"
        nodes.append(
            helper.make_node(
                "Split", [both], [gate, up], name=f"l{i}.split", axis=-1, num_outputs=2
            )
        )
        nodes.append(helper.make_node("Sigmoid", [gate], [f"l{i}.sig"], name=f"l{i}.sigmoid"))
        nodes.append(helper.make_node("Mul", [gate, f"l{i}.sig"], [f"l{i}.silu"], f"l{i}.silu"))
        nodes.append(helper.make_node("Mul", [f"l{i}.silu", up], [f"l{i}.act"], f"l{i}.act"))
        down = linear(f"l{i}.act", [f"{p}.mlp.down_proj.weight"], f"l{i}.mlp_out")
        if i + 1 < layers:
            nxt = f"model.layers.{i + 1}.input_layernorm.weight"
            residual = f"h.{i + 1}"
            skip_norm(down, after_attn, nxt, f"l{i + 1}.normed", residual)
        else:
            skip_norm(down, after_attn, "model.norm.weight", "final.normed", "final.residual")
    # One position per row, then the head: [batch * seq, hidden] gathered at logits_index.
    nodes.append(
        helper.make_node(
            "Reshape",
            ["final.normed", const("head.flat_shape", np.array([-1, hidden], np.int64))],
            ["final.flat"],
            name="head.flatten",
        )
    )
    nodes.append(
        helper.make_node("Gather", ["final.flat", "logits_index"], ["final.rows"], "head.rows")
    )
    nodes.append(
        helper.make_node(
            "Unsqueeze",
            ["final.rows", const("head.axis", np.array([1], np.int64))],
            ["final.last"],
            name="head.unsqueeze",
        )
    )
    head = "lm_head.weight" if "lm_head.weight" in state else embed  # tied: the embedding
    nodes.append(
        helper.make_node(
            "MatMul",
            ["final.last", const("lm_head.weight.T", state[head].T)],
            ["logits"],
            name="lm_head",
        )
    )

    cache: list[str | int | None] = ["batch", kv_heads, "capacity", head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["batch"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, cache
                )
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, cache)
            )
    graph = helper.make_graph(nodes, "causal_lm_gqa", inputs, outputs, inits)
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        ir_version=IR_VERSION,
        producer_name="mantle",
    )
    onnx.save_model(proto, str(path), save_as_external_data=False)
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    log.info("GroupQueryAttention graph: %d nodes %s", len(nodes), counts)
    return counts
