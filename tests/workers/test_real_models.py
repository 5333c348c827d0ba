"""The engines on the real built-in artifacts (skipped until set-up has built them)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.stack import builtin_manifests
from tests.workers.fakes_support import RecordingSink
from workers.contract import (
    BillingIdentity,
    EmbedRequest,
    GenerateRequest,
    ModelRef,
    SamplingParams,
)
from workers.engine.causal_lm import CausalLMEngine, CausalLMSpec
from workers.engine.encoder import EncoderEngine
from workers.engine.inplace import InPlaceSession, is_in_place
from workers.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from workers.runtime.models import LoadedModel, load_model, unload_model

pytestmark = pytest.mark.models

STORE = Path(os.environ.get("MANTLE_ARTIFACT_DIR", "~/.cache/mantle/artifacts")).expanduser()
IDENTITY = BillingIdentity("org", "proj", "key", "ep", "mv", "real")


def builtin_ref(name: str, runtime: str) -> ModelRef:
    # The current recipe's artifact (an older recipe's may still sit in the store).
    try:
        manifests = builtin_manifests(STORE)
    except RuntimeError:
        manifests = []
    for manifest in manifests:
        directory = STORE / manifest["sha256"]
        if manifest.get("name") == name and (directory / "mantle.json").is_file():
            return ModelRef(f"builtin-{name}", runtime, manifest["sha256"], str(directory))
    pytest.skip(f"built-in artifact {name} is not built (run the set-up)")


@pytest.fixture(scope="module")
def smollm() -> LoadedModel:
    return load_model(builtin_ref("smollm2-135m-instruct", "onnx-causal-lm"))


def load_variant(variant: str) -> LoadedModel:
    """The built-in chat artifact's graph named `variant` (MANTLE_MODEL_VARIANT), loaded."""
    ref = builtin_ref("smollm2-135m-instruct", "onnx-causal-lm")
    previous = os.environ.get("MANTLE_MODEL_VARIANT")
    os.environ["MANTLE_MODEL_VARIANT"] = variant
    try:
        return load_model(dataclasses.replace(ref, version_id=f"{ref.version_id}-{variant}"))
    finally:
        if previous is None:
            del os.environ["MANTLE_MODEL_VARIANT"]
        else:
            os.environ["MANTLE_MODEL_VARIANT"] = previous


@pytest.fixture(scope="module")
def smollm_fp32() -> LoadedModel:
    """The same artifact's full-precision graph (its `fp32` variant).

    The engine's own arithmetic (left padding, KV merges of a request joining mid-generation,
    the log probabilities it reports) is checked on this graph: its kernels give the same
    numbers whatever the batch's shape. The served 4-bit graph's MatMulNBits (accuracy level
    4, int8 activations) does not on every CPU: on an AMD EPYC (2026-12-03) a batch of four
    and a batch of one round differently enough to turn a greedy answer after six tokens
    (docs/decisions.md), a property of the kernel, not of the engine; the 4-bit graph's
    quality is the LM gate's (workers/compile/lm_gate.py)."""
    return load_variant("fp32")


@pytest.fixture(scope="module")
def smollm_w8a8() -> LoadedModel:
    """The batched variant: 8-bit weights and activations (workers/compile/w8a8.py)."""
    return load_variant("w8a8")


def start_engine(model: LoadedModel) -> CausalLMEngine:
    # No prefix cache: these tests compare runs of the same prompts (see the cache's own).
    return CausalLMEngine.from_model(
        model, max_batch=8, max_prefill_tokens=4096, redis_client=None, prefix_cache=PrefixCache(0)
    ).start()


@pytest.fixture
def lm_engine_fp32(smollm_fp32: LoadedModel) -> Iterator[CausalLMEngine]:
    engine = start_engine(smollm_fp32)
    yield engine
    engine.stop()


@pytest.fixture
def lm_engine_w8a8(smollm_w8a8: LoadedModel) -> Iterator[CausalLMEngine]:
    engine = start_engine(smollm_w8a8)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    return load_model(builtin_ref("all-minilm-l6-v2", "onnx-encoder"))


@pytest.fixture
def lm_engine(smollm: LoadedModel) -> Iterator[CausalLMEngine]:
    engine = start_engine(smollm)
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


def assert_batching_changes_no_row(model: LoadedModel, engine: CausalLMEngine) -> RecordingSink:
    """Greedy answers alone, then all together plus one that joins mid-generation (a KV
    merge): each row's text and end the same. The answers alone, for further checks."""
    prompts = [chat_prompt(model, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: padding matters
    alone = RecordingSink()
    for i, prompt in enumerate(prompts):
        assert engine.submit(generate(f"r{i}", prompt, 20), alone).wait(120) is not None
    together = RecordingSink()
    handles = [
        engine.submit(generate(f"r{i}", prompt, 20), together) for i, prompt in enumerate(prompts)
    ]
    time.sleep(0.3)
    late = engine.submit(generate("late", prompts[1], 20), together)
    for h in [*handles, late]:
        assert h.wait(120) is not None
    for i in range(len(prompts)):
        assert together.text(f"r{i}") == alone.text(f"r{i}"), QUESTIONS[i]
        assert together.of(f"r{i}")[-1] == alone.of(f"r{i}")[-1]
    assert together.text("late") == alone.text("r1")
    return alone


def test_batched_greedy_equals_batch_of_one(
    smollm_fp32: LoadedModel, lm_engine_fp32: CausalLMEngine
) -> None:
    assert_batching_changes_no_row(smollm_fp32, lm_engine_fp32)


def test_the_w8a8_variant_answers_and_batches_without_changing_a_row(
    smollm_w8a8: LoadedModel, lm_engine_w8a8: CausalLMEngine
) -> None:
    # Integer GEMMs with one activation scale per row: a row's tokens are the same alone
    # and in any batch, the engine's merges and a late joiner included (the 4-bit
    # kernel's per-block rounding does not promise this on every CPU; the fixture above).
    ops = {n.op_type for n in _graph_ops(smollm_w8a8)}
    assert "MatMulIntegerToFloat" in ops and "MatMulNBits" not in ops
    alone = assert_batching_changes_no_row(smollm_w8a8, lm_engine_w8a8)
    assert "Paris" in alone.text("r0")


def _graph_ops(model: LoadedModel) -> list[Any]:
    import onnx

    path = model.directory / model.manifest["variants"]["w8a8"]["model_file"]
    return list(onnx.load_model(str(path), load_external_data=False).graph.node)


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


# --- issue 15 on the real model: logprobs, prompt scoring, grammars, n ------------------------


def last_logits(model: LoadedModel, ids: Sequence[int]) -> np.ndarray:
    """The model's next-token logits after `ids`, from one forward pass of its own (no batch,
    no cache reuse): the independent reference for the engine's numbers."""
    spec = CausalLMSpec.from_manifest(model.manifest)
    n = len(ids)
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, n), dtype=np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None, :],
    }
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=np.float32)
    for i in range(spec.num_layers):
        feeds[f"past_key_values.{i}.key"] = empty
        feeds[f"past_key_values.{i}.value"] = empty
    names = ["logits"] + [
        f"present.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")
    ]
    logits: np.ndarray = model.session.run(names, feeds)[0][0, -1].astype(np.float64)
    return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())


def test_logprobs_match_separate_forward_passes(
    smollm_fp32: LoadedModel, lm_engine_fp32: CausalLMEngine
) -> None:
    sink = RecordingSink()
    prompt = chat_prompt(smollm_fp32, "What is the capital of France?")
    result = lm_engine_fp32.submit(generate("lp", prompt, 6, logprobs=5), sink).wait(120)
    assert result is not None and result.completion_tokens == 6
    entries = [e for kind, f in sink.of("lp") if kind == "delta" for e in f["logprobs"]]
    generated = smollm_fp32.text_tokenizer().encode(sink.text("lp"), add_special_tokens=False).ids
    assert len(entries) == 6
    ids = list(prompt)
    for text, raw, logprob, top in entries:
        reference = last_logits(smollm_fp32, ids)
        token = int(np.argmax(reference))  # greedy
        assert bytes(raw) == lm_engine_fp32.constrainer.token(token)[1]
        assert text == bytes(raw).decode("utf-8", errors="replace")
        assert logprob == pytest.approx(reference[token], abs=2e-3)
        expected_top = np.argsort(-reference)[:5]
        assert [bytes(b) for _, b, _ in top] == [
            lm_engine_fp32.constrainer.token(int(t))[1] for t in expected_top
        ]
        assert [lp for _, _, lp in top] == pytest.approx(list(reference[expected_top]), abs=2e-3)
        ids.append(token)
    assert ids[len(prompt) :][: len(generated)] == generated


def test_prompt_logprobs_match_separate_forward_passes(
    smollm_fp32: LoadedModel, lm_engine_fp32: CausalLMEngine
) -> None:
    prompt = tuple(smollm_fp32.text_tokenizer().encode("The capital of France is Paris.").ids)
    sink = RecordingSink()
    result = lm_engine_fp32.submit(generate("echo", prompt, 3, prompt_logprobs=2), sink).wait(120)
    assert result is not None and (result.prompt_tokens, result.completion_tokens) == (
        len(prompt),
        3,
    )
    kind, fields = sink.of("echo")[0]
    assert kind == "prompt_logprobs"
    scored = fields["logprobs"]
    assert scored[0] is None and len(scored) == len(prompt)
    for j in range(1, len(prompt)):
        reference = last_logits(smollm_fp32, prompt[:j])
        _, raw, logprob, top = scored[j]
        assert bytes(raw) == lm_engine_fp32.constrainer.token(prompt[j])[1]
        assert logprob == pytest.approx(reference[prompt[j]], abs=2e-3), j
        assert [lp for _, _, lp in top] == pytest.approx(
            sorted(reference, reverse=True)[:2], abs=2e-3
        )
    # What follows the scored prompt is what the model says after it unscored.
    plain = RecordingSink()
    assert lm_engine_fp32.submit(generate("plain", prompt, 3), plain).wait(120) is not None
    assert sink.text("echo") == plain.text("plain")


PERSON = {
    "type": "object",
    "properties": {
        # Bounded strings: greedy decoding of a 135M model can loop inside a free string
        # ("John Smith Jr. Jr. Jr. ..." on one CPU's int4 kernels) until max_tokens; the
        # grammar closes a bounded one, which is what is tested.
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "height_m": {"type": "number"},
        "is_student": {"type": "boolean"},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "height_m", "is_student", "hobbies"],
    "additionalProperties": False,
}


def test_a_json_schema_grammar_gives_valid_json_from_a_small_model(
    smollm: LoadedModel, lm_engine: CausalLMEngine
) -> None:
    from workers.grammar import json_grammar

    prompt = chat_prompt(smollm, "Describe a made-up person as JSON.")
    sink = RecordingSink()
    handles = [
        lm_engine.submit(generate("greedy", prompt, 200, grammar=json_grammar(PERSON)), sink),
        lm_engine.submit(
            dataclasses.replace(
                generate("sampled", prompt, 200),
                sampling=SamplingParams(
                    max_tokens=200, temperature=1.0, seed=5, n=2, grammar=json_grammar(PERSON)
                ),
            ),
            sink,
        ),
    ]
    results = [h.wait(300) for h in handles]
    texts = [sink.text("greedy"), sink.text("sampled", index=0), sink.text("sampled", index=1)]
    assert results[0] is not None and results[0].finish_reason == "stop", texts[0]
    for text in texts:
        person = json.loads(text)
        assert set(person) == set(PERSON["properties"])  # type: ignore[arg-type]
        assert isinstance(person["name"], str) and len(person["name"]) <= 40
        assert all(len(hobby) <= 40 for hobby in person["hobbies"])
        assert isinstance(person["age"], int) and not isinstance(person["age"], bool)
        assert isinstance(person["height_m"], int | float)
        assert isinstance(person["is_student"], bool)
        assert isinstance(person["hobbies"], list) and len(person["hobbies"]) <= 3
        assert all(isinstance(h, str) for h in person["hobbies"])


def test_a_forced_tool_call_parses(smollm: LoadedModel, lm_engine: CausalLMEngine) -> None:
    from workers.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tool_call_grammar

    weather = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        # Without it the grammar lets a 135M model add properties until max_tokens.
        "additionalProperties": False,
    }
    no_arguments = {"type": "object", "properties": {}, "additionalProperties": False}
    grammar = tool_call_grammar(
        [("get_weather", weather), ("get_time", no_arguments)], parallel=False
    )
    prompt = chat_prompt(smollm, "What is the weather in Paris?")
    sink = RecordingSink()
    result = lm_engine.submit(generate("tool", prompt, 120, grammar=grammar), sink).wait(300)
    assert result is not None and result.finish_reason == "stop"
    text = sink.text("tool")
    assert text.startswith(TOOL_CALL_OPEN + "\n") and text.endswith("\n" + TOOL_CALL_CLOSE)
    call = json.loads(text[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)])
    assert call["name"] in {"get_weather", "get_time"}
    if call["name"] == "get_weather":
        assert isinstance(call["arguments"]["city"], str)
        assert call["arguments"]["unit"] in {"celsius", "fahrenheit"}


def test_n_greedy_choices_equal_one_choice_on_the_real_model(
    smollm_fp32: LoadedModel, lm_engine_fp32: CausalLMEngine
) -> None:
    """The engine's arithmetic (n rows of one prompt), on the fp32 variant: the 4-bit
    graph's rounding depends on the batch's composition on some CPUs (docs/decisions.md)."""
    prompt = chat_prompt(smollm_fp32, "Name three colours.")
    sink = RecordingSink()
    one = lm_engine_fp32.submit(generate("one", prompt, 16), sink)
    three = lm_engine_fp32.submit(generate("three", prompt, 16, n=3), sink)
    alone, together = one.wait(120), three.wait(120)
    assert alone is not None and together is not None
    assert together.completion_tokens == 3 * alone.completion_tokens
    for i in range(3):
        assert sink.text("three", index=i) == sink.text("one"), i


SUPPORT = (
    "You are the support assistant of a cloud platform that serves language models to "
    "companies. Answer briefly and politely, never invent prices, and send questions "
    "about a charge to the billing team. "
) * 3


def support_prompt(model: LoadedModel, question: str) -> tuple[int, ...]:
    from jinja2 import Environment

    template = Environment(autoescape=False).from_string(model.manifest["chat_template"])  # noqa: S701
    text = template.render(
        messages=[{"role": "system", "content": SUPPORT}, {"role": "user", "content": question}],
        add_generation_prompt=True,
    )
    return tuple(model.tokenizer.encode(text, add_special_tokens=False).ids)


def test_greedy_answers_from_cached_blocks_equal_a_full_prefill(
    smollm: LoadedModel, lm_engine: CausalLMEngine
) -> None:
    cached = CausalLMEngine.from_model(
        smollm,
        max_batch=8,
        max_prefill_tokens=4096,
        redis_client=None,
        prefix_cache=PrefixCache(64 * 1024 * 1024),
    ).start()
    try:
        prompts = [support_prompt(smollm, q) for q in QUESTIONS]
        assert len(prompts[0]) > 3 * BLOCK_TOKENS
        full = RecordingSink()
        for i, prompt in enumerate(prompts):
            assert lm_engine.submit(generate(f"r{i}", prompt, 24), full).wait(120) is not None
        sink = RecordingSink()
        hits = []
        for i, prompt in enumerate([*prompts, *prompts]):  # cold, then every prompt again
            result = cached.submit(generate(f"c{i}", prompt, 24), sink).wait(120)
            assert result is not None
            hits.append(result.cached_tokens)
            assert sink.text(f"c{i}") == full.text(f"r{i % len(prompts)}"), (i, result)
        assert hits[0] == 0 and all(h >= 3 * BLOCK_TOKENS for h in hits[1:])
        assert hits[len(prompts)] == (len(prompts[0]) - 2) // BLOCK_TOKENS * BLOCK_TOKENS
    finally:
        cached.stop()


class ShapeRecorder:
    """The real session, with the (batch, seq, past) of every call recorded: through the
    traced interface (`run`), or the in-place one (`run_in_place`, the served graph's; the
    past is then the first row's length before the call, from its `seqlens_k`)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.calls: list[tuple[int, int, int]] = []
        if is_in_place(session):
            inner = InPlaceSession(session)

            def run_in_place(
                feeds: dict[str, np.ndarray], kv: Sequence[np.ndarray], run_options: Any = None
            ) -> np.ndarray:
                batch, seq = feeds["input_ids"].shape
                self.calls.append((batch, seq, int(feeds["seqlens_k"][0]) + 1 - seq))
                return inner.run_in_place(feeds, kv, run_options)

            self.run_in_place = run_in_place

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> Any:
        batch, seq = feeds["input_ids"].shape
        self.calls.append((batch, seq, feeds["past_key_values.0.key"].shape[2]))
        return self.session.run(names, feeds)


def test_a_long_prompt_chunked_beside_a_stream_answers_as_alone(
    smollm: LoadedModel, lm_engine: CausalLMEngine
) -> None:
    long_prompt = support_prompt(smollm, "Summarise your instructions. " * 40)
    alone = RecordingSink()
    assert lm_engine.submit(generate("alone", long_prompt, 16), alone).wait(300) is not None
    recorder = ShapeRecorder(smollm.session)
    engine = CausalLMEngine(
        recorder,
        CausalLMSpec.from_manifest(smollm.manifest),
        lambda ids: smollm.tokenizer.decode(list(ids), skip_special_tokens=True),
        max_batch=8,
    ).start()
    try:
        sink = RecordingSink()
        stream = engine.submit(
            generate("stream", chat_prompt(smollm, "Count to fifty."), 300), sink
        )
        while sink.count("stream", "delta") < 3:
            time.sleep(0.01)
        result = engine.submit(generate("long", long_prompt, 16), sink).wait(300)
        assert result is not None and stream.wait(300) is not None
    finally:
        engine.stop()
    assert sink.text("long") == alone.text("alone")
    # It went in chunks, each after the past of the ones before, with decode steps between.
    chunks = [(seq, past) for b, seq, past in recorder.calls[1:] if b == 1 and seq > 1]
    assert len(chunks) > 1 and sum(seq for seq, _ in chunks) == len(long_prompt)
    assert [past for _, past in chunks] == [
        sum(s for s, _ in chunks[:i]) for i in range(len(chunks))
    ]


def test_an_online_request_beside_a_full_engine_of_batch_lines(smollm: LoadedModel) -> None:
    """Issue 17: batch lines fill the engine; an online request goes beside them at once
    (over max_batch), its prompt in one call of its own, and gets its answer."""
    recorder = ShapeRecorder(smollm.session)
    engine = CausalLMEngine(
        recorder,
        CausalLMSpec.from_manifest(smollm.manifest),
        lambda ids: smollm.tokenizer.decode(list(ids), skip_special_tokens=True),
        max_batch=4,
    ).start()
    never_stop = tuple((int(e), -100.0) for e in smollm.manifest["eos_token_ids"])
    sink = RecordingSink()
    try:
        lines = [
            engine.submit(
                dataclasses.replace(
                    generate(f"line-{i}", chat_prompt(smollm, q), 2000, logit_bias=never_stop),
                    service_class="batch",
                ),
                sink,
            )
            for i, q in enumerate([*QUESTIONS[1:], "Tell me about the sea."])
        ]
        while not all(sink.count(f"line-{i}", "delta") for i in range(len(lines))):
            time.sleep(0.01)
        prompt = chat_prompt(smollm, "What is the capital of France?")
        result = engine.submit(generate("paris", prompt, 32), sink).wait(120)
        assert result is not None and result.finish_reason == "stop"
        assert not any(h.claimed for h in lines)  # every line still running
    finally:
        engine.stop()
    # (batched rows differ from batch 1 by float rounding: under load this greedy answer has
    # been seen to go on with ", France." here as in test_batched_greedy_equals_batch_of_one)
    assert sink.text("paris").startswith("The capital of France is Paris")
    assert (1, len(prompt), 0) in recorder.calls  # the whole prompt, alone, in one call
    assert max(b for b, seq, _ in recorder.calls if seq == 1) == 5  # a row over max_batch


@pytest.fixture(scope="module")
def smollm_adaptive() -> Iterator[LoadedModel]:
    """The served 4-bit graph with a one-thread session beside the two-thread one
    (MANTLE_ORT_ADAPTIVE_THREADS, for a node whose cores other processes share); unloaded
    after the module (two more sessions would stay resident for the rest of the run)."""
    ref = builtin_ref("smollm2-135m-instruct", "onnx-causal-lm")
    version = f"{ref.version_id}-adaptive"
    saved = {k: os.environ.get(k) for k in ("MANTLE_ORT_ADAPTIVE_THREADS", "MANTLE_ORT_THREADS")}
    os.environ.update(MANTLE_ORT_ADAPTIVE_THREADS="1", MANTLE_ORT_THREADS="2")
    try:
        model = load_model(dataclasses.replace(ref, version_id=version))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield model
    unload_model(version)


def test_one_thread_and_two_compute_the_same_logits_to_the_bit(
    smollm_adaptive: LoadedModel,
) -> None:
    """What lets a worker swap sessions call by call: the kernels split a call's work
    across threads without changing its sums (prompts of three lengths, then decode
    steps, on the served 4-bit graph)."""
    from workers.engine.inplace import feeds_for

    assert smollm_adaptive.narrow_session is not None
    runners = [
        InPlaceSession(smollm_adaptive.session),
        InPlaceSession(smollm_adaptive.narrow_session),
    ]
    spec = CausalLMSpec.from_manifest(smollm_adaptive.manifest)
    prompts = [chat_prompt(smollm_adaptive, q) for q in QUESTIONS]
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), spec.pad_token_id, np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    lens = np.array([len(p) for p in prompts])
    results = []
    for runner in runners:
        kv = [
            np.zeros((len(prompts), spec.num_kv_heads, longest + 16, spec.head_dim), np.float32)
            for _ in runner.past_names
        ]
        logits = [runner.run_in_place(feeds_for(ids, lens, lens - 1), kv)]
        for step in range(8):
            nxt = np.argmax(logits[-1][:, -1], axis=-1)[:, None]
            logits.append(
                runner.run_in_place(
                    feeds_for(nxt, lens + step + 1, np.zeros(len(lens), np.int64)), kv
                )
            )
        results.append(np.stack(logits))
    assert np.array_equal(results[0], results[1])


def test_a_contended_node_runs_calls_on_one_thread_and_answers_the_same(
    smollm_adaptive: LoadedModel,
) -> None:
    from workers.engine.inplace import AdaptiveInPlaceSession
    from workers.runtime.contention import CpuContention, SessionThreads, thread_ids

    engine = start_engine(smollm_adaptive)
    try:
        session = engine._session
        assert isinstance(session, AdaptiveInPlaceSession)
        # from_model wired the node's counters, for the threads the wide session has.
        watch = session.contended.__self__  # type: ignore[attr-defined]
        assert isinstance(watch, CpuContention) and watch.threads == min(2, watch.cores)
        # The wide session's pool (one thread beside the caller, found when it was made, and
        # alive) is what counts as the session's own; the rest of the process crowds it.
        assert len(smollm_adaptive.session_threads) == 1
        assert smollm_adaptive.session_threads <= thread_ids()
        assert isinstance(watch._process, SessionThreads)
        assert watch._process.tids >= smollm_adaptive.session_threads
        prompts = [chat_prompt(smollm_adaptive, q) for q in QUESTIONS]
        answers = []
        for contended in (True, False):
            session.contended = lambda c=contended: c
            calls = (session.narrow_calls, session.wide_calls)
            sink = RecordingSink()
            handles = [engine.submit(generate(f"r{i}", p, 16), sink) for i, p in enumerate(prompts)]
            for h in handles:
                assert h.wait(120) is not None
            narrow, wide = session.narrow_calls - calls[0], session.wide_calls - calls[1]
            assert (narrow > 0, wide > 0) == (contended, not contended)
            answers.append([sink.text(f"r{i}") for i in range(len(prompts))])
        assert answers[0] == answers[1]
        assert "Paris" in answers[0][0]
        # What the worker's /metrics reads (mantle_worker_cpu_crowding_cores).
        assert session.monitor is watch
        assert engine.cpu_crowding() == watch.others
    finally:
        engine.stop()


def test_a_prompt_one_token_past_a_block_boundary_answers_the_same_from_the_cache(
    smollm: LoadedModel,
) -> None:
    """ONNX Runtime computes a one-token call on another kernel path (different logits),
    so the cache must never leave one token to compute: a prompt of whole blocks plus one
    token gives the same greedy answer cold and from the cache."""
    base = list(chat_prompt(smollm, "What is the weather like in Paris today? Say it at length."))
    filler = [t for t in chat_prompt(smollm, "Paris and the weather.") if t not in base[-3:]]
    prompt = base
    while len(prompt) % BLOCK_TOKENS != 1:  # k whole blocks and one token
        prompt = [*prompt[:1], filler[len(prompt) % len(filler)], *prompt[1:]]
    cache = PrefixCache(64 * 1024 * 1024)
    assert cache.cacheable_blocks(len(prompt)) * BLOCK_TOKENS <= len(prompt) - 2
    engine = CausalLMEngine.from_model(
        smollm, max_batch=8, max_prefill_tokens=4096, redis_client=None, prefix_cache=cache
    ).start()
    try:
        sink = RecordingSink()
        for rid in ("cold", "warm"):
            assert engine.submit(generate(rid, tuple(prompt), 24), sink).wait(120) is not None
        assert cache.hits > 0  # the warm run came from the cache
        assert sink.text("warm") == sink.text("cold")
    finally:
        engine.stop()
