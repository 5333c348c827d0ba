"""The prefix cache and chunked prefill, over the numpy stand-in for the model.

FakeCausalLM's cache entries are (token, position) pairs and it checks that every row
sees exactly positions 0..n-1: a block taken from the wrong prompt, put at the wrong
place, or a chunk fed at the wrong positions changes the tokens or trips its assertion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import pytest

from tests.workers.fakes_support import (
    FakeCausalLM,
    FakeInPlaceCausalLM,
    RecordingSink,
    decode,
    reference,
    spec,
)
from workers.contract import BillingIdentity, GenerateRequest, ModelRef, SamplingParams
from workers.engine.causal_lm import CausalLMEngine
from workers.engine.prefix_cache import BLOCK_TOKENS, PrefixCache

MODEL = ModelRef("mv", "onnx-causal-lm", "0" * 64, "/nonexistent")
SYSTEM = [(7 * i + 3) % 60 + 1 for i in range(2 * BLOCK_TOKENS + 5)]  # 69 tokens: 2 blocks


def request(
    rid: str, prompt: Sequence[int], max_tokens: int = 6, *, org: str = "org", n: int = 1
) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model=MODEL,
        identity=BillingIdentity(org, "proj", "key", "ep", "mv", "fake"),
        prompt_token_ids=tuple(prompt),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, n=n),
        deadline=time.time() + 60,
    )


@pytest.fixture(params=["padded", "in-place"])
def fake_lm(request: pytest.FixtureRequest) -> type[FakeCausalLM]:
    """Both cache layouts: the traced graph's (left-padded) and an in-place graph's."""
    return FakeInPlaceCausalLM if request.param == "in-place" else FakeCausalLM


@pytest.fixture
def make_engine() -> Iterator[Callable[..., CausalLMEngine]]:
    engines: list[CausalLMEngine] = []

    def make(session: FakeCausalLM, cache: PrefixCache | None, **kwargs: object) -> CausalLMEngine:
        engine = CausalLMEngine(
            session,
            spec(),
            decode,
            prefix_cache=cache,
            **kwargs,  # type: ignore[arg-type]
        ).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def run(engine: CausalLMEngine, req: GenerateRequest, sink: RecordingSink) -> int:
    result = engine.submit(req, sink).wait(10)
    assert result is not None and result.finish_reason == "length", result
    return result.cached_tokens


def test_a_shared_prefix_is_computed_once_and_answers_do_not_change(
    make_engine: Callable[..., CausalLMEngine],
    fake_lm: type[FakeCausalLM],
) -> None:
    session = fake_lm()
    engine = make_engine(session, PrefixCache(64 * 1024 * 1024))
    sink = RecordingSink()
    first = [*SYSTEM, 11, 12, 13]
    second = [*SYSTEM, 21, 22]
    assert run(engine, request("a", first), sink) == 0
    calls_before = len(session.calls)
    assert run(engine, request("b", second), sink) == 2 * BLOCK_TOKENS
    # b's prefill ran only what follows the two cached blocks, after a past of 64.
    assert session.calls[calls_before] == (1, len(second) - 2 * BLOCK_TOKENS, 2 * BLOCK_TOKENS)
    assert sink.text("a") == decode(reference(first, 6))
    assert sink.text("b") == decode(reference(second, 6))
    done = sink.of("b")[-1]
    assert done == (
        "done",
        {
            "finish_reason": "length",
            "prompt_tokens": len(second),
            "completion_tokens": 6,
            "cached_tokens": 2 * BLOCK_TOKENS,
        },
    )
    # The same prompt again: everything but the last token's block-remainder is cached.
    assert run(engine, request("c", first), sink) == 2 * BLOCK_TOKENS
    assert sink.text("c") == sink.text("a")


def test_organizations_never_share_blocks(
    make_engine: Callable[..., CausalLMEngine], fake_lm: type[FakeCausalLM]
) -> None:
    engine = make_engine(fake_lm(), PrefixCache(64 * 1024 * 1024))
    sink = RecordingSink()
    assert run(engine, request("a", [*SYSTEM, 1], org="org-a"), sink) == 0
    assert run(engine, request("b", [*SYSTEM, 1], org="org-b"), sink) == 0
    assert run(engine, request("c", [*SYSTEM, 1], org="org-a"), sink) == 2 * BLOCK_TOKENS


def test_a_prompt_of_exactly_whole_blocks_still_computes_its_last_token(
    make_engine: Callable[..., CausalLMEngine],
    fake_lm: type[FakeCausalLM],
) -> None:
    engine = make_engine(fake_lm(), PrefixCache(64 * 1024 * 1024))
    sink = RecordingSink()
    prompt = SYSTEM[: 2 * BLOCK_TOKENS]
    assert run(engine, request("a", prompt), sink) == 0
    # Only the first block may be reused: the second holds the last token, which is run.
    assert run(engine, request("b", prompt), sink) == BLOCK_TOKENS
    assert sink.text("b") == sink.text("a") == decode(reference(prompt, 6))


def test_n_choices_start_from_cached_blocks(
    make_engine: Callable[..., CausalLMEngine], fake_lm: type[FakeCausalLM]
) -> None:
    engine = make_engine(fake_lm(), PrefixCache(64 * 1024 * 1024))
    sink = RecordingSink()
    run(engine, request("warm", [*SYSTEM, 5]), sink)
    assert run(engine, request("n3", [*SYSTEM, 9], n=3), sink) == 2 * BLOCK_TOKENS
    for i in range(3):
        assert sink.text("n3", index=i) == decode(reference([*SYSTEM, 9], 6))


def test_the_cache_stays_within_its_bound_and_evicts_chains_from_their_ends() -> None:
    block = np.zeros((4, 1, BLOCK_TOKENS, 2), dtype=np.float32)
    cache = PrefixCache(3 * block.nbytes)
    # Three whole blocks and the two tokens a prompt always computes past them.
    tokens_a = list(range(1, 3 * BLOCK_TOKENS + 3))
    cache.insert("ns", tokens_a, [block.copy() for _ in range(3)])
    assert len(cache) == 3 and cache.bytes_used == 3 * block.nbytes
    tokens_b = [9] * (BLOCK_TOKENS + 2)
    cache.insert("ns", tokens_b, [block.copy()])
    assert cache.bytes_used <= cache.max_bytes
    # a's last block went first: its first two still serve a lookup.
    assert len(cache.lookup("ns", tokens_a)) == 2
    assert len(cache.lookup("ns", tokens_b)) == 1
    assert len(cache.lookup("other", tokens_b)) == 0


def test_a_zero_budget_turns_the_cache_off(
    make_engine: Callable[..., CausalLMEngine], fake_lm: type[FakeCausalLM]
) -> None:
    engine = make_engine(fake_lm(), PrefixCache(0))
    sink = RecordingSink()
    run(engine, request("a", [*SYSTEM, 1]), sink)
    assert run(engine, request("b", [*SYSTEM, 1]), sink) == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    make_engine: Callable[..., CausalLMEngine],
    fake_lm: type[FakeCausalLM],
) -> None:
    # A model whose calls cost time per token: a 600-token prompt would take 0.3 s at once.
    session = fake_lm(delay_s=0.002, delay_per_token_s=0.0005)
    engine = make_engine(session, None)
    sink = RecordingSink()
    streaming = engine.submit(request("stream", [3, 4], max_tokens=400), sink)
    while sink.count("stream", "delta") < 5:
        time.sleep(0.001)
    long_prompt = [(5 * i) % 61 + 1 for i in range(600)]
    long = engine.submit(request("long", long_prompt, max_tokens=3), sink).wait(20)
    assert long is not None and long.finish_reason == "length"
    assert streaming.wait(20) is not None
    assert sink.text("long") == decode(reference(long_prompt, 3))
    assert sink.text("stream") == decode(reference([3, 4], 400))
    # The prompt went in several chunks, each after the past the previous ones built...
    chunks = [(s, past) for b, s, past in session.calls if b == 1 and s > 1][1:]  # [0]: stream
    assert len(chunks) > 2 and sum(s for s, _ in chunks) == len(long_prompt)
    assert all(past == sum(s for s, _ in chunks[:i]) for i, (_, past) in enumerate(chunks))
    # ...and the running stream decoded between them.
    first = session.calls.index((1, chunks[0][0], 0))
    last = session.calls.index((1, chunks[-1][0], chunks[-1][1]))
    decodes = [c for c in session.calls[first:last] if c[1] == 1]
    assert len(decodes) >= len(chunks) - 1


def test_a_cancelled_prompt_leaves_the_prefill_and_frees_its_rows(
    make_engine: Callable[..., CausalLMEngine], fake_lm: type[FakeCausalLM], redis_client: object
) -> None:
    from workers.contract import cancel_key

    session = fake_lm(delay_s=0.002, delay_per_token_s=0.001)
    engine = make_engine(
        session, None, max_batch=2, redis_client=redis_client, cancel_check_interval_s=0.01
    )
    sink = RecordingSink()
    streaming = engine.submit(request("stream", [3, 4], max_tokens=200), sink)
    while sink.count("stream", "delta") < 3:
        time.sleep(0.001)
    long_prompt = [(5 * i) % 61 + 1 for i in range(2000)]
    handle = engine.submit(request("long", long_prompt, max_tokens=3), sink)
    while not any(b == 1 and s > 1 and past > 0 for b, s, past in session.calls):
        time.sleep(0.001)
    assert engine.free_slots == 0
    redis_client.set(cancel_key("long"), "1")  # type: ignore[attr-defined]
    result = handle.wait(10)
    assert result is not None and result.finish_reason == "cancelled"
    assert result.completion_tokens == 0
    while engine.free_slots != 1:
        time.sleep(0.001)
    assert streaming.wait(20) is not None


def test_prompt_scoring_requests_bypass_the_cache(
    make_engine: Callable[..., CausalLMEngine],
    fake_lm: type[FakeCausalLM],
) -> None:
    engine = make_engine(fake_lm(), PrefixCache(64 * 1024 * 1024))
    sink = RecordingSink()
    run(engine, request("warm", [*SYSTEM, 1]), sink)
    scored = request("scored", [*SYSTEM, 1])
    scored = replace(scored, sampling=replace(scored.sampling, prompt_logprobs=0))
    assert run(engine, scored, sink) == 0
    assert sink.text("scored") == sink.text("warm")


def test_a_prompt_longer_than_the_cache_keeps_its_first_blocks(
    make_engine: Callable[..., CausalLMEngine],
    fake_lm: type[FakeCausalLM],
) -> None:
    # The fake's block: 2 layers x key/value x 1 head x BLOCK_TOKENS tokens x 2 dims x 4 bytes.
    cache = PrefixCache(3 * (2 * 2 * 1 * BLOCK_TOKENS * 2 * 4))
    engine = make_engine(fake_lm(), cache)
    sink = RecordingSink()
    prompt = [(3 * i) % 61 + 1 for i in range(10 * BLOCK_TOKENS)]
    run(engine, request("a", prompt), sink)
    assert len(cache) == 3 and cache.bytes_used <= cache.max_bytes
    assert run(engine, request("b", prompt), sink) == 3 * BLOCK_TOKENS
    assert sink.text("b") == sink.text("a") == decode(reference(prompt, 6))


def test_the_block_size_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.engine.prefix_cache import block_tokens

    monkeypatch.delenv("MANTLE_KV_BLOCK_TOKENS", raising=False)
    assert block_tokens() == BLOCK_TOKENS == 16
    monkeypatch.setenv("MANTLE_KV_BLOCK_TOKENS", "64")
    assert block_tokens() == 64
    for bad in ("0", "-16", "2048", "sixteen", "16.5"):
        monkeypatch.setenv("MANTLE_KV_BLOCK_TOKENS", bad)
        with pytest.raises(ValueError, match="MANTLE_KV_BLOCK_TOKENS must be a whole number"):
            block_tokens()


def test_a_prompt_of_more_blocks_than_one_gather_is_cached_whole(
    make_engine: Callable[..., CausalLMEngine],
    fake_lm: type[FakeCausalLM],
) -> None:
    """The engine gathers a computed prompt's blocks GATHER_BLOCKS at a time: a prompt of
    more is cached in several runs, every block in its place (the same answer again)."""
    from workers.engine.causal_lm import GATHER_BLOCKS

    cache = PrefixCache(64 * 1024 * 1024)
    engine = make_engine(fake_lm(), cache)
    sink = RecordingSink()
    blocks = 2 * GATHER_BLOCKS + 3
    prompt = [(5 * i) % 59 + 1 for i in range(blocks * BLOCK_TOKENS + 2)]
    assert run(engine, request("a", prompt), sink) == 0
    assert len(cache) == blocks
    assert run(engine, request("b", prompt), sink) == blocks * BLOCK_TOKENS
    assert sink.text("b") == sink.text("a") == decode(reference(prompt, 6))


def test_a_prompt_is_never_cut_to_leave_one_token_for_a_call_of_its_own() -> None:
    from workers.engine.causal_lm import prompt_piece

    assert prompt_piece(17, 16) == 15  # not 16 and then 1
    assert prompt_piece(18, 16) == 16
    assert prompt_piece(16, 16) == 16
    assert prompt_piece(1, 16) == 1  # a one-token prompt is what it is
    for remaining in range(2, 200):
        left, calls = remaining, []
        while left:
            calls.append(prompt_piece(left, 16))
            left -= calls[-1]
        assert 1 not in calls, (remaining, calls)
