"""Test doubles for the worker engines: numpy stand-ins for ONNX sessions, a recording sink."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.engine.base import RequestResult
from workers.engine.causal_lm import CausalLMSpec
from workers.grammar import Compiled

VOCAB = 64
OFFSET = 48  # token id i is the character chr(48 + i): "0", "1", ... "o"


def decode(ids: Sequence[int]) -> str:
    return "".join(chr(OFFSET + i) for i in ids)


def encode(text: str) -> list[int]:
    return [ord(c) - OFFSET for c in text]


def next_token(tokens: Sequence[int], vocab: int = VOCAB) -> int:
    """The fake model's rule: the next token depends on every earlier token and its position."""
    n = len(tokens)
    return (sum((p + 1) * t for p, t in enumerate(tokens)) + 7 * n) % (vocab - 1) + 1


def reference(prompt: Sequence[int], max_tokens: int, eos: int | None = None) -> list[int]:
    """What batch-1 greedy decoding of the fake model yields: the ground truth for batching."""
    seq = list(prompt)
    out: list[int] = []
    for _ in range(max_tokens):
        token = next_token(seq)
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out


def spec(
    num_layers: int = 2, eos: Sequence[int] = (0,), context_length: int = 4096
) -> CausalLMSpec:
    return CausalLMSpec(
        num_layers=num_layers,
        num_kv_heads=1,
        head_dim=2,
        vocab_size=VOCAB,
        eos_token_ids=frozenset(eos),
        pad_token_id=0,
        context_length=context_length,
    )


class _FakeTokenizer:
    """The fake vocabulary as llguidance sees it: id 0 is a special end token."""

    eos_token_id = 0
    bos_token_id = None
    tokens = [b"\xff[eos]"] + [chr(OFFSET + i).encode() for i in range(1, VOCAB)]
    special_token_ids = [0]

    def __call__(self, text: str | bytes) -> list[int]:
        return encode(text.decode() if isinstance(text, bytes) else text)


def fake_grammar_compiler() -> Compiled:
    """llguidance over the fake vocabulary (EOS 0), for the engine's `grammar_compiler`."""
    from llguidance import TokenizerWrapper

    return Compiled(TokenizerWrapper(_FakeTokenizer()), [0])  # type: ignore[arg-type]


class FakeCausalLM:
    """A numpy 'model' with the real graph's interface and a KV cache that remembers.

    Each cache entry stores (token id, position id). The logits of a row are
    computed only from the entries its attention mask lets it see, and the
    positions of those entries must be exactly 0..n-1 in order; so any mistake
    in padding, merging, slicing or trimming either trips an assertion or
    changes the tokens, which `reference` then exposes.
    """

    def __init__(
        self,
        num_layers: int = 2,
        *,
        delay_s: float = 0.0,
        delay_per_token_s: float = 0.0,
        fail_on_call: int | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.delay_s = delay_s
        # Per input token of a call (batch x seq): prefill costs grow with the prompt.
        self.delay_per_token_s = delay_per_token_s
        self.fail_on_call = fail_on_call
        self.calls: list[tuple[int, int, int]] = []  # (batch, seq, past) per run
        self.lock = threading.Lock()

    def run(self, output_names: Sequence[str], feeds: Mapping[str, Any]) -> list[np.ndarray]:
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            self.calls.append((-1, -1, -1))
            raise RuntimeError("injected model failure")
        ids = feeds["input_ids"]
        mask = feeds["attention_mask"]
        pos = feeds["position_ids"]
        batch, seq = ids.shape
        past_len = feeds["past_key_values.0.key"].shape[2]
        assert ids.dtype == mask.dtype == pos.dtype == np.int64
        assert mask.shape == (batch, past_len + seq), (mask.shape, batch, past_len, seq)
        assert pos.shape == (batch, seq)
        new = np.zeros((batch, 1, seq, 2), dtype=np.float32)
        new[..., 0] = ids[:, None, :]
        new[..., 1] = pos[:, None, :]
        presents = []
        for name in output_names[1:]:
            past = feeds[name.replace("present", "past_key_values")]
            assert past.shape == (batch, 1, past_len, 2)
            assert past.dtype == np.float32 and past.flags.c_contiguous
            presents.append(np.concatenate([past, new], axis=2))
        logits = np.zeros((batch, 1, VOCAB), dtype=np.float32)
        cache = presents[0]
        for row in range(batch):
            visible = mask[row] == 1
            tokens = cache[row, 0, visible, 0].astype(np.int64)
            positions = cache[row, 0, visible, 1].astype(np.int64)
            assert (positions == np.arange(len(positions))).all(), positions
            logits[row, 0, next_token(tokens.tolist())] = 5.0
        with self.lock:
            self.calls.append((batch, seq, past_len))
        if self.delay_s or self.delay_per_token_s:
            time.sleep(self.delay_s + self.delay_per_token_s * batch * seq)
        return [logits, *presents]


class FakeInPlaceCausalLM(FakeCausalLM):
    """FakeCausalLM with the in-place graph's interface (workers/engine/inplace.py).

    The engine owns the cache: per layer and kind a buffer [batch, 1, capacity, 2], each
    row right-padded, that a call writes its new entries into, at the columns
    ONNX Runtime's GroupQueryAttention would (the row's length before the call onward).
    The same rules as the kernel: a call whose width is the longest total is a batch of
    fresh prompts (each row's tokens at its left), any other call of more than one token
    per row must be of one row. A row sees exactly its first `seqlens_k + 1` entries, whose
    positions must be 0..n-1, and its logits are read at `logits_index`, which must be
    its last new token's.
    """

    def run_in_place(
        self, feeds: Mapping[str, Any], kv: Sequence[np.ndarray], run_options: Any = None
    ) -> np.ndarray:
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            self.calls.append((-1, -1, -1))
            raise RuntimeError("injected model failure")
        ids = feeds["input_ids"]
        seqlens = feeds["seqlens_k"]
        total = feeds["total_sequence_length"]
        index = feeds["logits_index"]
        batch, seq = ids.shape
        assert ids.dtype == np.int64 and index.dtype == np.int64
        assert seqlens.dtype == total.dtype == np.int32 and total.shape == ()
        assert seqlens.shape == index.shape == (batch,)
        assert int(total) == int(seqlens.max()) + 1, (total, seqlens)
        assert len(kv) == 2 * self.num_layers
        cap = kv[0].shape[2]
        for buf in kv:
            assert buf.shape == (batch, 1, cap, 2), (buf.shape, batch, cap)
            assert buf.dtype == np.float32 and buf.flags.c_contiguous
        assert int(seqlens.max()) < cap, (seqlens, cap)
        first = seq == int(total)
        if not first and seq > 1:
            assert batch == 1, "batch_size must be 1 when sequence_length > 1 and past context"
        logits = np.zeros((batch, 1, VOCAB), dtype=np.float32)
        past_lens: list[int] = []
        for row in range(batch):
            length = int(seqlens[row]) + 1
            new = length if first else seq
            start = length - new
            past_lens.append(start)
            assert new <= seq
            assert int(index[row]) == row * seq + new - 1, (index, row, seq, new)
            for buf in kv:
                buf[row, 0, start:length, 0] = ids[row, :new]
                buf[row, 0, start:length, 1] = np.arange(start, length)
            tokens = kv[0][row, 0, :length, 0].astype(np.int64)
            positions = kv[0][row, 0, :length, 1].astype(np.int64)
            assert (positions == np.arange(length)).all(), positions
            assert (kv[-1][row, 0, :length] == kv[0][row, 0, :length]).all()
            logits[row, 0, next_token(tokens.tolist())] = 5.0
        with self.lock:
            self.calls.append((batch, seq, max(past_lens)))
        if self.delay_s or self.delay_per_token_s:
            time.sleep(self.delay_s + self.delay_per_token_s * batch * seq)
        return logits


class FakeEncoder:
    """Embeds an input as [number of tokens, sum of ids, 0...]: easy to check after the split."""

    def __init__(self, dims: int = 4, *, fail: bool = False) -> None:
        self.dims = dims
        self.fail = fail
        self.batches: list[tuple[int, int]] = []

    def run(self, output_names: Sequence[str], feeds: Mapping[str, Any]) -> list[np.ndarray]:
        if self.fail:
            raise RuntimeError("injected encoder failure")
        assert list(output_names) == ["sentence_embedding"]
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert (feeds["token_type_ids"] == 0).all()
        self.batches.append(ids.shape)
        out = np.zeros((ids.shape[0], self.dims), dtype=np.float32)
        out[:, 0] = mask.sum(axis=1)
        out[:, 1] = (ids * mask).sum(axis=1)
        return [out]


@dataclass
class RecordingSink:
    """Collects engine events in memory, in order, with the flush count."""

    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    flushes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The result an engine gave with each request's final event, by request id.
    results: dict[str, RequestResult] = field(default_factory=dict)

    def _add(self, kind: str, request_id: str, **fields: Any) -> None:
        with self.lock:
            self.events.append((kind, request_id, fields))

    def delta(
        self,
        request_id: str,
        text: str,
        tokens: int,
        index: int | None = None,
        logprobs: list[Any] | None = None,
    ) -> None:
        extra: dict[str, Any] = {}
        if index is not None:
            extra["index"] = index
        if logprobs is not None:
            extra["logprobs"] = list(logprobs)
        self._add("delta", request_id, text=text, tokens=tokens, **extra)

    def prompt_logprobs(self, request_id: str, logprobs: list[Any]) -> None:
        self._add("prompt_logprobs", request_id, logprobs=list(logprobs))

    def choice_done(
        self, request_id: str, index: int, finish_reason: str, completion_tokens: int
    ) -> None:
        self._add(
            "choice_done",
            request_id,
            index=index,
            finish_reason=finish_reason,
            completion_tokens=completion_tokens,
        )

    def done(
        self,
        request_id: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        cached_tokens: int = 0,
        result: RequestResult | None = None,
    ) -> None:
        self._settle(request_id, result)
        extra = {"cached_tokens": cached_tokens} if cached_tokens else {}
        self._add(
            "done",
            request_id,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            **extra,
        )

    def embeddings(
        self,
        request_id: str,
        vectors: np.ndarray,
        prompt_tokens: int,
        *,
        result: RequestResult | None = None,
    ) -> None:
        self._settle(request_id, result)
        self._add("embeddings", request_id, vectors=vectors.copy(), prompt_tokens=prompt_tokens)

    def error(
        self, request_id: str, code: str, message: str, *, result: RequestResult | None = None
    ) -> None:
        self._settle(request_id, result)
        self._add("error", request_id, code=code, message=message)

    def _settle(self, request_id: str, result: RequestResult | None) -> None:
        """Keeps the result an engine gave with a final event (what a real writer bills)."""
        if result is not None:
            with self.lock:
                self.results[request_id] = result

    def flush(self) -> None:
        with self.lock:
            self.flushes += 1

    def of(self, request_id: str) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return [(kind, f) for kind, rid, f in self.events if rid == request_id]

    def text(self, request_id: str, index: int | None = None) -> str:
        """The streamed text (of one choice, when `index` is given)."""
        return "".join(
            f["text"]
            for kind, f in self.of(request_id)
            if kind == "delta" and (index is None or f.get("index", 0) == index)
        )

    def count(self, request_id: str, kind: str) -> int:
        return sum(1 for k, _ in self.of(request_id) if k == kind)
