"""Token sampling: greedy, seeded reproducibility, nucleus mass."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from workers.engine.sampling import sample_token


def _logits(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def test_temperature_zero_is_argmax() -> None:
    rng = np.random.default_rng(0)
    logits = np.random.default_rng(1).normal(size=49152).astype(np.float32)
    state = rng.bit_generator.state
    assert sample_token(logits, temperature=0.0, top_p=0.5, rng=rng) == int(np.argmax(logits))
    assert rng.bit_generator.state == state  # greedy consumes no randomness


def test_same_seed_same_tokens() -> None:
    logits = np.random.default_rng(2).normal(size=1000).astype(np.float32)

    def draw(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [sample_token(logits, temperature=1.0, top_p=0.9, rng=rng) for _ in range(50)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


@pytest.mark.parametrize(
    ("top_p", "allowed"),
    [(0.5, {0}), (0.6, {0, 1}), (0.8, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_nucleus(top_p: float, allowed: set[int]) -> None:
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(3)
    seen = Counter(sample_token(logits, temperature=1.0, top_p=top_p, rng=rng) for _ in range(4000))
    assert set(seen) == allowed
    # Within the nucleus the draw follows the renormalised probabilities.
    mass = {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}
    total = sum(mass[t] for t in allowed)
    for token in allowed:
        assert seen[token] / 4000 == pytest.approx(mass[token] / total, abs=0.03)


def test_top_p_over_a_large_vocabulary_widens_the_candidates() -> None:
    # Flat logits: the nucleus for top_p=0.5 holds half the vocabulary, far
    # more than the first partial sort looks at.
    logits = np.zeros(10_000, dtype=np.float32)
    rng = np.random.default_rng(4)
    draws = {sample_token(logits, temperature=1.0, top_p=0.5, rng=rng) for _ in range(3000)}
    assert len(draws) > 1500


def test_low_temperature_sharpens() -> None:
    logits = _logits([0.4, 0.35, 0.25])
    rng = np.random.default_rng(5)
    seen = Counter(sample_token(logits, temperature=0.05, top_p=1.0, rng=rng) for _ in range(500))
    assert seen[0] > 450


def test_penalties_follow_openais_formula_on_a_copy() -> None:
    from workers.engine.sampling import penalize

    logits = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    out = penalize(logits, {3: 2, 1: 1}, frequency=0.5, presence=0.25)
    # token 3: 4 - 2 x 0.5 - 0.25; token 1: 2 - 0.5 - 0.25; unseen tokens unchanged
    assert out.tolist() == [1.0, 1.25, 3.0, 2.75]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]
    encouraged = penalize(logits, {0: 1}, frequency=-1.0, presence=-2.0)
    assert encouraged.tolist() == [4.0, 2.0, 3.0, 4.0]
    assert penalize(logits, {}, frequency=1.0, presence=1.0) is logits
    assert penalize(logits, {2: 1}, frequency=0.0, presence=0.0) is logits


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_are_the_log_softmax_with_the_top_k_sorted(k: int) -> None:
    from workers.engine.sampling import logprobs_of

    logits = np.random.default_rng(6).normal(scale=3.0, size=49152).astype(np.float32)
    reference = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    token = 1234
    logprob, top = logprobs_of(logits, token, k)
    assert logprob == pytest.approx(reference[token], abs=1e-6)
    assert [t for t, _ in top] == list(np.argsort(-reference, kind="stable")[:k])
    assert [lp for _, lp in top] == pytest.approx(sorted(reference, reverse=True)[:k], abs=1e-6)


def test_logprobs_of_masked_tokens_are_floored() -> None:
    from workers.engine.sampling import LOGPROB_FLOOR, logprobs_of

    logits = np.array([1.0, -np.inf, 1.0, -np.inf], dtype=np.float32)
    logprob, top = logprobs_of(logits, 1, 4)
    assert logprob == LOGPROB_FLOOR
    assert top == [
        (0, pytest.approx(np.log(0.5))),
        (2, pytest.approx(np.log(0.5))),
        (1, -9999.0),
        (3, -9999.0),
    ]


def test_logit_bias_adds_on_a_copy() -> None:
    from workers.engine.sampling import bias_logits

    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    out = bias_logits(logits, np.array([0, 2]), np.array([5.0, -100.0], dtype=np.float32))
    assert out.tolist() == [6.0, 2.0, -97.0]
    assert logits.tolist() == [1.0, 2.0, 3.0]
