"""4-bit weights (workers/compile/int4.py) and the LM gate's arithmetic, on graphs built here."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from workers.compile import int4, lm_gate

VOCAB, HIDDEN, FFN = 96, 64, 128


def tied_lm(path: Path) -> dict[str, np.ndarray]:
    """ids -> Gather(E) -> MatMul(W1) -> MatMul(x, Transpose(E)): a tied head, like SmolLM2's."""
    rng = np.random.default_rng(0)
    weights = {
        "embed": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "w1": (rng.standard_normal((HIDDEN, HIDDEN)) / 8).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["h0"], name="embed_gather"),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="ffn"),
        helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0], name="tie"),
        helper.make_node("MatMul", ["h1", "embed_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path
    )
    return weights


def run(path: Path, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"ids": ids})
    return np.asarray(logits)


@pytest.mark.parametrize("level", [0, 4])
def test_every_weight_and_the_tied_head_become_block_quantized(tmp_path: Path, level: int) -> None:
    weights = tied_lm(tmp_path / "fp32.onnx")

    report = int4.quantize(
        tmp_path / "fp32.onnx",
        tmp_path / "q.onnx",
        int4.Options(accuracy_level=level),
    )

    model = onnx.load_model(str(tmp_path / "q.onnx"))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops == {"MatMulNBits": 2, "GatherBlockQuantized": 1}  # no Transpose, no fp32 MatMul
    bits = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node}
    assert bits["lm_head_Q8"]["bits"] == 8 and bits["ffn_Q4"]["bits"] == 4
    assert bits["ffn_Q4"]["block_size"] == 32
    assert bits["ffn_Q4"].get("accuracy_level", 0) == level
    # Integer zero points (uint8 packed), never float ones (ORT's slow unpacked path).
    zero_points = [t for t in model.graph.initializer if t.name.endswith("_zero_points")]
    assert zero_points and all(t.data_type == TensorProto.UINT8 for t in zero_points)
    assert not any(
        t.data_type == TensorProto.FLOAT and t.name == "embed" for t in model.graph.initializer
    )
    assert (report["matmul_nbits"], report["gather_block_quantized"]) == (2, 1)
    assert report["lm_head"] == "untied transposed copy"
    assert report["bytes_after"] < report["bytes_before"] / 2.5  # the 8-bit head and scales

    ids = np.arange(VOCAB, dtype=np.int64).reshape(2, -1)
    want = (weights["embed"][ids] @ weights["w1"]) @ weights["embed"].T
    got = run(tmp_path / "q.onnx", ids)
    # Two 4-bit roundings (embedding, w1) of Gaussian weights: ~10 % relative error.
    relative = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert relative < 0.15, relative
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.75


def test_a_head_that_is_already_a_constant_needs_no_untying(tmp_path: Path) -> None:
    tied_lm(tmp_path / "fp32.onnx")
    model = onnx.load_model(str(tmp_path / "fp32.onnx"))

    assert int4.untie_lm_head(model) == "embed.transposed"
    assert int4.untie_lm_head(model) is None  # the head now reads a constant
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMul", "MatMul"]


def test_the_lm_gate_names_every_bound_that_is_missed() -> None:
    bounds = lm_gate.Thresholds(min_token_agreement=0.7, min_exact_match=0.1, max_ppl_increase=0.4)
    good = {"token_agreement": 0.75, "exact_match": 0.1, "ppl_increase": 0.31}
    bad = {"token_agreement": 0.69, "exact_match": 0.0, "ppl_increase": float("nan")}

    assert bounds.failures(good) == []
    assert bounds.failures(bad) == [
        "token_agreement 0.69 (required >= 0.7)",
        "exact_match 0 (required >= 0.1)",
        "ppl_increase nan (required <= 0.4)",
    ]
    assert lm_gate.verdict(good, bounds)["passed"] is True
    assert lm_gate.verdict(bad, bounds)["failed"][0].startswith("token_agreement")


def test_the_gate_text_is_shipped_and_long_enough() -> None:
    paragraphs = lm_gate.gate_texts()
    assert len(paragraphs) >= 12
    assert sum(len(p) for p in paragraphs) > 5000


def q4_1_lm(path: Path) -> np.ndarray:
    """An ids -> Gather -> MatMul graph whose weight is 4-bit already, as GGUF Q4_1 is after
    dequantizing: per block of 32 input rows, `d * q + m` with q in 0..15 and float d, m."""
    rng = np.random.default_rng(1)
    k_blocks = HIDDEN // 32
    d = rng.uniform(0.01, 0.05, (k_blocks, 1, FFN)).astype(np.float32)
    m = rng.uniform(-0.4, -0.1, (k_blocks, 1, FFN)).astype(np.float32)
    q = rng.integers(0, 16, (k_blocks, 32, FFN)).astype(np.float32)
    q[:, 0, :] = 0  # every block spans its lattice, as Q4_1's min..max does
    q[:, 1, :] = 15
    weight = (d * q + m).reshape(HIDDEN, FFN)
    embed = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["embed", "ids"], ["h0"], name="embed_gather"),
            helper.make_node("MatMul", ["h0", "w"], ["out"], name="proj"),
        ],
        "q4_1",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", FFN])],
        [numpy_helper.from_array(embed, "embed"), numpy_helper.from_array(weight, "w")],
    )
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path
    )
    return embed @ weight


def test_weights_on_a_4_bit_lattice_with_float_offsets_are_kept_exactly(tmp_path: Path) -> None:
    want = q4_1_lm(tmp_path / "fp32.onnx")
    ids = np.arange(VOCAB, dtype=np.int64).reshape(2, -1)
    # Its one MatMul counts as the head: 4 bits here too.
    options = int4.Options(accuracy_level=0, embedding=False, head_bits=4, block_offsets=True)

    exact = int4.quantize(tmp_path / "fp32.onnx", tmp_path / "exact.onnx", options)
    rounded = int4.quantize(
        tmp_path / "fp32.onnx",
        tmp_path / "rounded.onnx",
        int4.Options(accuracy_level=0, embedding=False, head_bits=4, block_offsets=False),
    )

    assert exact["exact_blocks"] == exact["offset_blocks"] == FFN * HIDDEN // 32
    got = run(tmp_path / "exact.onnx", ids)
    assert np.abs(got - want[ids]).max() < 1e-4  # the published weights, not a re-rounding
    # Integer zero points alone must round every block a second time.
    again = run(tmp_path / "rounded.onnx", ids)
    assert rounded["exact_blocks"] == 0
    assert np.abs(again - want[ids]).max() > 1e-2
