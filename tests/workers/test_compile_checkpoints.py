"""Hugging Face causal LM checkpoints through the pipeline: a tiny Llama built in the test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.workers.compile_support import tree
from workers.chat_template import TemplateBudget
from workers.compile import artifacts
from workers.compile.pipeline import Pipeline
from workers.compile.steps.source import default_prepare_python
from workers.contract import CompileRequest, ModelRef
from workers.runtime.models import load_model, model_file

pytestmark = [pytest.mark.timeout(300), pytest.mark.models]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Runs in the prepare venv: random weights (the architecture is what matters),
# SmolLM2's tokenizer from the built-in artifact (same vocabulary size).
BUILD = """
import json, shutil, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
out, tokenizer, template = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
LlamaForCausalLM(cfg).save_pretrained(out)
shutil.copy(tokenizer, out / "tokenizer.json")
config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
          "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
if template:
    config["chat_template"] = template
(out / "tokenizer_config.json").write_text(json.dumps(config))
"""


def smollm_tokenizer() -> Path:
    from tests.support.stack import builtin_manifests

    for manifest in builtin_manifests():
        if manifest["name"] == "smollm2-135m-instruct":
            return Path(manifest["location"]) / "tokenizer.json"
    raise AssertionError("the built-in chat model is not prepared")


def tiny_llama(directory: Path, *, template: str = CHAT_TEMPLATE) -> Path:
    python = default_prepare_python()
    if not python.is_file():
        # Never a skip: a warm artifact cache does not build this venv, and the compile
        # tests would vanish from a green run. bin/test makes sure it exists.
        pytest.fail(
            f"no prepare venv at {python}: run bin/test, which builds it (or by hand: "
            "bash -c 'source bin/_lib.sh && source bin/_prepare.sh && ensure_prepare_venv')",
            pytrace=False,
        )
    subprocess.run(
        [str(python), "-c", BUILD, str(directory), str(smollm_tokenizer()), template],
        check=True,
        capture_output=True,
    )
    return directory


def test_a_causal_lm_checkpoint_exports_with_kv_cache_and_parity(tmp_path: Path) -> None:
    checkpoint = tiny_llama(tmp_path / "ckpt")
    store = tmp_path / "store"
    request = CompileRequest(
        job_id="cj_llama",
        organization_id="org_test",
        model_name="tiny-chat",
        kind="chat",
        source="hf-checkpoint",
        source_path=str(checkpoint),
    )

    outcome = Pipeline(request, store=store).run()

    assert (outcome.status, outcome.error) == ("succeeded", ""), outcome.steps
    steps = {s["name"]: s for s in outcome.steps}
    assert steps["export"]["metrics"]["source_parity"]["export_parity"]["max_abs_diff"] < 1e-3
    parity = steps["validate"]["metrics"]["parity"]
    assert parity["reference"] == "the source checkpoint run by torch"
    assert parity["max_abs_logit_diff"] <= 1e-3
    assert parity["top1_agreement"] == 1.0
    manifest = outcome.manifest
    assert manifest is not None
    assert manifest["causal_lm"] == {
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 16,
        "vocab_size": 49152,
        "logits": "last",
    }
    assert (manifest["chat_template"], manifest["eos_token_ids"], manifest["bos_token_id"]) == (
        CHAT_TEMPLATE,
        [2],
        1,
    )
    assert (manifest["runtime"], manifest["context_length"]) == ("onnx-causal-lm", 512)
    sha = manifest["sha256"]
    assert tree(store) == [sha, f"{sha}/mantle.json", f"{sha}/model.onnx", f"{sha}/tokenizer.json"]
    assert artifacts.verify_artifact(store / sha)["sha256"] == sha
    assert json.loads((store / sha / "tokenizer.json").read_text())["truncation"] is None
    # The checkpoint directory is the operator's: never deleted.
    assert (checkpoint / "model.safetensors").is_file()

    # The inference workers' loader takes it; a first step with empty past runs.
    loaded = load_model(
        ModelRef(
            version_id="mv_llama", runtime="onnx-causal-lm", sha256=sha, location=str(store / sha)
        )
    )
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([[1, 2, 3]], dtype=np.int64),
        "attention_mask": np.ones((1, 3), dtype=np.int64),
        "position_ids": np.array([[0, 1, 2]], dtype=np.int64),
    }
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 16), dtype=np.float32)
    logits, *present = loaded.session.run(None, feeds)
    assert logits.shape == (1, 1, 49152)
    assert present[0].shape == (1, 2, 3, 16)


def test_a_chat_checkpoint_without_a_template_is_refused_in_words(tmp_path: Path) -> None:
    checkpoint = tiny_llama(tmp_path / "ckpt", template="")
    store = tmp_path / "store"
    request = CompileRequest(
        job_id="cj_notemplate",
        organization_id="org_test",
        model_name="tiny-chat",
        kind="chat",
        source="hf-checkpoint",
        source_path=str(checkpoint),
    )

    outcome = Pipeline(request, store=store).run()

    assert (outcome.status, outcome.error_code) == ("failed", "export_failed")
    assert outcome.error == (
        "exporting the checkpoint failed: the checkpoint has no chat template "
        "(tokenizer_config.json `chat_template` or chat_template.jinja): add one, or compile "
        "it as kind `completion`"
    )
    assert tree(store) == []


def test_a_chat_checkpoint_whose_template_is_over_budget_is_refused_in_its_step_log(
    tmp_path: Path,
) -> None:
    hostile = (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
        + CHAT_TEMPLATE
    )
    checkpoint = tiny_llama(tmp_path / "ckpt", template=hostile)
    store = tmp_path / "store"
    request = CompileRequest(
        job_id="cj_hostile",
        organization_id="org_test",
        model_name="tiny-chat",
        kind="chat",
        source="hf-checkpoint",
        source_path=str(checkpoint),
    )

    # A generous clock: the loop cap, not a busy machine's time-out, is what refuses it.
    outcome = Pipeline(request, store=store, template_budget=TemplateBudget(seconds=60)).run()

    assert (outcome.status, outcome.error_code) == ("failed", "chat_template_over_budget")
    assert outcome.error.startswith(
        "the chat template is refused: rendering a short conversation, it loops more than "
        "1000000 times (nested loops?)"
    )
    steps = {s["name"]: s for s in outcome.steps}
    assert steps["tokenizer"]["status"] == "failed"
    assert steps["tokenizer"]["log"].endswith(f"failed: {outcome.error}")
    assert steps["package"]["status"] == "skipped"
    assert tree(store) == []


def test_an_int4_causal_lm_ships_4bit_weights_its_fp32_variant_and_the_lm_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    checkpoint = tiny_llama(tmp_path / "ckpt")
    store = tmp_path / "store"
    request = CompileRequest(
        job_id="cj_int4",
        organization_id="org_test",
        model_name="tiny-chat-int4",
        kind="chat",
        source="hf-checkpoint",
        source_path=str(checkpoint),
        quantize="int4",
    )

    outcome = Pipeline(request, store=store).run()

    assert (outcome.status, outcome.error) == ("succeeded", ""), outcome.steps
    manifest = outcome.manifest
    assert manifest is not None
    sha = manifest["sha256"]
    assert tree(store) == [
        sha,
        f"{sha}/mantle.json",
        f"{sha}/model.fp32.onnx",
        f"{sha}/model.onnx",
        f"{sha}/tokenizer.json",
    ]
    assert manifest["model_file"] == "model.onnx"
    assert manifest["variants"] == {"fp32": {"model_file": "model.fp32.onnx", "weights": "fp32"}}
    assert manifest["quantization"]["bits"] == 4
    assert manifest["quantization"]["block_size"] == 32
    assert manifest["quantization"]["zero_points"] == "uint4 per block"
    ops = {n.op_type for n in onnx.load_model(str(store / sha / "model.onnx")).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    fp32_ops = {n.op_type for n in onnx.load_model(str(store / sha / "model.fp32.onnx")).graph.node}
    assert "MatMulNBits" not in fp32_ops
    gate = manifest["validation"]["quality_gate"]
    assert gate["passed"] is True
    assert gate["thresholds"] == {
        "min_token_agreement": 0.7,
        "min_exact_match": 0.0,
        "max_ppl_increase": 0.4,
    }
    assert gate["prompts"] == 20 and gate["positions"] > 0 and gate["text_tokens"] > 1000
    assert 0.7 <= gate["token_agreement"] <= 1.0
    steps = {s["name"]: s for s in outcome.steps}
    assert steps["quantize"]["metrics"]["matmul_nbits"] > 0
    assert steps["quantize"]["metrics"]["matmul_fp32_left"] > 0  # attention's own MatMuls

    # Served 4-bit by default; MANTLE_MODEL_VARIANT=fp32 serves the full-precision graph.
    assert model_file(manifest) == "model.onnx"
    served = first_logits(load_model(ref_for(store, sha, "mv_int4")).session)
    monkeypatch.setenv("MANTLE_MODEL_VARIANT", "fp32")
    assert model_file(manifest) == "model.fp32.onnx"
    full = first_logits(load_model(ref_for(store, sha, "mv_int4_fp32")).session)
    assert served.shape == full.shape == (1, 1, 49152)
    assert 0 < float(np.abs(served - full).max()) < 1.0


def ref_for(store: Path, sha: str, version_id: str) -> ModelRef:
    return ModelRef(
        version_id=version_id, runtime="onnx-causal-lm", sha256=sha, location=str(store / sha)
    )


def first_logits(session: Any) -> np.ndarray:
    """The tiny Llama's logits for a 3-token prompt with an empty cache."""
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([[1, 2, 3]], dtype=np.int64),
        "attention_mask": np.ones((1, 3), dtype=np.int64),
        "position_ids": np.array([[0, 1, 2]], dtype=np.int64),
    }
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 16), dtype=np.float32)
    return np.asarray(session.run(["logits"], feeds)[0])


def test_an_int4_variant_that_misses_its_gate_fails_the_job_and_stores_nothing(
    tmp_path: Path,
) -> None:
    checkpoint = tiny_llama(tmp_path / "ckpt")
    store = tmp_path / "store"
    request = CompileRequest(
        job_id="cj_int4_strict",
        organization_id="org_test",
        model_name="tiny-chat-int4",
        kind="chat",
        source="hf-checkpoint",
        source_path=str(checkpoint),
        quantize="int4",
        tolerance=0.0,  # not one greedy token may differ from the fp32 graph's
    )

    outcome = Pipeline(request, store=store).run()

    assert (outcome.status, outcome.error_code) == ("failed", "quality_gate_failed")
    assert outcome.error.startswith(
        "quality gate failed: the int4 variant drifts from the full-precision model: "
        "token_agreement 0."
    )
    assert outcome.error.endswith(
        "(required >= 1); it is not shipped (compile without quantization, or accept a "
        "looser tolerance)"
    )
    steps = {s["name"]: s for s in outcome.steps}
    assert steps["validate"]["metrics"]["quality_gate"]["passed"] is False
    assert steps["package"]["status"] == "skipped"
    assert tree(store) == []
