"""The real built-in artifacts answer correctly through ONNX Runtime alone (no torch)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from workers.compile import builtin, lm_gate

pytestmark = pytest.mark.models


def _store() -> Path:
    default = Path.home() / ".cache" / "mantle" / "artifacts"
    return Path(os.environ.get("MANTLE_ARTIFACT_DIR") or default)


def _load(alias: str) -> tuple[Path, dict[str, Any]]:
    store = _store()
    (recipe,) = builtin.select(alias)
    key = builtin.recipe_key(recipe, builtin.read_pins())
    found = builtin.lookup(store, key, full=False)
    if found == "not built yet":
        pytest.skip(f"{recipe.name} is not in {store} (build it with bin/prepare-models)")
    assert isinstance(found, tuple), f"{recipe.name}: {found}"
    return found


def _session(directory: Path, manifest: dict[str, Any]) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(
        str(directory / manifest["model_file"]), opts, providers=["CPUExecutionProvider"]
    )


Loaded = tuple[Path, dict[str, Any], ort.InferenceSession]


@pytest.fixture(scope="module")
def chat() -> Loaded:
    directory, manifest = _load("smollm2")
    return directory, manifest, _session(directory, manifest)


@pytest.fixture(scope="module")
def encoder() -> Loaded:
    directory, manifest = _load("minilm")
    return directory, manifest, _session(directory, manifest)


def _tokenizer(loaded: Loaded) -> Tokenizer:
    # A fresh one per test: enable_padding() and friends mutate a Tokenizer.
    directory, manifest, _ = loaded
    return Tokenizer.from_file(str(directory / manifest["tokenizer_file"]))


def _greedy(
    manifest: dict[str, Any], sess: ort.InferenceSession, prompt: list[int], max_new: int
) -> list[int]:
    """Greedy decoding through the graph's own interface (lm_gate.Decoder runs either)."""
    decoder = lm_gate.Decoder(sess, manifest["pad_token_id"])
    logits, past, mask = decoder.start([prompt])
    out: list[int] = []
    for _ in range(max_new):
        assert logits.shape == (1, manifest["causal_lm"]["vocab_size"])  # one position
        token = int(logits[0].argmax())
        if token in manifest["eos_token_ids"]:
            break
        out.append(token)
        logits, past, mask = decoder.step(np.array([token], dtype=np.int64), past, mask)
    return out


def test_chat_manifest_matches_the_contract(chat: Loaded) -> None:
    _, manifest, sess = chat
    assert manifest["name"] == "smollm2-135m-instruct"
    assert manifest["runtime"] == "onnx-causal-lm"
    assert manifest["kind"] == "chat"
    assert manifest["context_length"] == 8192
    assert manifest["causal_lm"]["logits"] == "last"
    assert [i.name for i in sess.get_inputs()] == list(manifest["io"]["inputs"])
    assert [o.name for o in sess.get_outputs()] == list(manifest["io"]["outputs"])
    assert manifest["validation"]["parity"]["max_abs_diff"] < 1e-3


def test_chat_model_knows_the_capital_of_france(chat: Loaded) -> None:
    _, manifest, sess = chat
    tok = _tokenizer(chat)
    template = ImmutableSandboxedEnvironment().from_string(manifest["chat_template"])
    prompt = template.render(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    answer = tok.decode(_greedy(manifest, sess, ids, 24), skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_chat_model_is_served_with_4bit_weights_and_keeps_its_fp32_variant(chat: Loaded) -> None:
    import onnx

    directory, manifest, _ = chat
    graph = onnx.load_model(str(directory / manifest["model_file"])).graph
    ops = Counter(n.op_type for n in graph.node)
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    # 30 layers x 4 MatMuls at 4 bits (q, k and v side by side in one, gate and up in
    # another, o, down), and the (untied) LM head at 8.
    assert ops["MatMulNBits"] == 121 and ops["GatherBlockQuantized"] == 1
    # Rotary and attention fused, one node per layer that writes the cache in place: no
    # Concat copies a cache, and no traced attention is left.
    assert ops["GroupQueryAttention"] == 30 and manifest["causal_lm"]["kv_cache"] == "in_place"
    assert not ops["Concat"] and not ops["Softmax"] and not ops["Transpose"]
    assert manifest["validation"]["parity"]["decode_b2_in_place"] < 1e-3
    assert Counter(a["bits"] for a in attrs) == {4: 120, 8: 1}
    assert {(a["block_size"], a["accuracy_level"]) for a in attrs} == {(32, 4)}
    constant = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constant]
    assert len(nbits[0].input) == 4  # integer zero points: ORT's prepacked kernels
    assert manifest["quantization"]["zero_points"] == "uint4 per block"
    assert manifest["runtime_options"] == {"intra_op_threads": 2}

    fp32 = manifest["variants"]["fp32"]
    assert fp32["model_file"] == "model.fp32.onnx" and fp32["kv_cache"] == "padded"
    assert fp32["validation"]["parity"]["max_abs_diff"] < 1e-3
    assert (directory / fp32["model_file"]).stat().st_size > 4 * (
        directory / manifest["model_file"]
    ).stat().st_size

    gate = manifest["validation"]["quality_gate"]
    assert gate["passed"] is True
    assert gate["token_agreement"] >= gate["thresholds"]["min_token_agreement"]
    assert gate["ppl_increase"] <= gate["thresholds"]["max_ppl_increase"]
    assert gate["prompts"] == len(lm_gate.PROMPTS)


def test_chat_model_carries_a_w8a8_variant_that_passed_its_own_gate(chat: Loaded) -> None:
    import onnx

    directory, manifest, served = chat
    w8 = manifest["variants"]["w8a8"]
    assert w8["model_file"] == "model.w8a8.onnx" and w8["kv_cache"] == "in_place"
    graph = onnx.load_model(str(directory / w8["model_file"])).graph
    ops = Counter(n.op_type for n in graph.node)
    # The same 121 MatMuls as the 4-bit graph, as integer GEMMs: 4 inputs quantized per
    # layer (attention in and out, MLP in and its activation) and the head's.
    assert ops["MatMulIntegerToFloat"] == 121 and ops["QuantizeLinear"] == 121
    assert not ops["MatMulNBits"] and not ops["MatMul"]
    assert ops["GroupQueryAttention"] == 30 and ops["GatherBlockQuantized"] == 1
    # The same interface as the served graph: the engine serves either.
    assert [i.name for i in graph.input] == [i.name for i in served.get_inputs()]
    assert w8["validation"]["smoke"]["passed"] is True
    gate = w8["validation"]["quality_gate"]
    assert gate["passed"] is True and gate["prompts"] == len(lm_gate.PROMPTS)
    # Closer to fp32 than the 4-bit graph on both of the gate's measures.
    four = manifest["validation"]["quality_gate"]
    assert gate["token_agreement"] > four["token_agreement"]
    assert gate["ppl_increase"] < four["ppl_increase"]
    assert w8["quantization"]["matmul_integer"] == 121


def test_the_lm_gate_tells_the_4bit_graph_from_the_fp32_one(chat: Loaded) -> None:
    # A short run of the gate's own measure: the fp32 graph agrees with itself exactly,
    # the 4-bit one does not.
    directory, manifest, served = chat
    fp32 = _session(directory, {"model_file": manifest["variants"]["fp32"]["model_file"]})
    tok = _tokenizer(chat)
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in lm_gate.PROMPTS[:6]]
    texts = [tok.encode(t, add_special_tokens=False).ids for t in lm_gate.gate_texts()[:3]]
    eos = manifest["eos_token_ids"]
    pad = manifest["pad_token_id"]

    same = lm_gate.measure(
        lm_gate.Decoder(fp32, pad), lm_gate.Decoder(fp32, pad), prompts, texts, eos, new_tokens=16
    )
    quantized = lm_gate.measure(
        lm_gate.Decoder(fp32, pad), lm_gate.Decoder(served, pad), prompts, texts, eos, new_tokens=16
    )

    assert (same["token_agreement"], same["exact_match"], same["ppl_increase"]) == (1.0, 1.0, 0.0)
    # A sixth of the gate's prompts and a third of its tokens: near, not at, its figures.
    assert 0.5 < quantized["token_agreement"] < 1.0
    assert 0.0 < quantized["ppl_increase"] <= lm_gate.DEFAULT_THRESHOLDS.max_ppl_increase


def test_embeddings_rank_a_paraphrase_above_an_unrelated_sentence(encoder: Loaded) -> None:
    _, manifest, sess = encoder
    tok = _tokenizer(encoder)
    assert manifest["runtime"] == "onnx-encoder"
    assert manifest["embedding"]["max_input_tokens"] == 256
    tok.enable_truncation(manifest["embedding"]["max_input_tokens"])
    tok.enable_padding(pad_id=manifest["pad_token_id"])
    texts = [
        "A man is eating food.",
        "Someone is having a meal.",
        "The stock market crashed today.",
    ]
    enc = tok.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    (emb,) = sess.run(None, feeds)
    assert emb.shape == (3, manifest["embedding"]["dimensions"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar == pytest.approx(0.69, abs=0.02)
    assert abs(unrelated) < 0.1
    assert similar > unrelated + 0.3


def test_encoder_tokenizer_counts_real_tokens_only(encoder: Loaded) -> None:
    # The packaged tokenizer.json truncated and padded to 128: billing would count 128.
    tok = _tokenizer(encoder)
    assert tok.padding is None
    assert tok.truncation is None
    assert len(tok.encode("Hello world").ids) == 4  # [CLS] hello world [SEP]
