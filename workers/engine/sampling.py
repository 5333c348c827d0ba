"""Per-sequence token sampling: logit bias, penalties, greedy, temperature, nucleus (top-p), and
the log probabilities reported to clients.

Log probabilities (`logprobs_of`) are a log_softmax over the row's final logits: after logit_bias,
the penalties and the grammar mask (a masked token has none: `LOGPROB_FLOOR`), before temperature
and top_p, as OpenAI reports them; a prompt's own tokens are scored on the model's raw logits.
"""

from __future__ import annotations

import numpy as np

# Nucleus sampling needs the most probable tokens in order; sorting a 50k
# vocabulary per row per step would cost more than the rest of the step, so
# the candidates are first narrowed with a partial sort and widened only when
# they do not hold top_p of the mass.
_FIRST_CANDIDATES = 64


def sample_token(
    logits: np.ndarray, *, temperature: float, top_p: float, rng: np.random.Generator
) -> int:
    """Draw the next token id from one row of logits.

    Temperature 0 is greedy (argmax; `rng` is not used). Otherwise the draw
    uses exactly one `rng.random()` call per token, so a sequence seeded the
    same way over the same logits always produces the same tokens.
    """
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    vocab = probs.shape[0]
    if top_p >= 1.0:
        ids: np.ndarray = np.arange(vocab)
        kept = probs
    else:
        k = min(_FIRST_CANDIDATES, vocab)
        while True:
            cand = np.argpartition(-probs, k - 1)[:k] if k < vocab else np.arange(vocab)
            if k == vocab or probs[cand].sum() >= top_p:
                break
            k = min(vocab, k * 8)
        order = cand[np.argsort(-probs[cand], kind="stable")]
        sorted_probs = probs[order]
        # The nucleus: the smallest prefix of the sorted tokens whose mass reaches top_p.
        n = int(np.searchsorted(np.cumsum(sorted_probs), top_p)) + 1
        ids = order[:n]
        kept = sorted_probs[:n]
    cdf = np.cumsum(kept)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(ids[min(index, ids.shape[0] - 1)])


def penalize(
    logits: np.ndarray, counts: dict[int, int], *, frequency: float, presence: float
) -> np.ndarray:
    """One row of logits with OpenAI's penalties applied (a copy; `logits` is untouched):
    each token generated so far loses count x `frequency`, plus `presence` once. Negative
    penalties encourage repetition instead."""
    if not counts or (frequency == 0.0 and presence == 0.0):
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    seen = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    out = logits.astype(np.float32, copy=True)
    out[ids] -= seen * np.float32(frequency) + np.float32(presence)
    return out


# A log probability too small to write as a number: a token masked out by a grammar has
# probability 0 (log -inf, which JSON cannot carry); OpenAI writes such tokens as -9999.
LOGPROB_FLOOR = -9999.0


def logprobs_of(scores: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log probability under softmax(`scores`) and the `k` likeliest tokens with
    theirs, likeliest first (ties: lower id first).

    One pass of exp over the row for the normaliser and a partial sort (argpartition) for
    the top k: never a full sort of the vocabulary.
    """
    row = scores.astype(np.float64, copy=False)
    peak = float(row.max())
    lse = peak + float(np.log(np.exp(row - peak).sum()))
    chosen = max(float(row[token]) - lse, LOGPROB_FLOOR)
    if k <= 0:
        return chosen, []
    k = min(k, row.shape[0])
    cand = np.argpartition(-row, k - 1)[:k] if k < row.shape[0] else np.arange(row.shape[0])
    order = cand[np.lexsort((cand, -row[cand]))]
    return chosen, [(int(t), max(float(row[t]) - lse, LOGPROB_FLOOR)) for t in order]


def bias_logits(logits: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One row of logits with logit_bias added (a copy; `ids` are distinct)."""
    out = logits.astype(np.float32, copy=True)
    out[ids] += values
    return out
