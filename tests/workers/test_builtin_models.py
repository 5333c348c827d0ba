"""The real built-in artifacts answer correctly through ONNX Runtime alone (no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from workers.compile import builtin

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
    lm = manifest["causal_lm"]
    past = {
        f"past_key_values.{i}.{kind}": np.zeros(
            (1, lm["num_kv_heads"], 0, lm["head_dim"]), dtype=np.float32
        )
        for i in range(lm["num_layers"])
        for kind in ("key", "value")
    }
    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    names = [o.name for o in sess.get_outputs()]
    out: list[int] = []
    for _ in range(max_new):
        pos = np.arange(mask.shape[1] - ids.shape[1], mask.shape[1], dtype=np.int64)[None, :]
        results = dict(
            zip(
                names,
                sess.run(
                    None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
                ),
                strict=True,
            )
        )
        logits = results["logits"]
        assert logits.shape == (1, 1, lm["vocab_size"])  # last position only
        token = int(logits[0, -1].argmax())
        if token in manifest["eos_token_ids"]:
            break
        out.append(token)
        past = {k: results[k.replace("past_key_values", "present")] for k in past}
        ids = np.array([[token]], dtype=np.int64)
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
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
