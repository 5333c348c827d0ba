"""8-bit weights and activations (workers/compile/w8a8.py), on graphs built here."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from workers.compile import w8a8

HIDDEN, FFN, VOCAB = 64, 96, 80


def mlp(path: Path) -> dict[str, np.ndarray]:
    """x -> x @ up, x @ gate (one input, two MatMuls) -> relu(up) * gate -> @ down -> @ E^T."""
    rng = np.random.default_rng(1)
    weights = {
        "up": (rng.standard_normal((HIDDEN, FFN)) / 8).astype(np.float32),
        "gate": (rng.standard_normal((HIDDEN, FFN)) / 8).astype(np.float32),
        "down": (rng.standard_normal((FFN, HIDDEN)) / 8).astype(np.float32),
        "embed": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "up"], ["u"], name="up"),
        helper.make_node("MatMul", ["x", "gate"], ["g"], name="gate"),
        helper.make_node("Relu", ["u"], ["ru"]),
        helper.make_node("Mul", ["ru", "g"], ["act"]),
        helper.make_node("MatMul", ["act", "down"], ["h"], name="down"),
        helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0], name="tie"),
        helper.make_node("MatMul", ["h", "embed_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path
    )
    return weights


def reference(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    act = np.maximum(x @ weights["up"], 0) * (x @ weights["gate"])
    return (act @ weights["down"]) @ weights["embed"].T


def run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"x": x})
    return np.asarray(logits)


def test_every_matmul_becomes_an_integer_gemm_close_to_fp32(tmp_path: Path) -> None:
    weights = mlp(tmp_path / "fp32.onnx")

    report = w8a8.quantize(tmp_path / "fp32.onnx", tmp_path / "q.onnx")

    model = onnx.load_model(str(tmp_path / "q.onnx"))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulIntegerToFloat"] == 4 and not ops["MatMul"] and not ops["Transpose"]
    # x feeds up and gate: quantized once; act and h once each.
    assert ops["QuantizeLinear"] == 3 and report["quantized_inputs"] == 3
    assert (report["matmul_integer"], report["matmul_fp32_left"]) == (4, 0)
    assert report["lm_head"] == "untied transposed copy"
    int8 = [t for t in model.graph.initializer if t.name.endswith("_W8")]
    assert len(int8) == 4 and all(t.data_type == TensorProto.INT8 for t in int8)
    assert report["bytes_after"] < report["bytes_before"] / 3

    x = np.random.default_rng(2).standard_normal((2, 5, HIDDEN)).astype(np.float32)
    want = reference(weights, x)
    got = run(tmp_path / "q.onnx", x)
    assert got.shape == want.shape
    # 8-bit weights and activations: ~1 % of the logits' spread, not fp32's 1e-6.
    error = np.abs(got - want).max() / np.abs(want).max()
    assert 1e-5 < error < 0.03, error


def test_a_row_computes_the_same_whatever_sits_beside_it(tmp_path: Path) -> None:
    # One scale per row: a neighbour a thousand times larger (another tenant's prompt in
    # the same batch) changes nothing in this row, bit for bit. With one scale for the
    # whole batch (ORT's DynamicQuantizeMatMul) the small row would round to almost zero.
    mlp(tmp_path / "fp32.onnx")
    w8a8.quantize(tmp_path / "fp32.onnx", tmp_path / "q.onnx")
    rng = np.random.default_rng(3)
    mine = rng.standard_normal((1, 4, HIDDEN)).astype(np.float32)
    loud = 1000 * rng.standard_normal((1, 4, HIDDEN)).astype(np.float32)
    quiet = rng.standard_normal((1, 4, HIDDEN)).astype(np.float32)

    alone = run(tmp_path / "q.onnx", mine)
    beside_loud = run(tmp_path / "q.onnx", np.concatenate([loud, mine]))[1:]
    beside_quiet = run(tmp_path / "q.onnx", np.concatenate([mine, quiet, loud]))[:1]

    np.testing.assert_array_equal(beside_loud, alone)
    np.testing.assert_array_equal(beside_quiet, alone)


def test_an_all_zero_row_gives_zeros_not_nan(tmp_path: Path) -> None:
    mlp(tmp_path / "fp32.onnx")
    w8a8.quantize(tmp_path / "fp32.onnx", tmp_path / "q.onnx")
    x = np.zeros((1, 2, HIDDEN), np.float32)
    x[0, 1] = 1.0

    got = run(tmp_path / "q.onnx", x)

    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[0, 0], np.zeros(VOCAB, np.float32))
