"""The engines on the real built-in artifacts (skipped until set-up has built them)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.workers.fakes_support import RecordingSink
from workers.contract import (
    BillingIdentity,
    EmbedRequest,
    GenerateRequest,
    ModelRef,
    SamplingParams,
)
from workers.engine.causal_lm import CausalLMEngine
from workers.engine.encoder import EncoderEngine
from workers.runtime.models import LoadedModel, load_model

pytestmark = pytest.mark.models

STORE = Path(os.environ.get("MANTLE_ARTIFACT_DIR", "~/.cache/mantle/artifacts")).expanduser()
IDENTITY = BillingIdentity("org", "proj", "key", "ep", "mv", "real")


def builtin_ref(name: str, runtime: str) -> ModelRef:
    for index in sorted((STORE / "builtin").glob("*.json")):
        entry = json.loads(index.read_text())
        directory = STORE / entry["sha256"]
        if entry.get("name") == name and (directory / "mantle.json").is_file():
            return ModelRef(f"builtin-{name}", runtime, entry["sha256"], str(directory))
    pytest.skip(f"built-in artifact {name} is not built (run the set-up)")


@pytest.fixture(scope="module")
def smollm() -> LoadedModel:
    return load_model(builtin_ref("smollm2-135m-instruct", "onnx-causal-lm"))


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    return load_model(builtin_ref("all-minilm-l6-v2", "onnx-encoder"))


@pytest.fixture
def lm_engine(smollm: LoadedModel) -> Iterator[CausalLMEngine]:
    engine = CausalLMEngine.from_model(
        smollm, max_batch=8, max_prefill_tokens=4096, redis_client=None
    ).start()
    yield engine
    engine.stop()


def chat_prompt(model: LoadedModel, question: str) -> tuple[int, ...]:
    from jinja2 import Environment

    template = Environment(autoescape=False).from_string(model.manifest["chat_template"])  # noqa: S701
    text = template.render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True
    )
    return tuple(model.tokenizer.encode(text, add_special_tokens=False).ids)


def generate(
    rid: str, prompt: tuple[int, ...], max_tokens: int, **sampling: Any
) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model=ModelRef("x", "onnx-causal-lm", "0" * 64, ""),
        identity=IDENTITY,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
        deadline=time.time() + 300,
    )


def test_france_to_paris(smollm: LoadedModel, lm_engine: CausalLMEngine) -> None:
    sink = RecordingSink()
    prompt = chat_prompt(smollm, "What is the capital of France?")
    result = lm_engine.submit(generate("paris", prompt, 32), sink).wait(120)
    assert result is not None and result.finish_reason == "stop"  # EOS (<|im_end|>)
    assert sink.text("paris") == "The capital of France is Paris."
    assert smollm.provider == "CPUExecutionProvider"


QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea, and make it a long and winding one, please.",
    "2+2=?",
]


def test_batched_greedy_equals_batch_of_one(smollm: LoadedModel, lm_engine: CausalLMEngine) -> None:
    prompts = [chat_prompt(smollm, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: padding matters
    alone = RecordingSink()
    for i, prompt in enumerate(prompts):
        assert lm_engine.submit(generate(f"r{i}", prompt, 20), alone).wait(120) is not None
    together = RecordingSink()
    handles = [
        lm_engine.submit(generate(f"r{i}", prompt, 20), together)
        for i, prompt in enumerate(prompts)
    ]
    # And one that joins while the others are mid-generation (a KV merge).
    time.sleep(0.3)
    late = lm_engine.submit(generate("late", prompts[1], 20), together)
    for h in [*handles, late]:
        assert h.wait(120) is not None
    for i in range(len(prompts)):
        assert together.text(f"r{i}") == alone.text(f"r{i}"), QUESTIONS[i]
        assert together.of(f"r{i}")[-1] == alone.of(f"r{i}")[-1]
    assert together.text("late") == alone.text("r1")


def test_stop_string_and_utf8_on_the_real_tokenizer(
    smollm: LoadedModel, lm_engine: CausalLMEngine
) -> None:
    sink = RecordingSink()
    prompt = chat_prompt(smollm, "What is the capital of France?")
    result = lm_engine.submit(generate("s", prompt, 32, stop=("France",)), sink).wait(120)
    assert result is not None and result.finish_reason == "stop"
    assert sink.text("s") == "The capital of "


def test_embeddings_match_alone_and_rank_meaning(minilm: LoadedModel) -> None:
    engine = EncoderEngine.from_model(minilm, max_batch=32, max_wait_ms=20).start()
    try:
        sentences = [
            "A man is eating food.",
            "Someone is having a meal.",
            "The stock market crashed today.",
        ]
        ids = [tuple(minilm.tokenizer.encode(s).ids) for s in sentences]
        sink = RecordingSink()
        together = engine.submit(
            EmbedRequest(
                "all",
                ModelRef("e", "onnx-encoder", "0" * 64, ""),
                IDENTITY,
                tuple(ids),
                time.time() + 60,
            ),
            sink,
        )
        assert together.wait(60) is not None
        vectors = sink.of("all")[0][1]["vectors"]
        assert vectors.shape == (3, 384)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert vectors[0] @ vectors[1] == pytest.approx(0.69, abs=0.02)
        assert abs(vectors[0] @ vectors[2]) < 0.1
        alone = engine.submit(
            EmbedRequest(
                "one",
                ModelRef("e", "onnx-encoder", "0" * 64, ""),
                IDENTITY,
                (ids[2],),
                time.time() + 60,
            ),
            sink,
        )
        assert alone.wait(60) is not None
        np.testing.assert_allclose(sink.of("one")[0][1]["vectors"][0], vectors[2], atol=1e-5)
    finally:
        engine.stop()
