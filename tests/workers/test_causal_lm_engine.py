"""Continuous batching over a numpy stand-in for the model (see fakes_support.FakeCausalLM)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import pytest

from tests.workers.fakes_support import (
    VOCAB,
    FakeCausalLM,
    RecordingSink,
    decode,
    encode,
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
) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model=MODEL,
        identity=IDENTITY,
        prompt_token_ids=tuple(prompt),
        sampling=SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=1.0, seed=seed, stop=stop
        ),
        deadline=time.time() + 60 if deadline is None else deadline,
    )


@pytest.fixture
def make_engine() -> Iterator[Callable[..., CausalLMEngine]]:
    engines: list[CausalLMEngine] = []

    def make(
        session: FakeCausalLM | None = None,
        model_spec: CausalLMSpec | None = None,
        **kwargs: object,
    ) -> CausalLMEngine:
        engine = CausalLMEngine(
            session or FakeCausalLM(),
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


def test_model_failure_fails_the_batch_and_the_engine_keeps_serving(
    make_engine: Callable[..., CausalLMEngine],
) -> None:
    session = FakeCausalLM(delay_s=0.002, fail_on_call=6)
    engine = make_engine(session)
    sink = RecordingSink()
    handles = [engine.submit(request(f"r{i}", PROMPTS[i], 50), sink) for i in range(3)]
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
