"""Continuous batching over a numpy stand-in for the model (see fakes_support.FakeCausalLM)."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import llguidance
import numpy as np
import pytest

from tests.workers.fakes_support import (
    VOCAB,
    FakeCausalLM,
    FakeInPlaceCausalLM,
    RecordingSink,
    decode,
    encode,
    fake_grammar_compiler,
    next_token,
    reference,
    spec,
)
from workers.contract import (
    BillingIdentity,
    GenerateRequest,
    ModelRef,
    SamplingParams,
    cancel_key,
)
from workers.engine.causal_lm import CausalLMEngine, CausalLMSpec
from workers.engine.sampling import sample_token

IDENTITY = BillingIdentity("org", "proj", "key", "ep", "mv", "fake")
MODEL = ModelRef("mv", "onnx-causal-lm", "0" * 64, "/nonexistent")


def request(
    rid: str,
    prompt: Sequence[int],
    max_tokens: int = 8,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    deadline: float | None = None,
    service_class: str = "online",
    org: str = "org",
    enqueued_at: float = 0.0,
) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model=MODEL,
        identity=replace(IDENTITY, organization_id=org),
        prompt_token_ids=tuple(prompt),
        sampling=SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=seed, stop=stop
        ),
        deadline=time.time() + 60 if deadline is None else deadline,
        service_class=service_class,
        enqueued_at=enqueued_at or time.time(),
    )


@pytest.fixture(params=["padded", "in-place"])
def make_engine(request: pytest.FixtureRequest) -> Iterator[Callable[..., CausalLMEngine]]:
    """Engines over the traced graph's cache layout (left-padded, presents copied out) and
    over an in-place graph's (right-padded buffers the engine owns): every test that does
    not bring its own session runs against both."""
    engines: list[CausalLMEngine] = []
    layout = FakeInPlaceCausalLM if request.param == "in-place" else FakeCausalLM

    def make(
        session: FakeCausalLM | None = None,
        model_spec: CausalLMSpec | None = None,
        **kwargs: object,
    ) -> CausalLMEngine:
        engine = CausalLMEngine(
            session or layout(),
            model_spec or spec(),
            decode,
            **kwargs,  # type: ignore[arg-type]
        ).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.001)


PROMPTS = [[5, 9, 3], [1] * 17, [7, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38], [11]]


def test_single_request_matches_batch_one_reference(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = make_engine()
    sink = RecordingSink()
    result = engine.submit(request("r1", [5, 9, 3], max_tokens=12), sink).wait(10)
    assert result is not None
    assert sink.text("r1") == decode(reference([5, 9, 3], 12))
    assert sink.of("r1")[-1] == (
        "done",
        {"finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 12},
    )
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        "length",
        3,
        12,
    )


def test_prompts_of_different_lengths_batched_together_match_batch_one(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    # Given a slow model, so that everything submitted lands in one prefill
    session = FakeCausalLM(delay_s=0.002)
    engine = make_engine(session)
    sink = RecordingSink()
    max_tokens = [12, 5, 20, 9, 15]  # different lengths: rows leave the batch at different steps
    # When
    handles = [
        engine.submit(request(f"r{i}", p, m), sink)
        for i, (p, m) in enumerate(zip(PROMPTS, max_tokens, strict=True))
    ]
    results = [h.wait(10) for h in handles]
    # Then every row decoded exactly as it would have alone
    for i, (prompt, m) in enumerate(zip(PROMPTS, max_tokens, strict=True)):
        assert sink.text(f"r{i}") == decode(reference(prompt, m)), i
        assert results[i] is not None and results[i].completion_tokens == m
    assert max(b for b, _, _ in session.calls) == 5


def test_staggered_arrivals_merge_and_leave_without_changing_tokens(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.001)
    engine = make_engine(session)
    sink = RecordingSink()
    handles = []
    for i, prompt in enumerate(PROMPTS * 2):
        handles.append(engine.submit(request(f"r{i}", prompt, 6 + 3 * i), sink))
        time.sleep(0.004)  # arrive while others are mid-generation
    for h in handles:
        assert h.wait(10) is not None
    for i, prompt in enumerate(PROMPTS * 2):
        assert sink.text(f"r{i}") == decode(reference(prompt, 6 + 3 * i)), i
    # The batch grew past one row (merges happened) and shrank (rows left).
    sizes = [b for b, s, _ in session.calls if s == 1]
    assert max(sizes) > 1 and sizes[-1] == 1


def test_a_request_joins_a_running_batch_without_waiting_for_it(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = make_engine(FakeCausalLM(delay_s=0.002))
    sink = RecordingSink()
    long = engine.submit(request("long", [3, 4], max_tokens=60), sink)
    wait_until(lambda: sink.count("long", "delta") >= 5)
    short = engine.submit(request("short", [8, 8, 8, 8], max_tokens=3), sink)
    short_result = short.wait(10)
    long_result = long.wait(10)
    assert short_result is not None and long_result is not None
    assert long_result.admitted_step < short_result.admitted_step
    assert short_result.finished_step < long_result.finished_step
    assert sink.text("long") == decode(reference([3, 4], 60))
    assert sink.text("short") == decode(reference([8, 8, 8, 8], 3))


def test_finished_rows_are_sliced_out_and_padding_columns_trimmed(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.002)
    engine = make_engine(session)
    sink = RecordingSink()
    # A short prompt that goes on, joined by a long one that finishes first.
    small = engine.submit(request("small", [6], max_tokens=30), sink)
    wait_until(lambda: sink.count("small", "delta") >= 1)
    long_prompt = engine.submit(request("big", [2] * 40, max_tokens=2), sink)
    assert long_prompt.wait(10) is not None and small.wait(10) is not None
    decode_calls = [(b, past) for b, s, past in session.calls if s == 1]
    # While both run, the cache is as wide as the long prompt; once it left,
    # the short row's cache is only its own length.
    assert any(b == 2 and past >= 40 for b, past in decode_calls)
    assert decode_calls[-1] == (1, 1 + 29 - 1)
    assert sink.text("small") == decode(reference([6], 30))


def test_max_batch_holds_the_rest_in_the_queue(make_engine: Callable[..., CausalLMEngine]) -> None:
    session = FakeCausalLM(delay_s=0.001)
    engine = make_engine(session, max_batch=2)
    sink = RecordingSink()
    handles = [engine.submit(request(f"r{i}", PROMPTS[i], 5), sink) for i in range(5)]
    for h in handles:
        assert h.wait(10) is not None
    assert max(b for b, _, _ in session.calls) == 2
    for i in range(5):
        assert sink.text(f"r{i}") == decode(reference(PROMPTS[i], 5))


def test_prefill_size_is_bounded(make_engine: Callable[..., CausalLMEngine]) -> None:
    session = FakeCausalLM(delay_s=0.001)
    engine = make_engine(session, max_prefill_tokens=20)
    sink = RecordingSink()
    handles = [engine.submit(request(f"r{i}", [4] * 10, 3), sink) for i in range(4)]
    for h in handles:
        assert h.wait(10) is not None
    prefills = [b * s for b, s, _ in session.calls if s > 1]
    assert prefills and max(prefills) <= 20


def test_eos_finishes_with_stop_and_is_counted(make_engine: Callable[..., CausalLMEngine]) -> None:
    expected = reference([5, 9, 3], 10)
    eos = expected[3]
    first = expected.index(eos)
    engine = make_engine(model_spec=spec(eos=(eos,)))
    sink = RecordingSink()
    result = engine.submit(request("r", [5, 9, 3], 10), sink).wait(10)
    assert result is not None
    assert sink.text("r") == decode(expected[:first])  # the EOS token has no text
    assert (result.finish_reason, result.completion_tokens) == ("stop", first + 1)
    # The result went with the final event (what the worker's writer bills in one write).
    assert sink.results["r"] is result


def test_stop_string_is_cut_and_never_emitted(make_engine: Callable[..., CausalLMEngine]) -> None:
    full = decode(reference([5, 9, 3], 16))
    stop = full[6:9]
    cut = full.index(stop)
    engine = make_engine()
    sink = RecordingSink()
    result = engine.submit(request("r", [5, 9, 3], 16, stop=(stop,)), sink).wait(10)
    assert result is not None
    assert sink.text("r") == full[:cut]
    assert result.finish_reason == "stop"
    assert result.completion_tokens == cut + len(stop)  # tokens up to the one completing the stop


def test_context_length_ends_with_length(make_engine: Callable[..., CausalLMEngine]) -> None:
    engine = make_engine(model_spec=spec(context_length=10))
    sink = RecordingSink()
    result = engine.submit(request("r", [1, 2, 3, 4], 100), sink).wait(10)
    assert result is not None
    assert (result.finish_reason, result.completion_tokens) == ("length", 6)


@pytest.mark.parametrize(
    ("prompt", "max_tokens"), [([], 5), ([1] * 4096, 5), ([1, 2], 0), ([1, 999], 5)]
)
def test_invalid_requests_get_an_error_without_running(
    make_engine: Callable[..., CausalLMEngine], prompt: list[int], max_tokens: int
) -> None:
    session = FakeCausalLM()
    engine = make_engine(session)
    sink = RecordingSink()
    result = engine.submit(request("bad", prompt, max_tokens), sink).wait(1)
    assert result is not None and result.finish_reason == "error" and not result.ran
    assert [k for k, _ in sink.of("bad")] == ["error"]
    assert sink.results["bad"] is result
    assert session.calls == []


def test_seeded_sampling_is_reproducible_across_batch_neighbours(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = make_engine(FakeCausalLM(delay_s=0.001))
    sink = RecordingSink()
    alone = engine.submit(request("a", [5, 5], 20, temperature=1.0, seed=42), sink)
    assert alone.wait(10) is not None
    crowd = [
        engine.submit(request(f"n{i}", PROMPTS[i], 20, temperature=1.0), sink) for i in range(3)
    ]
    again = engine.submit(request("b", [5, 5], 20, temperature=1.0, seed=42), sink)
    other = engine.submit(request("c", [5, 5], 20, temperature=1.0, seed=43), sink)
    for h in [*crowd, again, other]:
        assert h.wait(10) is not None
    assert sink.text("a") == sink.text("b")
    assert sink.text("a") != sink.text("c")
    assert sink.text("a") != decode(reference([5, 5], 20))  # it did sample


def test_cancellation_frees_the_slot(
    make_engine: Callable[..., CausalLMEngine], redis_client: object
) -> None:
    engine = make_engine(
        FakeCausalLM(delay_s=0.002),
        max_batch=1,
        redis_client=redis_client,
        cancel_check_interval_s=0.01,
    )
    sink = RecordingSink()
    runaway = engine.submit(request("runaway", [1, 2], 100_000), sink)
    queued = engine.submit(request("queued", [3, 4], 4), sink)
    wait_until(lambda: sink.count("runaway", "delta") >= 3)
    assert engine.running == 1 and engine.waiting == 1 and engine.free_slots == 0
    redis_client.set(cancel_key("runaway"), "1")  # type: ignore[attr-defined]
    cancelled = runaway.wait(10)
    served = queued.wait(10)
    assert cancelled is not None and served is not None
    assert cancelled.finish_reason == "cancelled"
    assert 3 <= cancelled.completion_tokens < 1000
    assert sink.of("runaway")[-1][1]["finish_reason"] == "cancelled"
    assert served.finish_reason == "length"
    assert served.admitted_step > cancelled.finished_step - 1
    assert sink.text("queued") == decode(reference([3, 4], 4))
    wait_until(lambda: engine.free_slots == 1)


def test_deadline_drops_a_running_request(make_engine: Callable[..., CausalLMEngine]) -> None:
    engine = make_engine(FakeCausalLM(delay_s=0.002), cancel_check_interval_s=0.01)
    sink = RecordingSink()
    result = engine.submit(request("late", [1, 2], 100_000, deadline=time.time() + 0.1), sink).wait(
        10
    )
    assert result is not None
    assert (result.finish_reason, result.error_code) == ("error", "deadline_exceeded")
    assert result.completion_tokens > 0
    assert sink.of("late")[-1][0] == "error"
    assert sink.count("late", "done") == 0


def test_model_failure_fails_the_batch_and_the_engine_keeps_serving() -> None:
    session = FakeCausalLM(delay_s=0.002, fail_on_call=6)
    # All three queued before the engine's thread starts: they are one batch when the 6th
    # call fails, however slowly this thread is scheduled.
    engine = CausalLMEngine(session, spec(), decode)
    try:
        _model_failure(engine)
    finally:
        engine.stop()


def _model_failure(engine: CausalLMEngine) -> None:
    sink = RecordingSink()
    handles = [engine.submit(request(f"r{i}", PROMPTS[i], 50), sink) for i in range(3)]
    engine.start()
    results = [h.wait(10) for h in handles]
    for i, result in enumerate(results):
        assert result is not None and result.finish_reason == "error", i
        assert sink.of(f"r{i}")[-1][0] == "error"
        assert sink.count(f"r{i}", "done") == 0
    after = engine.submit(request("after", [9], 4), sink).wait(10)
    assert after is not None and after.finish_reason == "length"
    assert sink.text("after") == decode(reference([9], 4))


def test_prefill_failure_fails_only_the_newcomers(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.002, fail_on_call=0)
    engine = make_engine(session)
    sink = RecordingSink()
    first = engine.submit(request("first", [1], 3), sink).wait(10)
    assert first is not None and first.error_code == "internal_error" and not first.ran
    second = engine.submit(request("second", [1], 3), sink).wait(10)
    assert second is not None and second.finish_reason == "length"


def test_abandoned_request_is_dropped_silently(make_engine: Callable[..., CausalLMEngine]) -> None:
    engine = make_engine(FakeCausalLM(delay_s=0.002), cancel_check_interval_s=0.01)
    sink = RecordingSink()
    handle = engine.submit(request("gone", [1, 2], 100_000), sink)
    wait_until(lambda: sink.count("gone", "delta") >= 2)
    assert handle.claim()  # what a task does when it stops waiting
    wait_until(lambda: engine.running == 0)
    assert sink.count("gone", "done") == 0 and sink.count("gone", "error") == 0


def test_one_flush_per_step_for_the_whole_batch(make_engine: Callable[..., CausalLMEngine]) -> None:
    session = FakeCausalLM(delay_s=0.003)
    engine = make_engine(session)
    sink = RecordingSink()
    handles = [engine.submit(request(f"r{i}", [i + 1], 10), sink) for i in range(4)]
    for h in handles:
        assert h.wait(10) is not None
    assert sink.flushes <= len(session.calls)
    assert engine.tokens_per_s() > 0


def test_multibyte_text_through_the_engine(make_engine: Callable[..., CausalLMEngine]) -> None:
    # A decode in which two consecutive ids make one character, the first of
    # them alone a replacement char, like byte-level BPE.
    def pair_decode(ids: Sequence[int]) -> str:
        out = []
        for i in range(0, len(ids) - 1, 2):
            out.append(chr(0x4E00 + ids[i] * 64 + ids[i + 1]))
        if len(ids) % 2:
            out.append("\ufffd")
        return "".join(out)

    engine = CausalLMEngine(FakeCausalLM(), spec(), pair_decode).start()
    try:
        sink = RecordingSink()
        result = engine.submit(request("r", [5, 9, 3], 10), sink).wait(10)
        assert result is not None
        deltas = [f["text"] for k, f in sink.of("r") if k == "delta"]
        assert "".join(deltas) == pair_decode(reference([5, 9, 3], 10))
        assert all("\ufffd" not in d for d in deltas)
        assert sum(f["tokens"] for k, f in sink.of("r") if k == "delta") == 10
    finally:
        engine.stop()


def test_encode_helper_roundtrip() -> None:
    assert encode(decode([0, 5, 63])) == [0, 5, 63]


def penalized_reference(
    prompt: Sequence[int], max_tokens: int, frequency: float, presence: float
) -> list[int]:
    """Greedy decoding of the fake model (its one winning logit is 5.0, the rest 0) with
    OpenAI's penalties on the tokens generated so far."""
    seq, out = list(prompt), []
    counts: dict[int, int] = {}
    for _ in range(max_tokens):
        scores = [0.0] * VOCAB
        scores[next_token(seq)] = 5.0
        for token, n in counts.items():
            scores[token] -= n * frequency + presence
        token = max(range(VOCAB), key=lambda t: (scores[t], -t))  # argmax, first on ties
        out.append(token)
        seq.append(token)
        counts[token] = counts.get(token, 0) + 1
        if token == 0:
            break
    return out


def test_penalties_change_greedy_decoding_as_openai_defines_them(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = make_engine()
    prompt = [5, 9, 2]
    plain = reference(prompt, 24, eos=0)
    penalized = penalized_reference(prompt, 24, frequency=3.0, presence=0.0)
    assert penalized != plain  # the case really exercises the penalty
    sink = RecordingSink()
    handles = []
    for rid, frequency in (("plain", 0.0), ("penalized", 3.0)):
        sampling = SamplingParams(
            max_tokens=24, temperature=0.0, top_p=1.0, frequency_penalty=frequency
        )
        handles.append(engine.submit(replace(request(rid, prompt, 24), sampling=sampling), sink))
    assert all(h.wait(10) is not None for h in handles)
    assert sink.text("plain") == decode(plain)
    # The end-of-sequence token (0) finishes the sequence and is not emitted as text.
    assert sink.text("penalized") == decode(penalized[:-1] if penalized[-1] == 0 else penalized)


# --- issue 15: logit_bias, n choices, logprobs, prompt scoring, grammars --------------------


def agent_request(
    rid: str, prompt: Sequence[int], max_tokens: int = 8, **sampling: Any
) -> GenerateRequest:
    params = {"temperature": 0.0, "top_p": 1.0, **sampling}
    return replace(
        request(rid, prompt, max_tokens), sampling=SamplingParams(max_tokens=max_tokens, **params)
    )


def fake_logits(seq: Sequence[int]) -> np.ndarray:
    """The fake model's logits after `seq`: 5.0 for its next token, 0 for every other."""
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[next_token(seq)] = 5.0
    return logits


def sampled_reference(
    prompt: Sequence[int], max_tokens: int, rng: np.random.Generator, eos: int = 0
) -> list[int]:
    """Temperature-1 sampling of the fake model, drawing from `rng` as the engine does."""
    seq, out = list(prompt), []
    for _ in range(max_tokens):
        token = sample_token(fake_logits(seq), temperature=1.0, top_p=1.0, rng=rng)
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out


def visible(tokens: list[int]) -> list[int]:
    """The tokens that have text: the EOS (0) that ends a sequence has none."""
    return tokens[:-1] if tokens and tokens[-1] == 0 else tokens


def test_n_choices_share_one_prefill_and_draw_from_their_own_seeds(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM()
    engine = make_engine(session)
    sink = RecordingSink()
    prompt = [5, 9, 3]
    result = engine.submit(agent_request("r", prompt, 12, temperature=1.0, seed=7, n=4), sink).wait(
        10
    )
    assert result is not None
    # One prefill of one row; every decode step runs the four choices as four rows.
    prefills = [(b, s) for b, s, _ in session.calls if s > 1]
    assert prefills == [(1, 3)]
    assert {b for b, s, _ in session.calls if s == 1} <= {1, 2, 3, 4}
    assert max(b for b, s, _ in session.calls if s == 1) == 4
    expected = [
        sampled_reference(prompt, 12, np.random.default_rng(7 if i == 0 else [7, i]))
        for i in range(4)
    ]
    assert len({tuple(e) for e in expected}) == 4  # the choices really differ
    events = sink.of("r")
    for i in range(4):
        assert sink.text("r", index=i) == decode(visible(expected[i])), i
        assert all("logprobs" not in f for k, f in events if k == "delta")
    choice_done = [f for k, f in events if k == "choice_done"]
    assert sorted((f["index"], f["completion_tokens"]) for f in choice_done) == [
        (i, len(expected[i])) for i in range(4)
    ]
    for f in choice_done:
        assert f["finish_reason"] == ("stop" if expected[f["index"]][-1] == 0 else "length")
    total = sum(len(e) for e in expected)
    assert events[-1] == (
        "done",
        {
            "finish_reason": choice_done[[f["index"] for f in choice_done].index(0)][
                "finish_reason"
            ],
            "prompt_tokens": 3,
            "completion_tokens": total,
        },
    )
    assert [k for k, _ in events].count("done") == 1
    assert (result.prompt_tokens, result.completion_tokens) == (3, total)


def test_choice_zero_is_the_same_whatever_n_and_seeded_requests_repeat(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = make_engine(FakeCausalLM(delay_s=0.001))
    sink = RecordingSink()
    handles = [
        engine.submit(agent_request("one", [4, 4], 16, temperature=1.0, seed=3), sink),
        engine.submit(agent_request("three", [4, 4], 16, temperature=1.0, seed=3, n=3), sink),
        engine.submit(agent_request("again", [4, 4], 16, temperature=1.0, seed=3, n=3), sink),
    ]
    assert all(h.wait(10) is not None for h in handles)
    assert sink.text("three", index=0) == sink.text("one")
    for i in range(3):
        assert sink.text("again", index=i) == sink.text("three", index=i)
    # n == 1 keeps today's events: no index, no choice_done.
    assert sink.count("one", "choice_done") == 0
    assert all("index" not in f for k, f in sink.of("one") if k == "delta")
    assert all("index" in f for k, f in sink.of("three") if k == "delta")


def test_a_request_with_n_choices_waits_for_n_free_rows(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.001)
    engine = make_engine(session, max_batch=4)
    sink = RecordingSink()
    handles = [
        engine.submit(agent_request("a", [1, 2], 10, n=3), sink),
        engine.submit(agent_request("b", [3], 6, n=2), sink),
        engine.submit(agent_request("c", [2, 2], 5), sink),
    ]
    results = [h.wait(10) for h in handles]
    assert all(r is not None for r in results)
    assert max(b for b, s, _ in session.calls if s == 1) <= 4
    # b (two rows) could not join a's three: it started only after a's choices ended.
    assert results[1] is not None and results[0] is not None
    assert results[1].admitted_step >= results[0].finished_step
    for i in range(3):
        assert sink.text("a", index=i) == decode(reference([1, 2], 10))  # greedy: all alike
    assert sink.text("c") == decode(reference([2, 2], 5))


def test_more_choices_than_the_batch_is_refused(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM()
    engine = make_engine(session, max_batch=2)
    sink = RecordingSink()
    result = engine.submit(agent_request("big", [1, 2], 4, n=3), sink).wait(1)
    assert result is not None and result.error_code == "invalid_request"
    assert sink.of("big") == [
        ("error", {"code": "invalid_request", "message": sink.of("big")[0][1]["message"]})
    ]
    assert "n is 3" in sink.of("big")[0][1]["message"]
    assert session.calls == []


def test_cancelling_a_request_ends_all_its_choices(
    make_engine: Callable[..., CausalLMEngine], redis_client: object
) -> None:
    engine = make_engine(
        FakeCausalLM(delay_s=0.002), redis_client=redis_client, cancel_check_interval_s=0.01
    )
    sink = RecordingSink()
    handle = engine.submit(agent_request("r", [1, 2], 100_000, n=3), sink)
    wait_until(lambda: sink.count("r", "delta") >= 9)
    redis_client.set(cancel_key("r"), "1")  # type: ignore[attr-defined]
    result = handle.wait(10)
    assert result is not None and result.finish_reason == "cancelled"
    wait_until(lambda: engine.running == 0)
    events = sink.of("r")
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "cancelled"
    assert sink.count("r", "choice_done") == 0
    assert events[-1][1]["completion_tokens"] == result.completion_tokens
    assert result.completion_tokens == sum(f["tokens"] for k, f in events if k == "delta")


def test_logit_bias_steers_greedy_decoding(make_engine: Callable[..., CausalLMEngine]) -> None:
    engine = make_engine()
    sink = RecordingSink()
    prompt = [5, 9, 3]
    plain = reference(prompt, 6)
    handles = [
        # +10 beats the model's 5.0: always token 17.
        engine.submit(agent_request("up", prompt, 6, logit_bias=((17, 10.0),)), sink),
        # -10 on what greedy would pick first: the argmax among the zeros, token 0 (EOS).
        engine.submit(agent_request("down", prompt, 6, logit_bias=((plain[0], -10.0),)), sink),
        # A bias too small to change the argmax changes nothing.
        engine.submit(agent_request("small", prompt, 6, logit_bias=((17, 4.0),)), sink),
    ]
    results = [h.wait(10) for h in handles]
    assert sink.text("up") == decode([17] * 6)
    assert sink.text("down") == "" and results[1] is not None
    assert (results[1].finish_reason, results[1].completion_tokens) == ("stop", 1)
    assert sink.text("small") == decode(plain)


def test_logprobs_entries_are_the_log_softmax_of_the_final_logits(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = make_engine()
    sink = RecordingSink()
    prompt = [5, 9, 3]
    bias = ((7, 2.0),)
    result = engine.submit(agent_request("r", prompt, 10, logprobs=3, logit_bias=bias), sink).wait(
        10
    )
    assert result is not None and result.finish_reason == "length"
    entries = [e for k, f in sink.of("r") if k == "delta" for e in f["logprobs"]]
    tokens = reference(prompt, 10)
    assert len(entries) == len(tokens)
    seq = list(prompt)
    for token, (text, raw, logprob, top) in zip(tokens, entries, strict=True):
        logits = fake_logits(seq).astype(np.float64)
        logits[7] += 2.0  # logit_bias counts: it is part of the final logits
        logsoftmax = logits - np.log(np.exp(logits).sum())
        assert (text, bytes(raw)) == (decode([token]), decode([token]).encode())
        assert logprob == pytest.approx(logsoftmax[token], abs=1e-5)
        assert len(top) == 3
        assert [t[2] for t in top] == sorted((t[2] for t in top), reverse=True)
        assert top[0][0] == decode([token])  # greedy: the chosen token is the likeliest
        for alt_text, alt_raw, alt_logprob in top:
            assert alt_logprob == pytest.approx(logsoftmax[encode(alt_text)[0]], abs=1e-5)
            assert bytes(alt_raw) == alt_text.encode()
        seq.append(token)
    assert sorted(np.argsort(-fake_logits(prompt) - 2.0 * (np.arange(VOCAB) == 7))[:3]) == sorted(
        encode("".join(t[0] for t in entries[0][3]))
    )


def test_logprobs_never_lost_and_eos_gets_no_entry(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    # A decode that holds back every odd token (half a character), and an EOS that ends it.
    expected = reference([5, 9, 3], 10)
    eos = expected[5]
    engine = make_engine(model_spec=spec(eos=(eos,)))
    sink = RecordingSink()
    result = engine.submit(agent_request("r", [5, 9, 3], 10, logprobs=0), sink).wait(10)
    assert result is not None and result.finish_reason == "stop"
    deltas = [f for k, f in sink.of("r") if k == "delta"]
    entries = [e for f in deltas for e in f["logprobs"]]
    assert [e[0] for e in entries] == [decode([t]) for t in expected[: expected.index(eos)]]
    assert all(e[3] == [] for e in entries)  # k = 0: no alternatives
    assert sum(f["tokens"] for f in deltas) <= result.completion_tokens


def test_prompt_logprobs_score_the_prompt_by_teacher_forcing(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM()
    engine = make_engine(session)
    sink = RecordingSink()
    prompt = [5, 9, 3, 3, 40, 12]
    result = engine.submit(agent_request("r", prompt, 6, prompt_logprobs=2), sink).wait(10)
    assert result is not None
    assert (result.prompt_tokens, result.completion_tokens) == (6, 6)
    events = sink.of("r")
    assert events[0][0] == "prompt_logprobs"
    assert sink.count("r", "prompt_logprobs") == 1
    scored = events[0][1]["logprobs"]
    assert scored[0] is None and len(scored) == len(prompt)
    for j in range(1, len(prompt)):
        logits = fake_logits(prompt[:j]).astype(np.float64)
        logsoftmax = logits - np.log(np.exp(logits).sum())
        text, _, logprob, top = scored[j]
        assert text == decode([prompt[j]])
        assert logprob == pytest.approx(logsoftmax[prompt[j]], abs=1e-5)
        assert len(top) == 2 and top[0][0] == decode([next_token(prompt[:j])])
    # Generation afterwards is what it is without scoring; only the first token was prefilled.
    assert sink.text("r") == decode(reference(prompt, 6))
    assert [(b, s) for b, s, past in session.calls if past == 0] == [(1, 1)]


def test_prompt_logprobs_of_a_one_token_prompt(make_engine: Callable[..., CausalLMEngine]) -> None:
    engine = make_engine()
    sink = RecordingSink()
    result = engine.submit(agent_request("r", [9], 3, prompt_logprobs=0, n=2), sink).wait(10)
    assert result is not None
    assert sink.of("r")[0] == ("prompt_logprobs", {"logprobs": [None]})
    assert sink.text("r", index=1) == decode(reference([9], 3))


def test_prompt_logprobs_with_n_choices_are_sent_once(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = make_engine()
    sink = RecordingSink()
    prompt = [5, 9, 3, 7]
    result = engine.submit(agent_request("r", prompt, 4, prompt_logprobs=1, n=2), sink).wait(10)
    assert result is not None and result.completion_tokens == 8
    assert sink.count("r", "prompt_logprobs") == 1
    assert sink.of("r")[0][0] == "prompt_logprobs"
    assert len(sink.of("r")[0][1]["logprobs"]) == 4
    for i in range(2):
        assert sink.text("r", index=i) == decode(reference(prompt, 4))


def grammar_engine(make: Callable[..., CausalLMEngine], **kwargs: Any) -> CausalLMEngine:
    return make(grammar_compiler=fake_grammar_compiler, **kwargs)


def test_a_grammar_constrains_every_choice_and_ends_with_stop(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = grammar_engine(make_engine)
    sink = RecordingSink()
    grammar = llguidance.LLMatcher.grammar_from_regex("[a-c]{4}(d|ee)")
    greedy = engine.submit(agent_request("g", [5, 9, 3], 20, grammar=grammar), sink)
    sampled = engine.submit(
        agent_request("s", [5, 9, 3], 20, grammar=grammar, temperature=1.0, seed=1, n=3), sink
    )
    cut = engine.submit(agent_request("cut", [5, 9, 3], 2, grammar=grammar), sink)
    results = [h.wait(10) for h in (greedy, sampled, cut)]
    assert all(r is not None for r in results)
    assert re.fullmatch("[a-c]{4}(d|ee)", sink.text("g"))
    assert results[0] is not None and results[0].finish_reason == "stop"
    for i in range(3):
        assert re.fullmatch("[a-c]{4}(d|ee)", sink.text("s", index=i)), i
    assert len({sink.text("s", index=i) for i in range(3)}) > 1
    # max_tokens first: LENGTH, the output cut short (as OpenAI does).
    assert results[2] is not None and results[2].finish_reason == "length"
    assert re.fullmatch("[a-c]{2}", sink.text("cut"))


def test_a_grammar_with_logprobs_reports_the_masked_distribution(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = grammar_engine(make_engine)
    sink = RecordingSink()
    grammar = llguidance.LLMatcher.grammar_from_regex("[a-c]{3}")
    result = engine.submit(agent_request("r", [5], 10, grammar=grammar, logprobs=5), sink).wait(10)
    assert result is not None and result.finish_reason == "stop"
    entries = [e for k, f in sink.of("r") if k == "delta" for e in f["logprobs"]]
    assert len(entries) == 3  # the EOS that ended it has none
    for text, _, logprob, top in entries:
        assert text in "abc" and logprob <= 0.0
        # Three tokens allowed; the others are masked out (-9999, never -inf in JSON).
        assert sorted(t[0] for t in top[:3]) == ["a", "b", "c"]
        assert [t[2] for t in top[3:]] == [-9999.0, -9999.0]
        assert math.fsum(math.exp(t[2]) for t in top[:3]) == pytest.approx(1.0, abs=1e-5)


def test_a_bad_grammar_is_refused_without_running(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM()
    engine = make_engine(session, grammar_compiler=fake_grammar_compiler)
    sink = RecordingSink()
    result = engine.submit(agent_request("bad", [5], 10, grammar="start: /[a-/"), sink).wait(5)
    assert result is not None and result.error_code == "invalid_request"
    [(kind, fields)] = sink.of("bad")
    assert kind == "error" and fields["code"] == "invalid_request"
    assert fields["message"].startswith("the grammar cannot be used: ")
    assert session.calls == []


def test_an_engine_without_a_tokenizer_for_grammars_refuses_them(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = make_engine()
    sink = RecordingSink()
    grammar = llguidance.LLMatcher.grammar_from_regex("a")
    result = engine.submit(agent_request("r", [5], 3, grammar=grammar), sink).wait(5)
    assert result is not None and result.error_code == "invalid_request"
    assert "does not support constrained decoding" in sink.of("r")[0][1]["message"]


def test_a_matcher_in_error_fails_its_request_only(
    make_engine: Callable[..., CausalLMEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = grammar_engine(make_engine)
    real = engine.constrainer.matchers

    def broken(grammar: str, n: int) -> list[Any]:
        matchers = real(grammar, n)
        matchers[-1].consume_token(5)  # "5" is not allowed: the matcher enters its error state
        return matchers

    monkeypatch.setattr(engine.constrainer, "matchers", broken)
    sink = RecordingSink()
    grammar = llguidance.LLMatcher.grammar_from_regex("[a-c]{40}")
    other = engine.submit(agent_request("other", [3, 3], 12), sink)
    bad = engine.submit(agent_request("bad", [5], 10, grammar=grammar, n=2), sink)
    results = [h.wait(10) for h in (other, bad)]
    assert results[1] is not None and results[1].error_code == "internal_error"
    assert results[1].error_message.startswith("the grammar matcher failed: ")
    assert "doesn't satisfy the grammar" in results[1].error_message
    assert sink.of("bad")[-1][0] == "error" and sink.count("bad", "done") == 0
    assert results[0] is not None and sink.text("other") == decode(reference([3, 3], 12))


def test_a_tokenizer_llguidance_cannot_read_leaves_logprobs_working(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    def unreadable() -> Any:
        raise ValueError("not a tokenizer llguidance knows")

    engine = make_engine(grammar_compiler=unreadable)
    sink = RecordingSink()
    grammar = llguidance.LLMatcher.grammar_from_regex("a")
    refused = engine.submit(agent_request("g", [5], 3, grammar=grammar), sink).wait(5)
    served = engine.submit(agent_request("lp", [5], 3, logprobs=1), sink).wait(5)
    assert refused is not None and refused.error_code == "invalid_request"
    assert served is not None and served.finish_reason == "length"
    entries = [e for k, f in sink.of("lp") if k == "delta" for e in f["logprobs"]]
    assert [e[0] for e in entries] == [decode([t]) for t in reference([5], 3)]


# --- the batch class (issue 17) ---------------------------------------------------------


def line(rid: str, prompt: Sequence[int], max_tokens: int) -> GenerateRequest:
    """A batch line (service_class "batch")."""
    return request(rid, prompt, max_tokens, service_class="batch")


def decode_batches(session: FakeCausalLM, calls: slice = slice(None)) -> list[int]:
    """The batch size of every decode step (one token per row) among `calls`."""
    return [b for b, s, _ in session.calls[calls] if s == 1]


def test_a_waiting_online_request_is_admitted_before_an_earlier_batch_line(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    engine = make_engine(FakeCausalLM(delay_s=0.002), max_batch=2)
    sink = RecordingSink()
    # Two online requests fill the batch; then a batch line, then an online one, wait.
    short = engine.submit(request("short", [3, 4], 20), sink)
    long = engine.submit(request("long", [5, 6], 200), sink)
    wait_until(lambda: sink.count("short", "delta") > 0 and sink.count("long", "delta") > 0)
    batch = engine.submit(line("line", [7, 7], 5), sink)
    online = engine.submit(request("online", [8, 8], 5), sink)
    short_r, line_r, online_r = short.wait(10), batch.wait(10), online.wait(10)
    assert long.wait(10) is not None
    assert short_r is not None and online_r is not None and line_r is not None
    # The online request took the first free row; the line waited for the next.
    assert short_r.finished_step <= online_r.admitted_step < line_r.admitted_step
    assert sink.text("line") == decode(reference([7, 7], 5))


class Gate(FakeCausalLM):
    """Holds the engine inside its next session call while `open` is cleared."""

    def __init__(self) -> None:
        super().__init__(delay_s=0.001)
        self.open = threading.Event()
        self.open.set()
        self.held = threading.Event()

    def run(self, output_names: Sequence[str], feeds: Mapping[str, Any]) -> list[np.ndarray]:
        if not self.open.is_set():
            self.held.set()
            assert self.open.wait(10), "never opened"
        return super().run(output_names, feeds)


def test_an_online_prompt_is_computed_before_a_batch_prompt_admitted_with_it(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = Gate()
    engine = make_engine(session, max_batch=8)
    sink = RecordingSink()
    running = engine.submit(request("running", [2], 40), sink)
    wait_until(lambda: sink.count("running", "delta") > 0)
    # Both arrive while the engine is inside one call: admitted together, line first.
    session.open.clear()
    assert session.held.wait(10)
    batch = engine.submit(line("line", [4, 5, 6], 3), sink)
    online = engine.submit(request("online", [7, 8, 9], 3), sink)
    session.open.set()
    line_r, online_r = batch.wait(10), online.wait(10)
    assert running.wait(10) is not None and line_r is not None and online_r is not None
    # Not in one call: the online prompt's call came first.
    assert online_r.admitted_step < line_r.admitted_step
    assert sink.text("online") == decode(reference([7, 8, 9], 3))
    assert sink.text("line") == decode(reference([4, 5, 6], 3))


def test_an_online_request_never_waits_for_a_full_batch_of_batch_lines(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.002)
    engine = make_engine(session, max_batch=4)
    sink = RecordingSink()
    lines = [engine.submit(line(f"line-{i}", [i + 1, 2], 100_000), sink) for i in range(4)]
    wait_until(lambda: all(sink.count(f"line-{i}", "delta") > 0 for i in range(4)))
    online = engine.submit(request("online", [9, 9, 9], 5), sink)
    result = online.wait(10)
    # Served beside the four lines (a burst row over max_batch), none of which ended.
    assert result is not None and result.finish_reason == "length"
    assert sink.text("online") == decode(reference([9, 9, 9], 5))
    assert not any(h.claimed for h in lines)
    assert max(decode_batches(session)) == 5
    for h in lines:
        h.claim()


def test_batch_lines_fill_the_engine_with_no_online_traffic(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.001)
    engine = make_engine(session, max_batch=4)
    sink = RecordingSink()
    handles = [engine.submit(line(f"line-{i}", [i + 1, 2], 30), sink) for i in range(6)]
    for h in handles:
        assert h.wait(10) is not None
    assert max(decode_batches(session)) == 4
    for i in range(6):
        assert sink.text(f"line-{i}") == decode(reference([i + 1, 2], 30))


def test_batch_lines_are_held_to_a_share_beside_online_traffic_and_a_while_after(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.002)
    engine = make_engine(session, max_batch=4, online_linger_s=0.2)
    sink = RecordingSink()
    online = engine.submit(request("online", [3], 60), sink)
    wait_until(lambda: sink.count("online", "delta") > 0)
    # Lines long enough that the first still runs when the linger ends.
    handles = [engine.submit(line(f"line-{i}", [i + 1, 2], 300), sink) for i in range(4)]
    online_r = online.wait(10)
    assert online_r is not None
    online_steps = len(session.calls)
    left_at = time.monotonic()
    for h in handles:
        assert h.wait(20) is not None
    # While the online request ran: itself and one line (a quarter of 4) per step.
    assert max(decode_batches(session, slice(0, online_steps))) == 2
    # Once it had been gone ONLINE_LINGER_S, the lines filled the engine.
    assert time.monotonic() - left_at > 0.2
    assert max(decode_batches(session, slice(online_steps, None))) == 4


class FirstTokenWatch(RecordingSink):
    """Sets `seen` once a flush carries a delta of request "online"."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def flush(self) -> None:
        super().flush()
        if self.count("online", "delta"):
            self.seen.set()


class WaitsAfterPrefill(FakeCausalLM):
    """After the call that computes a 5-token prompt, the next call waits (3 s at most)
    for the online request's first token to be flushed, and records whether it was."""

    def __init__(self, sink: FirstTokenWatch) -> None:
        super().__init__(delay_s=0.002)
        self.sink = sink
        self.armed = False
        self.flushed_before_next_call: bool | None = None

    def run(self, output_names: Sequence[str], feeds: Mapping[str, Any]) -> list[np.ndarray]:
        if self.armed:
            self.armed = False
            self.flushed_before_next_call = self.sink.seen.wait(3)
        out = super().run(output_names, feeds)
        if feeds["input_ids"].shape == (1, 5):
            self.armed = True
        return out


def test_an_online_first_token_is_published_before_the_batchs_next_step(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    sink = FirstTokenWatch()
    session = WaitsAfterPrefill(sink)
    engine = make_engine(session, max_batch=4)
    lines = [engine.submit(line(f"line-{i}", [i + 1, 2], 100_000), sink) for i in range(2)]
    wait_until(lambda: all(sink.count(f"line-{i}", "delta") > 0 for i in range(2)))
    online = engine.submit(request("online", [1, 2, 3, 4, 5], 4), sink)
    assert online.wait(10) is not None
    assert session.flushed_before_next_call is True
    for h in lines:
        h.claim()


class FakeRunOptions:
    terminate = False


class SlowBatchSteps(FakeCausalLM):
    """Calls given RunOptions (only batch work) take `slow_s`, checking `terminate` every
    millisecond as ONNX Runtime does between nodes; the others are instant. Subclasses
    narrow which calls are slow (`slows`)."""

    def __init__(self, slow_s: float) -> None:
        super().__init__()
        self.slow_s = slow_s
        self.in_slow_call = threading.Event()

    def slows(self, feeds: Mapping[str, Any]) -> bool:
        return True

    def run(
        self, output_names: Sequence[str], feeds: Mapping[str, Any], *options: Any
    ) -> list[np.ndarray]:
        if options and self.slows(feeds):
            self.in_slow_call.set()
            end = time.monotonic() + self.slow_s
            while time.monotonic() < end:
                if options[0].terminate:
                    self.in_slow_call.clear()
                    raise RuntimeError("Exiting due to terminate flag being set to true.")
                time.sleep(0.001)
            self.in_slow_call.clear()
        return super().run(output_names, feeds)


class SlowInPlaceBatchSteps(FakeInPlaceCausalLM):
    """SlowBatchSteps for an in-place graph: a call cut short has already written the
    columns it would fill (garbage here), as the kernel may have, past each row's length."""

    def __init__(self, slow_s: float) -> None:
        super().__init__()
        self.slow_s = slow_s
        self.in_slow_call = threading.Event()

    def slows(self, feeds: Mapping[str, Any]) -> bool:
        return True

    def run_in_place(
        self, feeds: Mapping[str, Any], kv: Sequence[np.ndarray], run_options: Any = None
    ) -> np.ndarray:
        if run_options is not None and self.slows(feeds):
            self.in_slow_call.set()
            end = time.monotonic() + self.slow_s
            while time.monotonic() < end:
                if run_options.terminate:
                    self.in_slow_call.clear()
                    seq = feeds["input_ids"].shape[1]
                    for row, last in enumerate(feeds["seqlens_k"]):
                        for buf in kv:
                            buf[row, 0, max(0, int(last) + 1 - seq) : int(last) + 1] = -7.0
                    raise RuntimeError("Exiting due to terminate flag being set to true.")
                time.sleep(0.001)
            self.in_slow_call.clear()
        return super().run_in_place(feeds, kv)


@pytest.mark.parametrize("slow", [SlowBatchSteps, SlowInPlaceBatchSteps])
def test_an_online_arrival_cuts_a_step_of_batch_lines_short(
    make_engine: Callable[..., CausalLMEngine], slow: Callable[..., FakeCausalLM]
) -> None:
    session = slow(slow_s=0.6)
    engine = make_engine(session, max_batch=2, run_options=FakeRunOptions)
    sink = RecordingSink()
    lines = [engine.submit(line(f"line-{i}", [i + 1, 2], 6), sink) for i in range(2)]
    wait_until(lambda: session.in_slow_call.is_set())  # a step of the lines under way
    submitted = time.time()
    online = engine.submit(request("online", [9, 9, 9], 3), sink)
    result = online.wait(10)
    assert result is not None and result.finish_reason == "length"
    # Its first token did not wait out the lines' 0.6 s step: the step was cut short
    assert result.first_token_at - submitted < 0.3
    assert engine.cut_short >= 1
    # and run again later, the lines' tokens as if nothing had happened.
    for i, h in enumerate(lines):
        assert h.wait(30) is not None
        assert sink.text(f"line-{i}") == decode(reference([i + 1, 2], 6))
    assert sink.text("online") == decode(reference([9, 9, 9], 3))


# --- fair sharing and service tiers (docs/service_tiers.md) ----------------------------------


def test_a_quiet_organization_is_served_beside_a_flood_not_behind_it(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    """Another organization's streams fill every row and more of its requests wait: a
    quiet organization's request is within its fair share, so it is admitted at once on
    a burst row, ahead of the flood's waiting requests, and its prompt is computed at once."""
    session = FakeCausalLM(delay_s=0.002)
    engine = make_engine(session, max_batch=4)
    sink = RecordingSink()
    flood = [engine.submit(request(f"a-{i}", [i + 1, 2], 400, org="a"), sink) for i in range(4)]
    wait_until(lambda: all(sink.count(f"a-{i}", "delta") > 0 for i in range(4)))
    waiting = [engine.submit(request(f"a-w{i}", [3, 3], 400, org="a"), sink) for i in range(3)]
    quiet = engine.submit(request("b", [9, 9, 9], 5, org="b"), sink)

    result = quiet.wait(10)

    assert result is not None and result.finish_reason == "length"
    assert sink.text("b") == decode(reference([9, 9, 9], 5))
    assert not any(h.claimed for h in flood + waiting)  # none of the flood had to end first
    assert max(decode_batches(session)) == 5  # four flood rows and the quiet one's
    for h in flood + waiting:
        h.claim()


def test_with_fair_sharing_off_a_quiet_organization_waits_behind_the_flood(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    """The baseline: arrival order. The quiet request waits for the flood's rows to end and
    for the flood's earlier waiting requests to be admitted first."""
    session = FakeCausalLM(delay_s=0.001)
    engine = make_engine(session, max_batch=2, fair_sharing=False)
    sink = RecordingSink()
    flood = [engine.submit(request(f"a-{i}", [i + 1, 2], 30, org="a"), sink) for i in range(2)]
    wait_until(lambda: all(sink.count(f"a-{i}", "delta") > 0 for i in range(2)))
    waiting = [engine.submit(request(f"a-w{i}", [3, 3], 30, org="a"), sink) for i in range(2)]
    quiet = engine.submit(request("b", [9, 9, 9], 5, org="b"), sink)

    quiet_r = quiet.wait(20)
    flood_r = [h.wait(20) for h in flood + waiting]

    assert quiet_r is not None and all(r is not None for r in flood_r)
    assert quiet_r.admitted_step > max(r.admitted_step for r in flood_r if r is not None)
    assert max(decode_batches(session)) == 2


def test_waiting_requests_are_admitted_to_the_organization_holding_fewest_rows(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.001)
    engine = make_engine(session, max_batch=2)
    sink = RecordingSink()
    # Organization a holds both rows (and the burst row once b waits); then a queue forms:
    # three more of a's, then one of c's.
    first = [engine.submit(request(f"a-{i}", [i + 1], 300, org="a"), sink) for i in range(2)]
    wait_until(lambda: all(sink.count(f"a-{i}", "delta") > 0 for i in range(2)))
    b = engine.submit(request("b", [5], 2000, org="b"), sink)  # takes the burst row, stays
    wait_until(lambda: sink.count("b", "delta") > 0)
    later = [engine.submit(request(f"a-w{i}", [4], 20, org="a"), sink) for i in range(3)]
    c = engine.submit(request("c", [6], 20, org="c"), sink)

    results = {h: h.wait(20) for h in [*first, *later, c]}

    assert all(r is not None for r in results.values())
    admitted = {h: r.admitted_step for h, r in results.items() if r is not None}
    # c arrived last but holds no row: the first row a's requests free goes to c.
    assert not any(r is not None and r.admitted_step < 0 for r in results.values())
    assert admitted[c] < min(admitted[h] for h in later)
    assert admitted[c] > max(admitted[h] for h in first)
    b.claim()


def test_tiers_are_admitted_priority_first_then_default_then_flex(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.002)
    engine = make_engine(session, max_batch=1)
    sink = RecordingSink()
    running = engine.submit(request("running", [2], 30), sink)
    wait_until(lambda: sink.count("running", "delta") > 0)
    # One organization: fair sharing changes nothing here, the tiers order the queue.
    flex = engine.submit(request("flex", [3], 4, service_class="flex"), sink)
    default = engine.submit(request("default", [4], 4), sink)
    priority = engine.submit(request("priority", [5], 4, service_class="priority"), sink)

    got = {name: h.wait(20) for name, h in [("flex", flex), ("default", default)]}
    got["priority"] = priority.wait(20)
    assert running.wait(20) is not None

    steps = {name: r.admitted_step for name, r in got.items() if r is not None}
    assert len(steps) == 3
    # Priority did not wait for the running row (a burst row); default came before flex.
    assert steps["priority"] < steps["default"] < steps["flex"]
    assert got["priority"] is not None and got["priority"].admitted_step < 30
    assert sink.text("flex") == decode(reference([3], 4))


def test_a_flex_request_that_cannot_start_in_time_is_refused_not_dropped(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.002)
    engine = make_engine(session, max_batch=1, flex_max_wait_s=0.2)
    sink = RecordingSink()
    running = engine.submit(request("running", [2], 100_000), sink)
    wait_until(lambda: sink.count("running", "delta") > 0)
    # A flex request sent 0.1 s ago by the gateway: 0.1 s more and it is past its wait.
    flex = engine.submit(
        request("flex", [3], 4, service_class="flex", enqueued_at=time.time() - 0.1), sink
    )

    result = flex.wait(10)

    assert result is not None and result.finish_reason == "error"
    assert sink.of("flex")[-1][0] == "error"
    code = sink.of("flex")[-1][1]
    assert "resource_unavailable" in str(code), sink.of("flex")
    assert not running.claimed  # the running request goes on
    running.claim()


class SlowSteps(SlowBatchSteps):
    """Calls given RunOptions take `slow_s` (checking `terminate` every millisecond, as
    ONNX Runtime does between nodes) once `slow` is set; the others are instant."""

    def __init__(self, slow_s: float) -> None:
        super().__init__(slow_s)
        self.slow = threading.Event()

    def slows(self, feeds: Mapping[str, Any]) -> bool:
        return self.slow.is_set()


def test_a_quiet_organizations_arrival_cuts_a_step_of_a_flood_short(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    """A step of rows of one organization that holds more than the share it would have
    beside one more organization is cut short when a new organization's request arrives:
    its first token does not wait out the step. The same organization's own arrivals never
    cut its steps."""
    session = SlowSteps(slow_s=0.6)
    engine = make_engine(session, max_batch=4, run_options=FakeRunOptions)
    sink = RecordingSink()
    # Slow from the first step: a flood that ran fast until the test's thread was
    # scheduled could end before a slow step began (on a loaded machine it did).
    session.slow.set()
    flood = [engine.submit(request(f"a-{i}", [i + 1, 2], 12, org="a"), sink) for i in range(4)]
    wait_until(lambda: all(sink.count(f"a-{i}", "delta") > 0 for i in range(4)), 30)
    wait_until(lambda: session.in_slow_call.is_set())
    own = engine.submit(request("a-more", [3, 3], 2, org="a"), sink)
    time.sleep(0.05)
    assert engine.cut_short == 0  # its own arrival waits for the step
    submitted = time.time()
    quiet = engine.submit(request("b", [9, 9, 9], 3, org="b"), sink)

    result = quiet.wait(30)

    assert result is not None and result.finish_reason == "length"
    assert result.first_token_at - submitted < 0.3
    assert engine.cut_short >= 1
    session.slow.clear()
    for i, h in enumerate(flood):
        assert h.wait(30) is not None
        assert sink.text(f"a-{i}") == decode(reference([i + 1, 2], 12))
    assert own.wait(30) is not None
    assert sink.text("b") == decode(reference([9, 9, 9], 3))


def test_waiting_requests_are_counted_by_class(make_engine: Callable[..., CausalLMEngine]) -> None:
    engine = make_engine(FakeCausalLM(delay_s=0.002), max_batch=1)
    sink = RecordingSink()
    running = engine.submit(request("running", [2], 100_000), sink)
    wait_until(lambda: sink.count("running", "delta") > 0)
    handles = [
        engine.submit(request("f", [3], 4, service_class="flex"), sink),
        engine.submit(request("d1", [3], 4), sink),
        engine.submit(request("d2", [3], 4, service_class="made-up"), sink),
        engine.submit(line("l", [3], 4), sink),
    ]
    assert engine.waiting_by_class() == {"flex": 1, "online": 2, "batch": 1}
    for h in [running, *handles]:
        h.claim()


def test_a_prompt_half_computed_is_not_held_behind_a_stream_of_fresh_prompts(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    """A long prompt computed a chunk at a time beside running streams takes its turn with
    the prompts that arrive after it: a steady stream of short prompts (one new as each
    starts) does not hold it until the stream stops (a surge once held such prompts
    for most of a minute)."""
    session = FakeCausalLM(delay_s=0.002, delay_per_token_s=0.0002)
    engine = make_engine(session, max_batch=16)
    sink = RecordingSink()
    running = engine.submit(request("running", [2], 100_000), sink)
    wait_until(lambda: sink.count("running", "delta") > 0)
    long = engine.submit(request("long", [(i % 60) + 1 for i in range(200)], 2), sink)
    sent = 0
    while not sink.count("long", "delta") and sent < 120:
        short = engine.submit(request(f"short-{sent}", [3, 4, 5], 1), sink)
        sent += 1
        assert short.wait(10) is not None

    result = long.wait(10)

    assert result is not None and result.finish_reason == "length"
    # Its chunks alternated with the newcomers': it did not wait for the 120th.
    assert sent < 60, sent
    assert sink.text("long") == decode(reference([(i % 60) + 1 for i in range(200)], 2))
    running.claim()


def test_a_flex_request_never_holds_a_row_past_its_wait_behind_default_prompts(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    """While default-tier prompts keep arriving, a flex request is either computed or
    refused within its wait: it never sits in a row that prefill does not reach."""
    session = FakeCausalLM(delay_s=0.002, delay_per_token_s=0.0002)
    engine = make_engine(session, max_batch=16, flex_max_wait_s=0.3)
    sink = RecordingSink()
    running = engine.submit(request("running", [2], 100_000), sink)
    wait_until(lambda: sink.count("running", "delta") > 0)
    stop = threading.Event()

    def defaults() -> None:
        i = 0
        while not stop.is_set():
            handles = [
                engine.submit(request(f"d-{i}-{k}", [(k % 50) + 1] * 40, 1), sink) for k in range(4)
            ]
            i += 1
            for h in handles:
                h.wait(10)

    flood = threading.Thread(target=defaults)
    flood.start()
    try:
        time.sleep(0.1)
        flex = engine.submit(request("flex", [3, 4, 5], 2, service_class="flex"), sink)
        # It ends while the defaults still arrive (not once they stop).
        result = flex.wait(10)
    finally:
        stop.set()
        flood.join(20)
    assert result is not None
    if result.finish_reason == "error":
        assert "resource_unavailable" in str(sink.of("flex")[-1][1])
    else:
        assert sink.text("flex") == decode(reference([3, 4, 5], 2))
    running.claim()


def test_an_idle_engine_hands_free_memory_back_once_after_work(
    make_engine: Callable[..., CausalLMEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a burst the engine waits IDLE_RELEASE_S idle, then returns what the burst's
    rows freed to the system, once; an engine that has done nothing since does not ask."""
    monkeypatch.setattr("workers.engine.causal_lm.IDLE_RELEASE_S", 0.2)
    engine = make_engine()
    time.sleep(0.5)
    assert engine.memory_releases == 0  # started idle: nothing freed
    assert engine.submit(request("r1", [5, 9, 3], max_tokens=4), RecordingSink()).wait(10)
    wait_until(lambda: engine.memory_releases == 1)
    time.sleep(0.5)
    assert engine.memory_releases == 1
    assert engine.submit(request("r2", [7, 2], max_tokens=4), RecordingSink()).wait(10)
    wait_until(lambda: engine.memory_releases == 2)


@pytest.mark.parametrize("layout", [FakeCausalLM, FakeInPlaceCausalLM])
def test_a_priority_prompt_beside_running_streams_is_computed_in_one_call(
    make_engine: Callable[..., CausalLMEngine], layout: type[FakeCausalLM]
) -> None:
    """Beside running streams a prompt is computed in pieces the size of a decode step, and
    its later pieces wait for prefill's share of time; a priority prompt (here with a
    priority stream already running, so it does not stand ahead of every row) is computed
    in one call: its first token waited for that share under a surge (0.2-0.3 s)."""
    session = layout(delay_s=0.002, delay_per_token_s=0.0002)
    engine = make_engine(session, max_batch=16)
    sink = RecordingSink()
    streams = [
        engine.submit(request("default", [2], 100_000), sink),
        engine.submit(request("priority-0", [3], 100_000, service_class="priority"), sink),
    ]
    wait_until(lambda: all(sink.count(r, "delta") > 2 for r in ("default", "priority-0")))
    prompt = [(i % 50) + 1 for i in range(100)]

    asked = request("priority-1", prompt, 2, service_class="priority")
    result = engine.submit(asked, sink).wait(10)

    assert result is not None and result.finish_reason == "length"
    assert sink.text("priority-1") == decode(reference(prompt, 2))
    assert (1, 100, 0) in session.calls, [c for c in session.calls if c[1] > 1]
    for stream in streams:
        stream.claim()


class SlowPrompts(SlowBatchSteps):
    """Calls over more than one token (prompts) given RunOptions are slow once `slow` is
    set; decode steps are instant."""

    def __init__(self, slow_s: float) -> None:
        super().__init__(slow_s)
        self.slow = threading.Event()

    def slows(self, feeds: Mapping[str, Any]) -> bool:
        return self.slow.is_set() and feeds["input_ids"].shape[1] > 1


class SlowInPlacePrompts(SlowInPlaceBatchSteps):
    """SlowPrompts for an in-place graph."""

    def __init__(self, slow_s: float) -> None:
        super().__init__(slow_s)
        self.slow = threading.Event()

    def slows(self, feeds: Mapping[str, Any]) -> bool:
        return self.slow.is_set() and feeds["input_ids"].shape[1] > 1


@pytest.mark.parametrize("slow", [SlowPrompts, SlowInPlacePrompts])
def test_a_priority_arrival_cuts_a_default_prompts_call_beside_running_priority_rows(
    make_engine: Callable[..., CausalLMEngine],
    slow: Callable[..., SlowPrompts | SlowInPlacePrompts],
) -> None:
    """A call that computes default-tier prompts is cut short when a priority request
    arrives, also while priority rows are decoding beside it (they are not in the call):
    under a surge a priority prompt waited out prefill calls of up to 0.8 s."""
    session = slow(slow_s=0.6)
    engine = make_engine(session, max_batch=8, run_options=FakeRunOptions)
    sink = RecordingSink()
    stream = engine.submit(request("priority-0", [2], 100_000, service_class="priority"), sink)
    wait_until(lambda: sink.count("priority-0", "delta") > 4)
    session.slow.set()
    default = engine.submit(request("default", [4, 5, 6], 3), sink)
    wait_until(lambda: session.in_slow_call.is_set())  # the default prompt's call under way
    submitted = time.time()

    # Its own prompt's call comes right after the cut, within CUT_MIN_STEPS of it: not
    # cuttable, so it gets no RunOptions and runs at the fake's full speed.
    result = engine.submit(request("priority-1", [9, 9, 9], 3, service_class="priority"), sink)
    done = result.wait(10)

    assert done is not None and done.finish_reason == "length"
    assert done.first_token_at - submitted < 0.3  # not after the default prompt's 0.6 s call
    assert engine.cut_short >= 1
    session.slow.clear()
    assert default.wait(30) is not None
    assert sink.text("default") == decode(reference([4, 5, 6], 3))
    assert sink.text("priority-1") == decode(reference([9, 9, 9], 3))
    stream.claim()
