"""8-bit weights and 8-bit activations (w8a8) for a causal LM graph: the batched variant.

Every MatMul with a constant weight `W [K, N]` becomes ONNX Runtime's integer GEMM:

    scale_x = max(|x|, over K) / 127                       one per row of x
    x_q     = QuantizeLinear(x, scale_x, 128)              uint8, blocked: one block per row
    y       = MatMulIntegerToFloat(x_q, W_q, scale_x, scale_w, 128)

with `W_q` int8 and `scale_w` one per output column (symmetric, round to nearest). MLAS
runs uint8 x int8 GEMMs on VNNI and AMX; at a batch of 16-32 rows that is several times
what `MatMulNBits`' 4-bit kernels do on the same CPU (docs/benchmarks.md), while one row
at a time reads twice the bytes of the 4-bit graph and pays for the quantizing nodes, so
the 4-bit graph stays the default and this one is the variant for pools that run full
batches (docs/decisions.md).

Activations are quantized per row, never per tensor: ONNX Runtime's fused
`DynamicQuantizeMatMul` takes one scale for the whole batch, so a row's result would depend
on the other rows of the batch (another tenant's prompt moving your tokens, and greedy
decoding no longer repeatable). A row's scale is its own, so a row computes the same
whatever sits beside it (tested).

Activation outliers: the input of each MLP's down projection (`silu(gate) * up`) has a few
channels up to ~200x the median channel's magnitude on SmolLM2, and one scale per row
spends the 8 bits on them. The built-in export first moves them into the weights the way
SmoothQuant does (Xiao et al., 2022): per channel `s = max|act|^a / max|W_down row|^(1-a)`
with `a = SMOOTHING_ALPHA`, the up projection divided by `s` and the down projection
multiplied by it (`smoothing_scales`, applied in gqa_graph.build), calibrated on the LM
gate's prompts.

The embedding's `Gather` becomes 4-bit `GatherBlockQuantized` as in the 4-bit graph
(a lookup, no arithmetic to speed up). Runs wherever int4.py runs: onnx, numpy, onnxruntime.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.compile import int4

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("mantle.compile")

SCHEME = "w8a8: int8 weights per output column, uint8 activations per row (MatMulIntegerToFloat)"
ZERO_POINT = 128
SMOOTHING_ALPHA = 0.5
_TINY = 1e-12  # an all-zero row quantizes to zeros instead of dividing by zero


def describe() -> dict[str, Any]:
    return {
        "scheme": SCHEME,
        "bits": 8,
        "weights": "int8, symmetric, one scale per output column",
        "activations": "uint8, one scale per row, zero point 128",
        "embedding": "GatherBlockQuantized int4",
    }


def smoothing_scales(act_max: Any, weight_max: Any, alpha: float = SMOOTHING_ALPHA) -> Any:
    """Per-channel scales that balance an input's range against its weight rows' range.

    `act_max[k]`: the largest |activation| seen in channel k over the calibration set;
    `weight_max[k]`: the largest |weight| of row k of the MatMul it feeds. Dividing the
    activation by `s` and multiplying the row by `s` leaves the product as it was.
    """
    import numpy as np

    act = np.maximum(np.asarray(act_max, dtype=np.float64), 1e-5)
    weight = np.maximum(np.asarray(weight_max, dtype=np.float64), 1e-5)
    return (act**alpha / weight ** (1 - alpha)).astype(np.float32)


def quantize(src: Path, dst: Path) -> dict[str, Any]:
    """Quantize the fp32 graph at `src` into `dst` (one file); what was done, for the manifest."""
    import onnx

    started = time.monotonic()
    model = onnx.load_model(str(src), load_external_data=True)
    head = int4.untie_lm_head(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph.initializer.extend(_constants())
    quantized: dict[str, tuple[str, str]] = {}  # an input's (x_q, scale_x), shared by its MatMuls
    nodes: list[onnx.NodeProto] = []
    matmuls = 0
    for node in graph.node:
        if node.op_type == "MatMul" and int4.constant_weight(inits, node.input[1]):
            x = node.input[0]
            if x not in quantized:
                k = int(inits[node.input[1]].dims[0])
                quantized[x] = _quantize_rows(nodes, x, k)
            nodes.extend(_integer_matmul(graph, inits, node, *quantized[x]))
            matmuls += 1
        elif node.op_type == "Gather" and int4.constant_weight(inits, node.input[0]):
            nodes.append(int4.gather_block_quantized(graph, inits, node, int4.Options()))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    int4.drop_unused_initializers(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save_model(model, str(dst), save_as_external_data=False)
    counts = int4.op_counts(model)
    report = {
        **describe(),
        "lm_head": "untied transposed copy" if head else "constant weight",
        "matmul_integer": matmuls,
        "quantized_inputs": len(quantized),
        "matmul_fp32_left": counts.get("MatMul", 0),
        "bytes_before": src.stat().st_size,
        "bytes_after": dst.stat().st_size,
        "seconds": round(time.monotonic() - started, 1),
    }
    log.info("w8a8: %s", report)
    return report


def _constants() -> list[onnx.TensorProto]:
    import numpy as np
    from onnx import numpy_helper

    return [
        numpy_helper.from_array(np.array([-1], np.int64), "w8a8.last_axis"),
        numpy_helper.from_array(np.array(127.0, np.float32), "w8a8.q_max"),
        numpy_helper.from_array(np.array(_TINY, np.float32), "w8a8.tiny"),
        numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "w8a8.zero_point"),
    ]


def _quantize_rows(nodes: list[onnx.NodeProto], x: str, k: int) -> tuple[str, str]:
    """Nodes that quantize `x [..., K]` to uint8 with one scale per row; (x_q, scale)."""
    from onnx import helper

    p = f"{x}.w8a8"
    nodes.extend(
        [
            helper.make_node("Abs", [x], [f"{p}.abs"], name=f"{p}.abs"),
            helper.make_node(
                "ReduceMax",
                [f"{p}.abs", "w8a8.last_axis"],
                [f"{p}.max"],
                name=f"{p}.max",
                keepdims=1,
            ),
            helper.make_node("Max", [f"{p}.max", "w8a8.tiny"], [f"{p}.max1"], name=f"{p}.max1"),
            helper.make_node("Div", [f"{p}.max1", "w8a8.q_max"], [f"{p}.scale"], name=f"{p}.scale"),
            # Blocked QuantizeLinear wants a zero point of the scale's own shape.
            helper.make_node("Shape", [f"{p}.scale"], [f"{p}.shape"], name=f"{p}.shape"),
            helper.make_node(
                "Expand", ["w8a8.zero_point", f"{p}.shape"], [f"{p}.zp"], name=f"{p}.zp"
            ),
            helper.make_node(
                "QuantizeLinear",
                [x, f"{p}.scale", f"{p}.zp"],
                [f"{p}.q"],
                name=f"{p}.q",
                axis=-1,
                block_size=k,  # one block per row: the scale is [..., 1]
            ),
        ]
    )
    return f"{p}.q", f"{p}.scale"


def _integer_matmul(
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    node: onnx.NodeProto,
    x_q: str,
    scale_x: str,
) -> list[onnx.NodeProto]:
    """`MatMul(x, W)` as the integer GEMM over `x_q` and int8 `W`, rescaled per row."""
    import numpy as np
    from onnx import helper, numpy_helper

    weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    scale_w = np.maximum(np.abs(weight).max(axis=0), _TINY) / 127.0
    weight_q = np.clip(np.round(weight / scale_w), -127, 127).astype(np.int8)
    base = node.input[1]
    graph.initializer.extend(
        [
            numpy_helper.from_array(weight_q, f"{base}_W8"),
            numpy_helper.from_array(scale_w.astype(np.float32), f"{base}_W8_scales"),
        ]
    )
    # The row scale goes in as A's scale, shaped [..., 1]: ONNX Runtime's CPU kernel
    # broadcasts a non-scalar scale over the output (ORT 1.31; tests/workers/test_w8a8.py
    # holds the numbers), which spares a Mul node per MatMul.
    return [
        helper.make_node(
            "MatMulIntegerToFloat",
            [x_q, f"{base}_W8", scale_x, f"{base}_W8_scales", "w8a8.zero_point"],
            list(node.output),
            name=f"{node.name}_W8",
            domain="com.microsoft",
        )
    ]
