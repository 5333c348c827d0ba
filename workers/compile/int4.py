"""4-bit weight-only quantization of a causal LM graph: MatMulNBits, block 32, integer zero points.

Every MatMul with a constant weight becomes ONNX Runtime's `MatMulNBits` (com.microsoft),
quantized round-to-nearest per block of `BLOCK_SIZE` input rows with a uint4 zero point
per block. Integer zero points matter: ONNX Runtime's CPU kernel prepacks such weights
for its int8 (VNNI) and fp32 block kernels, while float zero points (what GGUF's Q4_1
`w = d*q + m` needs) fall back to dequantizing the whole weight on every call.

A tied LM head is `MatMul(x, Transpose(embedding))`, which the quantizer skips (its
weight is not a constant); it gets its own transposed copy of the embedding first, so
it is quantized like every other MatMul. The embedding's `Gather` becomes
`GatherBlockQuantized` (4-bit, same blocks) when `embedding` is set.

Runs in the platform venv (compile nodes) and the prepare venv (the built-in export):
onnx, onnxruntime's quantization tools, numpy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("mantle.compile")

BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4
"""int8 activations per block (VNNI on this CPU): the fastest level measured, within the gate."""


@dataclass(frozen=True, slots=True)
class Options:
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    block_size: int = BLOCK_SIZE
    symmetric: bool = False
    bits: int = 4  # 8: every layer at 8 bits (a measured alternative, docs/decisions.md)
    embedding: bool = True  # the Gather of a (tied) embedding to GatherBlockQuantized
    # The LM head at 8 bits: SmolLM2's GGUF publishes it (the tied embedding) as Q8_0,
    # and at 4 bits it cost 10 points of perplexity for no measurable speed (docs/decisions.md).
    head_bits: int = 8
    # 4-bit layers as `w = scale * (q - zero) + remainder` per block, the remainder applied
    # beside the kernel (`_matmul_offset_blocks`): weights that are 4-bit already with a
    # float offset (GGUF Q4_1) are kept exactly instead of rounded a second time. Measured
    # on SmolLM2 (docs/decisions.md): much closer to fp32 (agreement 0.953 vs 0.7525), ~10 %
    # slower at batch 1, and it loses the conformance prompt's near tie; not the default.
    block_offsets: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "scheme": f"weight-only int{self.bits} (MatMulNBits), round to nearest, per block",
            "bits": self.bits,
            "block_size": self.block_size,
            "zero_points": (
                "none (symmetric)"
                if self.symmetric
                else "0, with a float offset per block added beside the kernel"
                if self.block_offsets and self.bits == 4
                else "uint4 per block"
            ),
            "accuracy_level": self.accuracy_level,
            "embedding": "GatherBlockQuantized int4" if self.embedding else "fp32",
            "lm_head_bits": self.head_bits,
        }


MANIFEST_FIELDS = (
    "scheme",
    "bits",
    "block_size",
    "zero_points",
    "accuracy_level",
    "embedding",
    "lm_head",
    "lm_head_bits",
    "exact_blocks",
    "offset_blocks",
    "fused",
)


def manifest_section(report: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `quantization` section: how the served graph's weights were made."""
    return {k: report[k] for k in MANIFEST_FIELDS if k in report}


def untie_lm_head(model: onnx.ModelProto) -> str | None:
    """Give a `MatMul(x, Transpose(W))` head its own constant `W^T`; the new name, if any.

    The transposed copy is a plain initializer, so the quantizer takes the head like
    any other MatMul; the embedding (W) stays for the Gather.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose":
            continue
        source = inits.get(transpose.input[0])
        if source is None or len(source.dims) != 2:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0]:
            continue
        name = f"{source.name}.transposed"
        weight = numpy_helper.to_array(source).T.copy()
        graph.initializer.append(numpy_helper.from_array(weight, name))
        node.input[1] = name
        still_used = any(transpose.output[0] in n.input for n in graph.node) or any(
            o.name == transpose.output[0] for o in graph.output
        )
        if not still_used:
            graph.node.remove(transpose)
        return name
    return None


def quantize(src: Path, dst: Path, options: Options) -> dict[str, Any]:
    """Quantize the graph at `src` into `dst` (one file); what was done, for the manifest."""
    import onnx

    started = time.monotonic()
    model = onnx.load_model(str(src), load_external_data=True)
    head = untie_lm_head(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    matmuls = [
        n for n in graph.node if n.op_type == "MatMul" and constant_weight(inits, n.input[1])
    ]
    head_node = matmuls[-1].name if matmuls else ""
    nodes: list[onnx.NodeProto] = []
    block_sums: dict[str, str] = {}  # an input's block sums, shared by the MatMuls it feeds
    exact_blocks = total_blocks = offset_matmuls = 0
    for node in graph.node:
        if node.op_type == "MatMul" and constant_weight(inits, node.input[1]):
            bits = options.head_bits if node.name == head_node else options.bits
            if bits == 4 and options.block_offsets and not options.symmetric:
                made, exact, total = _matmul_offset_blocks(graph, inits, node, options, block_sums)
                nodes.extend(made)
                exact_blocks += exact
                total_blocks += total
                offset_matmuls += 1
            else:
                nodes.append(_matmul_nbits(graph, inits, node, bits, options))
        elif (
            node.op_type == "Gather" and options.embedding and constant_weight(inits, node.input[0])
        ):
            nodes.append(gather_block_quantized(graph, inits, node, options))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    counts = op_counts(model)
    onnx.save_model(model, str(dst), save_as_external_data=False)
    report = {
        **options.describe(),
        "lm_head": "untied transposed copy" if head else "constant weight",
        "matmul_nbits": counts.get("MatMulNBits", 0),
        "gather_block_quantized": counts.get("GatherBlockQuantized", 0),
        # MatMuls left in fp32 besides the small block-offset ones.
        "matmul_fp32_left": counts.get("MatMul", 0) - offset_matmuls,
        # Blocks whose 4-bit lattice was found exactly (the rest rounded to nearest).
        "exact_blocks": exact_blocks,
        "offset_blocks": total_blocks,
        "bytes_before": src.stat().st_size,
        "bytes_after": dst.stat().st_size,
        "seconds": round(time.monotonic() - started, 1),
    }
    log.info("int4: %s", report)
    return report


def constant_weight(inits: dict[str, onnx.TensorProto], name: str) -> bool:
    """A constant 2-D float32 weight (what MatMulNBits and GatherBlockQuantized take)."""
    tensor = inits.get(name)
    return tensor is not None and len(tensor.dims) == 2 and tensor.data_type == 1


def _matmul_nbits(
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    node: onnx.NodeProto,
    bits: int,
    options: Options,
) -> onnx.NodeProto:
    """`MatMul(A, W)` as `MatMulNBits(A, packed W, scales, zero points)`, blocks along K."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    # ORT's own block quantizer (MLAS), as its MatMulNBitsQuantizer calls it; that
    # module itself needs onnx_ir, which the platform venv does not carry.
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    weight = numpy_helper.to_array(inits[node.input[1]])
    k, n = weight.shape
    block = options.block_size
    k_blocks = (k + block - 1) // block
    if k_blocks * block != k:
        weight = np.pad(weight, ((0, k_blocks * block - k), (0, 0)))
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    packed = np.zeros((n, k_blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, (k_blocks * bits + 7) // 8), dtype=np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, weight, scales, zero_points, block, n, k, options.symmetric)
    base = node.input[1]
    tensors = [
        numpy_helper.from_array(packed, f"{base}_Q{bits}"),
        numpy_helper.from_array(scales, f"{base}_scales"),
    ]
    if not options.symmetric:
        tensors.append(numpy_helper.from_array(zero_points, f"{base}_zero_points"))
    graph.initializer.extend(tensors)
    made = onnx.helper.make_node(
        "MatMulNBits",
        [node.input[0], *(t.name for t in tensors)],
        list(node.output),
        name=f"{node.name}_Q{bits}",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
    )
    if options.accuracy_level:  # absent means 0, as ORT's own quantizer writes it
        made.attribute.append(onnx.helper.make_attribute("accuracy_level", options.accuracy_level))
    return made


def _matmul_offset_blocks(
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    node: onnx.NodeProto,
    options: Options,
    block_sums: dict[str, str],
) -> tuple[list[onnx.NodeProto], int, int]:
    """`MatMul(A, W)` as `MatMulNBits(A, q, scale, zp=0) + BlockSums(A) @ offsets`.

    Each block of W (32 input rows of one column) is written `w = scale * q + offset`
    with q in 0..15: offset is the block's minimum and scale its lattice step when the
    values lie on a 4-bit lattice (GGUF Q4_1 dequantized: `d * q + m`), so the published
    weights are kept exactly; otherwise (max - min) / 15, rounded to nearest. The kernel
    computes `A @ (scale * q)` on its fast prepacked path (integer zero points, here 0);
    the offsets add `sum over each block of A` times the block's offset: one
    [..., K/32] x [K/32, N] MatMul. Returns the nodes, the blocks kept exactly, all blocks.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    k, n = weight.shape
    block = options.block_size
    if k % block:
        raise ValueError(f"{node.name}: K={k} is not a multiple of the block size {block}")
    k_blocks = k // block
    blocks = weight.T.reshape(n, k_blocks, block)  # [N, KB, 32]
    low = blocks.min(-1, keepdims=True)
    diffs = blocks - low
    span = diffs.max(-1, keepdims=True)
    noise = np.maximum(span * 1e-4, 1e-12)

    def on_lattice(step: Any) -> Any:
        """Blocks whose values are all `min + step * q` with q in 0..15 (up to noise)."""
        safe = np.where(step > 0, step, 1.0)
        q = np.round(diffs / safe)
        return (q.max(-1, keepdims=True) <= 15) & (
            np.abs(diffs - q * safe).max(-1, keepdims=True) <= noise
        )

    # Q4_1 makes d = (max - min) / 15, so its blocks span the lattice: the rounding step
    # is already exact for them. Otherwise the smallest gap above noise may be the step
    # (a block that does not reach 15); failing both, round to nearest at span / 15.
    rtn_scale = span / 15
    gap = np.where(diffs > noise, diffs, np.inf).min(-1, keepdims=True)
    gap = np.where(np.isfinite(gap), gap, 0.0)
    exact_span = on_lattice(rtn_scale)
    exact_gap = on_lattice(gap) & ~exact_span
    exact = exact_span | exact_gap
    scale = np.where(exact_gap, gap, rtn_scale)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round(diffs / safe), 0, 15).astype(np.uint8)  # [N, KB, 32]
    # The kernel's zero point centres the block (the nearest integer to -min/scale), so what
    # it computes from int8-quantized activations is the bulk of the product, as with any
    # asymmetric block; the offsets carry only the remainder (at most half a step), which is
    # what the integer zero point cannot say. Zero points 0 would leave two large terms to
    # cancel, and the activations' rounding error with them (measured: wrong answers).
    zero = np.clip(np.round(-low / safe), 0, 15)  # [N, KB, 1]
    remainder = low + zero * scale  # w = scale * (q - zero) + remainder
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # [N, KB, 16]: element 2i in the low nibble
    base = node.input[1]
    tensors = [
        numpy_helper.from_array(np.ascontiguousarray(packed), f"{base}_Q4"),
        numpy_helper.from_array(scale[..., 0].astype(np.float32), f"{base}_scales"),
        numpy_helper.from_array(
            _pack_nibbles(zero[..., 0].astype(np.uint8)), f"{base}_zero_points"
        ),
        numpy_helper.from_array(
            np.ascontiguousarray(remainder[..., 0].T.astype(np.float32)), f"{base}_offsets"
        ),  # [KB, N]
    ]
    graph.initializer.extend(tensors)
    made: list[onnx.NodeProto] = []
    main = f"{node.output[0]}_q4"
    kernel = onnx.helper.make_node(
        "MatMulNBits",
        [node.input[0], tensors[0].name, tensors[1].name, tensors[2].name],
        [main],
        name=f"{node.name}_Q4",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
    )
    if options.accuracy_level:
        kernel.attribute.append(
            onnx.helper.make_attribute("accuracy_level", options.accuracy_level)
        )
    made.append(kernel)
    source = node.input[0]
    sums = block_sums.get(source)
    if sums is None:
        # A [batch, seq, K] activation: [batch, seq, K/32, 32] summed over the last axis.
        shape = f"{source}_blocks_shape"
        axes = f"{source}_blocks_axes"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([0, 0, k_blocks, block], np.int64), shape),
                numpy_helper.from_array(np.array([-1], np.int64), axes),
            ]
        )
        grouped = f"{source}_blocks"
        sums = f"{source}_block_sums"
        made.append(onnx.helper.make_node("Reshape", [source, shape], [grouped]))
        made.append(onnx.helper.make_node("ReduceSum", [grouped, axes], [sums], keepdims=0))
        block_sums[source] = sums
    offset = f"{node.output[0]}_offsets"
    made.append(onnx.helper.make_node("MatMul", [sums, tensors[3].name], [offset]))
    made.append(onnx.helper.make_node("Add", [main, offset], list(node.output)))
    return made, int(exact.sum()), int(exact.size)


def gather_block_quantized(
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    node: onnx.NodeProto,
    options: Options,
) -> onnx.NodeProto:
    """`Gather(E, ids)` as `GatherBlockQuantized`: uint8 holding two 4-bit values, blocks
    along the hidden dimension, one uint4 zero point per block."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    table = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
    rows, cols = table.shape
    block = options.block_size
    if cols % block:
        raise ValueError(f"embedding width {cols} is not a multiple of {block}")
    blocks = table.reshape(rows, cols // block, block)
    low = np.minimum(blocks.min(-1, keepdims=True), 0)
    high = np.maximum(blocks.max(-1, keepdims=True), 0)
    scale = (high - low) / 15
    safe = np.where(scale == 0, 1, scale)
    zero = np.clip(np.round(-low / safe), 0, 15)
    q = np.clip(np.round(blocks / safe + zero), 0, 15).astype(np.uint8).reshape(rows, cols)
    zero_u8 = zero.astype(np.uint8).reshape(rows, cols // block)
    base = node.input[0]
    tensors = [
        numpy_helper.from_array(q[:, 0::2] | (q[:, 1::2] << 4), f"{base}_Q4"),
        numpy_helper.from_array(scale.reshape(rows, cols // block), f"{base}_scales"),
        numpy_helper.from_array(_pack_nibbles(zero_u8), f"{base}_zero_points"),
    ]
    graph.initializer.extend(tensors)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return onnx.helper.make_node(
        "GatherBlockQuantized",
        [tensors[0].name, node.input[1], tensors[1].name, tensors[2].name],
        list(node.output),
        name=f"{node.name}_Q4",
        domain="com.microsoft",
        bits=4,
        block_size=block,
        gather_axis=axis,
        quantize_axis=1,
    )


def _pack_nibbles(values: Any) -> Any:
    """Two uint4 values per byte along the last axis, the first in the low nibble."""
    import numpy as np

    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], -1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """The fp32 originals the quantizer replaced (the embedding, once both uses are 4-bit)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
