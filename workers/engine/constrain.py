"""Constrained decoding for the causal LM engine: grammar matchers, logit masks, token bytes.

One `Constrainer` per engine. llguidance's view of the model's tokenizer (a
`grammar.Compiled`, ~0.2 s to build for a 49k vocabulary) is built on first use, by the
first request that needs it (a grammar, or log probabilities: their entries carry each
token's bytes), on that request's task thread and never on the engine thread. Each
constrained choice owns a matcher; every step the engine asks for the masks of all its
constrained rows at once (one parallel call over the rows), so unconstrained rows pay
nothing but that call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from workers.grammar import GrammarError

if TYPE_CHECKING:
    import llguidance

    from workers.grammar import Compiled

logger = logging.getLogger(__name__)

NEG_INF = np.float32(-np.inf)


class Constrainer:
    """Grammar matchers and masks over one tokenizer, and each token's text and bytes."""

    def __init__(
        self,
        build: Callable[[], Compiled] | None,
        vocab_size: int,
        decode: Callable[[Sequence[int]], str],
    ) -> None:
        self._build = build
        self._vocab_size = vocab_size  # the width of the model's logits
        self._decode = decode
        self._compiled: Compiled | None = None
        self._lock = threading.Lock()
        self._executor: llguidance.LLExecutor | None = None
        self._bitmask = np.zeros((0, 0), dtype=np.int32)
        self._tokens: dict[int, tuple[str, bytes]] = {}

    def compiled(self) -> Compiled | None:
        """llguidance's tokenizer, built by the first caller; None if this engine has none
        (then no grammars, and token bytes come from the model's own decode)."""
        if self._compiled is None and self._build is not None:
            with self._lock:
                if self._compiled is None and self._build is not None:
                    try:
                        self._compiled = self._build()
                    except Exception:
                        logger.exception("llguidance cannot read this model's tokenizer")
                        self._build = None
        return self._compiled

    def matchers(self, grammar: str, n: int) -> list[llguidance.LLMatcher]:
        """`n` matchers at the start of `grammar` (one per choice); GrammarError if it does
        not compile (or this model has no tokenizer llguidance can read)."""
        compiled = self.compiled()
        if compiled is None:
            raise GrammarError("this model does not support constrained decoding")
        first = compiled.matcher(grammar)
        return [first, *(first.deep_copy() for _ in range(n - 1))]

    def token(self, token_id: int) -> tuple[str, bytes]:
        """A token's bytes and their text (UTF-8, a partial character replaced), cached."""
        found = self._tokens.get(token_id)
        if found is None:
            compiled = self.compiled()
            if compiled is not None:
                raw = compiled.token_bytes(token_id)
            else:
                raw = self._decode([token_id]).encode()
            found = (raw.decode("utf-8", errors="replace"), raw)
            self._tokens[token_id] = found
        return found

    def allowed(self, matchers: Sequence[llguidance.LLMatcher]) -> np.ndarray:
        """Which tokens each matcher allows next: bool [len(matchers), vocab] (engine thread).

        Tokens past the tokenizer's vocabulary (a model may pad its logits) are never allowed.
        """
        import llguidance
        import llguidance.numpy as lln

        compiled = self.compiled()
        assert compiled is not None  # a matcher exists only once it was built
        n = len(matchers)
        if self._bitmask.shape[0] < n:
            self._bitmask = lln.allocate_token_bitmask(max(n, 8), compiled.vocab_size)
        bitmask = self._bitmask[:n]
        if n == 1:
            lln.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            lln.fill_next_token_bitmask_par(
                self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask
            )
        # Bit k of 32-bit word w is token 32w + k; on a little-endian machine that is bit
        # k % 8 of byte 4w + k // 8.
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        width = self._vocab_size
        if bits.shape[1] < width:
            bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
        return bits[:, :width].view(np.bool_)


def apply_mask(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """One row of logits with the disallowed tokens at -inf (a copy)."""
    return np.where(allowed, scores, NEG_INF)
