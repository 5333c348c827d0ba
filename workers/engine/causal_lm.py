"""Continuous batching for causal language models over one ONNX Runtime session."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from workers.contract import FinishReason, GenerateRequest, cancel_key
from workers.engine.base import EventSink, RateMeter, RequestHandle, RequestResult
from workers.engine.sampling import penalize, sample_token
from workers.engine.text import IncrementalDetokenizer, StopFilter

if TYPE_CHECKING:
    import redis

    from workers.runtime.models import LoadedModel

logger = logging.getLogger(__name__)

CANCEL_CHECK_INTERVAL_S = 0.05


class Session(Protocol):
    """The part of `onnxruntime.InferenceSession` the engine uses (tests pass a fake)."""

    def run(self, output_names: Sequence[str], input_feed: Mapping[str, Any]) -> Sequence[Any]: ...


@dataclass(frozen=True, slots=True)
class CausalLMSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    pad_token_id: int
    context_length: int

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> CausalLMSpec:
        lm = manifest["causal_lm"]
        eos = frozenset(int(i) for i in manifest.get("eos_token_ids") or ())
        pad = manifest.get("pad_token_id")
        return cls(
            num_layers=int(lm["num_layers"]),
            num_kv_heads=int(lm["num_kv_heads"]),
            head_dim=int(lm["head_dim"]),
            vocab_size=int(lm["vocab_size"]),
            eos_token_ids=eos,
            # Pad ids sit under mask 0, so any valid id works; the EOS id is the usual choice.
            pad_token_id=int(pad if pad is not None else min(eos, default=0)),
            context_length=int(manifest.get("context_length") or 2048),
        )


@dataclass(frozen=True, slots=True)
class _Publication:
    sinks: list[EventSink]
    completed: list[tuple[RequestHandle, RequestResult]]


class _Seq:
    """One request inside the engine: its sampling state and streaming state."""

    __slots__ = (
        "admitted_at",
        "admitted_step",
        "counts",
        "detok",
        "first_token_at",
        "generated",
        "greedy",
        "handle",
        "penalized",
        "prompt_len",
        "request",
        "rng",
        "sink",
        "stops",
        "unreported_tokens",
    )

    def __init__(
        self,
        request: GenerateRequest,
        sink: EventSink,
        decode: Callable[[Sequence[int]], str],
    ) -> None:
        self.request = request
        self.sink = sink
        self.handle = RequestHandle(request.request_id)
        self.prompt_len = len(request.prompt_token_ids)
        self.greedy = request.sampling.temperature <= 0.0
        # One generator per sequence: with a seed, the draws of this request do
        # not depend on which other requests happen to share its batch.
        self.rng = np.random.default_rng(request.sampling.seed)
        self.generated: list[int] = []
        sampling = request.sampling
        self.penalized = sampling.frequency_penalty != 0.0 or sampling.presence_penalty != 0.0
        self.counts: dict[int, int] = {}  # generated token -> times, kept when penalized
        self.detok = IncrementalDetokenizer(decode)
        self.stops = StopFilter(request.sampling.stop)
        self.unreported_tokens = 0
        self.admitted_at = 0.0
        self.first_token_at = 0.0
        self.admitted_step = -1


class CausalLMEngine:
    """Runs every in-flight generation of one model version as one batch.

    A single engine thread owns the session and the batch state. Between two
    decode steps it admits waiting sequences: their prompts are prefilled
    together (left-padded), and their KV cache is merged into the running
    batch by left-padding both sides to a common length and concatenating on
    the batch axis. Finished sequences are sliced out, and leading columns that
    are padding for every remaining row are trimmed. The KV cache is copied
    only when the composition of the batch changes; a plain decode step feeds
    the previous step's `present` tensors straight back as `past`.

    Padding is invisible to the model: padded positions are masked out of
    attention, and each row carries its own position ids, so a sequence's
    tokens do not depend on its neighbours (up to float rounding).
    """

    def __init__(
        self,
        session: Session,
        spec: CausalLMSpec,
        decode: Callable[[Sequence[int]], str],
        *,
        name: str = "causal-lm",
        max_batch: int = 32,
        max_prefill_tokens: int = 4096,
        redis_client: redis.Redis | None = None,
        cancel_check_interval_s: float = CANCEL_CHECK_INTERVAL_S,
    ) -> None:
        self.name = name
        self.spec = spec
        self.max_batch = max(1, max_batch)
        self._session = session
        self._decode = decode
        self._max_prefill_tokens = max_prefill_tokens
        self._redis = redis_client
        self._cancel_interval = cancel_check_interval_s
        self._past_names = [
            f"past_key_values.{i}.{kind}"
            for i in range(spec.num_layers)
            for kind in ("key", "value")
        ]
        self._output_names = ["logits"] + [
            f"present.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")
        ]
        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._stopping = False
        # Batch state, owned by the engine thread. Row r of every array is _running[r].
        self._running: list[_Seq] = []
        self._admitting: list[_Seq] = []  # popped from the queue, not yet in the batch
        self._past: list[np.ndarray] = []  # [B, kv_heads, P, head_dim] per layer and key/value
        self._mask = np.zeros((0, 0), dtype=np.int64)  # [B, P]: 1 where the cache holds a token
        self._next_ids = np.zeros(0, dtype=np.int64)  # [B]: token to feed at the next step
        self._next_pos = np.zeros(0, dtype=np.int64)  # [B]: its position id
        self.step = 0  # session runs so far (prefills and decodes)
        self._last_cancel_check = 0.0
        self._dirty_sinks: dict[int, EventSink] = {}
        self._to_complete: list[tuple[RequestHandle, RequestResult]] = []
        self._published: queue.SimpleQueue[_Publication | None] = queue.SimpleQueue()
        self.meter = RateMeter()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._publisher = threading.Thread(
            target=self._publish_loop, name=f"engine-{name}-publish", daemon=True
        )

    @classmethod
    def from_model(
        cls,
        model: LoadedModel,
        *,
        max_batch: int,
        max_prefill_tokens: int,
        redis_client: redis.Redis | None,
    ) -> CausalLMEngine:
        tokenizer = model.text_tokenizer()

        def decode(ids: Sequence[int]) -> str:
            return tokenizer.decode(list(ids), skip_special_tokens=True)

        return cls(
            model.session,
            CausalLMSpec.from_manifest(model.manifest),
            decode,
            name=model.ref.version_id,
            max_batch=max_batch,
            max_prefill_tokens=max_prefill_tokens,
            redis_client=redis_client,
        )

    # --- the submitters' side (any thread) ------------------------------------

    def start(self) -> CausalLMEngine:
        self._publisher.start()
        self._thread.start()
        return self

    def submit(self, request: GenerateRequest, sink: EventSink) -> RequestHandle:
        seq = _Seq(request, sink, self._decode)
        problem = self._check_request(request)
        if problem:
            if seq.handle.claim():
                sink.error(request.request_id, "invalid_request", problem)
                sink.flush()
                seq.handle.complete(
                    self._result(seq, FinishReason.ERROR, "invalid_request", problem)
                )
            return seq.handle
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"engine {self.name} is stopped")
            self._waiting.append(seq)
            self._cond.notify()
        return seq.handle

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._publisher.is_alive():
            self._published.put(None)
            self._publisher.join(timeout)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch - len(self._running) - len(self._waiting))

    def tokens_per_s(self) -> float:
        return self.meter.rate()

    def _check_request(self, request: GenerateRequest) -> str:
        if not request.prompt_token_ids:
            return "the prompt is empty"
        if len(request.prompt_token_ids) >= self.spec.context_length:
            return (
                f"the prompt has {len(request.prompt_token_ids)} tokens; "
                f"this model's context is {self.spec.context_length}"
            )
        if request.sampling.max_tokens < 1:
            return "max_tokens must be at least 1"
        if any(not 0 <= t < self.spec.vocab_size for t in request.prompt_token_ids):
            return "the prompt has token ids outside the vocabulary"
        return ""

    # --- the engine thread ----------------------------------------------------

    def _loop(self) -> None:
        logger.info("engine %s started (max batch %d)", self.name, self.max_batch)
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception:
                # Never let the thread die with requests in it: every client
                # gets an error event instead of a stream that hangs.
                logger.exception("engine %s: step failed; failing the whole batch", self.name)
                self._fail_running("internal_error", "the model failed while generating")
            self._publish()
        self._shutdown()

    def _iteration(self) -> None:
        now = time.time()
        if now - self._last_cancel_check >= self._cancel_interval:
            self._last_cancel_check = now
            self._sweep(now)
        self._admit()
        if self._running:
            self._decode_step()

    def _sweep(self, now: float) -> None:
        """Drop cancelled, expired and abandoned requests, running or waiting."""
        with self._cond:
            waiting = list(self._waiting)
        seqs = self._running + waiting
        if not seqs:
            return
        cancelled: set[int] = set()
        if self._redis is not None:
            try:
                flags = self._redis.mget([cancel_key(s.request.request_id) for s in seqs])
                cancelled = {i for i, flag in enumerate(flags) if flag}
            except Exception:
                logger.warning("engine %s: cancellation check failed", self.name, exc_info=True)
        dropped: set[int] = set()
        for i, seq in enumerate(seqs):
            if seq.handle.claimed:  # the submitter gave up and already answered
                dropped.add(id(seq))
            elif i in cancelled:
                self._finish(seq, FinishReason.CANCELLED)
                dropped.add(id(seq))
            elif seq.request.deadline and seq.request.deadline < now:
                self._fail(seq, "deadline_exceeded", "the request deadline passed")
                dropped.add(id(seq))
        if not dropped:
            return
        with self._cond:
            self._waiting = deque(s for s in self._waiting if id(s) not in dropped)
        keep = [r for r, s in enumerate(self._running) if id(s) not in dropped]
        if len(keep) != len(self._running):
            self._compact(keep)

    def _admit(self) -> None:
        with self._cond:
            capacity = self.max_batch - len(self._running)
            batch: list[_Seq] = []
            longest = 0
            while self._waiting and len(batch) < capacity:
                n = self._waiting[0].prompt_len
                # Bound the padded prefill size: one huge prefill would stall
                # every running stream and could exhaust memory.
                if batch and (len(batch) + 1) * max(longest, n) > self._max_prefill_tokens:
                    break
                batch.append(self._waiting.popleft())
                longest = max(longest, n)
        if not batch:
            return
        self._admitting = batch
        try:
            logits, presents, mask = self._prefill(batch)
        except Exception:
            logger.exception("engine %s: prefill of %d sequences failed", self.name, len(batch))
            for seq in batch:
                self._fail(seq, "internal_error", "the model failed on the prompt")
            self._admitting = []
            return
        now = time.time()
        tokens = self._sample(logits, batch)
        keep: list[int] = []
        for row, seq in enumerate(batch):
            seq.admitted_at = seq.first_token_at = now
            seq.admitted_step = self.step
            if not self._accept(seq, int(tokens[row])):
                keep.append(row)
        self.meter.add(len(batch))
        if not keep:
            self._admitting = []
            return
        prompt_lens = np.array([batch[r].prompt_len for r in keep], dtype=np.int64)
        self._merge(
            [batch[r] for r in keep],
            [p[keep] if len(keep) != len(batch) else p for p in presents],
            mask[keep],
            tokens[keep],
            prompt_lens,
        )
        self._admitting = []

    def _prefill(self, batch: list[_Seq]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        n = len(batch)
        width = max(s.prompt_len for s in batch)
        ids = np.full((n, width), self.spec.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for row, seq in enumerate(batch):
            ids[row, width - seq.prompt_len :] = seq.request.prompt_token_ids
            mask[row, width - seq.prompt_len :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = np.zeros((n, self.spec.num_kv_heads, 0, self.spec.head_dim), dtype=np.float32)
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
        }
        for name in self._past_names:
            feeds[name] = empty
        outputs = self._session.run(self._output_names, feeds)
        self.step += 1
        return outputs[0][:, -1, :], list(outputs[1:]), mask

    def _merge(
        self,
        seqs: list[_Seq],
        presents: list[np.ndarray],
        mask: np.ndarray,
        next_ids: np.ndarray,
        next_pos: np.ndarray,
    ) -> None:
        """Append prefilled sequences to the running batch (one copy of the cache)."""
        if not self._running:
            self._running = seqs
            self._past = presents
            self._mask = mask
            self._next_ids = next_ids
            self._next_pos = next_pos
            return
        old_b, old_len = self._mask.shape
        new_b, new_len = mask.shape
        width = max(old_len, new_len)
        merged: list[np.ndarray] = []
        for old, new in zip(self._past, presents, strict=True):
            out = np.zeros((old_b + new_b, old.shape[1], width, old.shape[3]), dtype=old.dtype)
            out[:old_b, :, width - old_len :] = old
            out[old_b:, :, width - new_len :] = new
            merged.append(out)
        merged_mask = np.zeros((old_b + new_b, width), dtype=np.int64)
        merged_mask[:old_b, width - old_len :] = self._mask
        merged_mask[old_b:, width - new_len :] = mask
        self._running = self._running + seqs
        self._past = merged
        self._mask = merged_mask
        self._next_ids = np.concatenate([self._next_ids, next_ids])
        self._next_pos = np.concatenate([self._next_pos, next_pos])

    def _decode_step(self) -> None:
        batch = len(self._running)
        mask = np.concatenate([self._mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds: dict[str, np.ndarray] = {
            "input_ids": self._next_ids[:, None],
            "attention_mask": mask,
            "position_ids": self._next_pos[:, None],
        }
        for name, past in zip(self._past_names, self._past, strict=True):
            feeds[name] = past
        outputs = self._session.run(self._output_names, feeds)
        self.step += 1
        self._past = list(outputs[1:])
        self._mask = mask
        self._next_pos = self._next_pos + 1
        tokens = self._sample(outputs[0][:, -1, :], self._running)
        self._next_ids = tokens
        keep = [r for r, seq in enumerate(self._running) if not self._accept(seq, int(tokens[r]))]
        self.meter.add(batch)
        if len(keep) != batch:
            self._compact(keep)

    def _compact(self, keep: list[int]) -> None:
        """Slice finished rows out and trim columns that are padding for every row left."""
        if not keep:
            self._running = []
            self._past = []
            self._mask = np.zeros((0, 0), dtype=np.int64)
            self._next_ids = np.zeros(0, dtype=np.int64)
            self._next_pos = np.zeros(0, dtype=np.int64)
            return
        mask = self._mask[keep]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if used.size else mask.shape[1]
        rows = np.asarray(keep)
        # Fancy indexing on the batch axis plus a slice on the sequence axis is
        # one contiguous copy per tensor, which is what the session wants.
        self._past = [p[rows, :, start:] for p in self._past]
        self._mask = np.ascontiguousarray(mask[:, start:])
        self._running = [self._running[r] for r in keep]
        self._next_ids = self._next_ids[rows]
        self._next_pos = self._next_pos[rows]

    def _sample(self, logits: np.ndarray, seqs: Sequence[_Seq]) -> np.ndarray:
        tokens: np.ndarray = np.argmax(logits, axis=-1).astype(np.int64)
        for row, seq in enumerate(seqs):
            if seq.greedy and not seq.penalized:
                continue
            params = seq.request.sampling
            scores = logits[row]
            if seq.penalized:
                scores = penalize(
                    scores,
                    seq.counts,
                    frequency=params.frequency_penalty,
                    presence=params.presence_penalty,
                )
            tokens[row] = sample_token(
                scores, temperature=params.temperature, top_p=params.top_p, rng=seq.rng
            )
        return tokens

    def _accept(self, seq: _Seq, token: int) -> bool:
        """Take one generated token; emit its text; return whether the sequence finished."""
        seq.generated.append(token)
        if seq.penalized:
            seq.counts[token] = seq.counts.get(token, 0) + 1
        seq.unreported_tokens += 1
        if token in self.spec.eos_token_ids:
            self._finish(seq, FinishReason.STOP)
            return True
        text = seq.detok.push(token)
        if text:
            self._emit(seq, seq.stops.push(text))
            if seq.stops.matched:
                self._finish(seq, FinishReason.STOP)
                return True
        if len(seq.generated) >= seq.request.sampling.max_tokens:
            self._finish(seq, FinishReason.LENGTH)
            return True
        if seq.prompt_len + len(seq.generated) >= self.spec.context_length:
            self._finish(seq, FinishReason.LENGTH)
            return True
        return False

    def _emit(self, seq: _Seq, text: str) -> None:
        if not text:
            return
        seq.sink.delta(seq.request.request_id, text, seq.unreported_tokens)
        seq.unreported_tokens = 0
        self._dirty_sinks[id(seq.sink)] = seq.sink

    def _finish(self, seq: _Seq, reason: FinishReason) -> None:
        if not seq.handle.claim():
            return
        if reason is not FinishReason.CANCELLED:
            # Release what was held back: a trailing partial character, or text
            # that looked like the start of a stop string but never became one.
            tail = seq.stops.push(seq.detok.finish())
            if seq.stops.matched:
                reason = FinishReason.STOP
            self._emit(seq, tail + seq.stops.finish())
        rid = seq.request.request_id
        seq.sink.done(rid, reason.value, seq.prompt_len, len(seq.generated))
        self._dirty_sinks[id(seq.sink)] = seq.sink
        self._to_complete.append((seq.handle, self._result(seq, reason)))

    def _fail(self, seq: _Seq, code: str, message: str) -> None:
        if not seq.handle.claim():
            return
        seq.sink.error(seq.request.request_id, code, message)
        self._dirty_sinks[id(seq.sink)] = seq.sink
        self._to_complete.append((seq.handle, self._result(seq, FinishReason.ERROR, code, message)))

    def _result(
        self, seq: _Seq, reason: FinishReason, code: str = "", message: str = ""
    ) -> RequestResult:
        return RequestResult(
            finish_reason=reason.value,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.generated),
            admitted_at=seq.admitted_at,
            finished_at=time.time(),
            first_token_at=seq.first_token_at,
            admitted_step=seq.admitted_step,
            finished_step=self.step,
            error_code=code,
            error_message=message,
        )

    def _fail_running(self, code: str, message: str) -> None:
        for seq in self._admitting + self._running:
            self._fail(seq, code, message)
        self._admitting = []
        self._compact([])

    def _publish(self) -> None:
        """Hand this step's events to the publisher thread and go on computing.

        Writing to Redis takes a round trip per step; done on the engine thread
        it would add to every step, while the publisher overlaps it with the
        next session run (which releases the GIL). One publisher per engine
        keeps the steps in order.
        """
        if not self._dirty_sinks and not self._to_complete:
            return
        sinks, self._dirty_sinks = self._dirty_sinks, {}
        completed, self._to_complete = self._to_complete, []
        self._published.put(_Publication(list(sinks.values()), completed))

    def _publish_loop(self) -> None:
        while (publication := self._published.get()) is not None:
            for sink in publication.sinks:
                try:
                    sink.flush()
                except Exception:
                    logger.exception("engine %s: writing events failed", self.name)
            # Only after the flush: a task never reports a request as finished
            # (and acknowledges its message) before its final events are in Redis.
            for handle, result in publication.completed:
                handle.complete(result)

    def _shutdown(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for seq in waiting:
            self._fail(seq, "worker_shutdown", "the worker is shutting down")
        self._fail_running("worker_shutdown", "the worker is shutting down")
        self._publish()
        logger.info("engine %s stopped", self.name)
