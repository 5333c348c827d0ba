"""Dynamic batching for embedding models: gather inputs briefly, run once, split back."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.contract import EmbedRequest, FinishReason
from workers.engine.base import EventSink, RateMeter, RequestHandle, RequestResult
from workers.engine.causal_lm import Session

if TYPE_CHECKING:
    from workers.runtime.models import LoadedModel

logger = logging.getLogger(__name__)

OUTPUT_NAME = "sentence_embedding"


class _Pending:
    __slots__ = ("arrived", "handle", "inputs", "request", "sink")

    def __init__(
        self, request: EmbedRequest, sink: EventSink, inputs: list[tuple[int, ...]]
    ) -> None:
        self.request = request
        self.sink = sink
        self.inputs = inputs
        self.handle = RequestHandle(request.request_id)
        self.arrived = time.monotonic()


class EncoderEngine:
    """One thread per encoder model that turns many small requests into few session runs.

    A batch closes when it holds `max_batch` inputs or when its oldest request
    has waited `max_wait_ms`: a lone request pays at most that much latency,
    while a burst fills whole batches. Inputs are sorted by length before they
    are cut into batches so that padding stays small.
    """

    def __init__(
        self,
        session: Session,
        *,
        dimensions: int,
        max_input_tokens: int,
        name: str = "encoder",
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        pad_token_id: int = 0,
    ) -> None:
        self.name = name
        self.max_batch = max(1, max_batch)
        self.dimensions = dimensions
        self._session = session
        self._max_input_tokens = max_input_tokens
        self._max_wait_s = max_wait_ms / 1000.0
        self._pad = pad_token_id
        inputs = getattr(session, "get_inputs", None)
        names = {i.name for i in inputs()} if inputs is not None else {"token_type_ids"}
        self._wants_token_types = "token_type_ids" in names
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._queued_inputs = 0
        self._stopping = False
        self.runs = 0
        self.meter = RateMeter()
        self._thread = threading.Thread(target=self._loop, name=f"encoder-{name}", daemon=True)

    @classmethod
    def from_model(cls, model: LoadedModel, *, max_batch: int, max_wait_ms: float) -> EncoderEngine:
        spec: Mapping[str, Any] = model.manifest["embedding"]
        pad = model.manifest.get("pad_token_id")
        return cls(
            model.session,
            dimensions=int(spec["dimensions"]),
            max_input_tokens=int(spec["max_input_tokens"]),
            name=model.ref.version_id,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            pad_token_id=int(pad) if pad is not None else 0,
        )

    def start(self) -> EncoderEngine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch - self._queued_inputs)

    def tokens_per_s(self) -> float:
        return self.meter.rate()

    def submit(self, request: EmbedRequest, sink: EventSink) -> RequestHandle:
        # The gateway truncates already; clamping again keeps a bad payload
        # from asking the model for more positions than it has.
        inputs = [tuple(ids[: self._max_input_tokens]) for ids in request.inputs]
        pending = _Pending(request, sink, inputs)
        if not inputs or any(not ids for ids in inputs):
            if pending.handle.claim():
                message = "every input needs at least one token"
                sink.error(request.request_id, "invalid_request", message)
                sink.flush()
                pending.handle.complete(
                    _result(pending, FinishReason.ERROR, 0.0, "invalid_request", message)
                )
            return pending.handle
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"engine {self.name} is stopped")
            self._queue.append(pending)
            self._queued_inputs += len(inputs)
            self._cond.notify()
        return pending.handle

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                break
            try:
                self._run(batch)
            except Exception:
                # The thread must survive: fail this batch and keep serving.
                logger.exception("encoder %s: batch failed", self.name)
                self._fail(batch, "internal_error", "the model failed on the input")
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for pending in left:
            self._fail([pending], "worker_shutdown", "the worker is shutting down")

    def _collect(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            close_at = self._queue[0].arrived + self._max_wait_s
            while self._queued_inputs < self.max_batch and not self._stopping:
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Pending] = []
            count = 0
            # Whole requests only; the first one is taken even if it alone is
            # larger than a batch (it is then run in several chunks).
            while self._queue and (
                not batch or count + len(self._queue[0].inputs) <= self.max_batch
            ):
                pending = self._queue.popleft()
                batch.append(pending)
                count += len(pending.inputs)
            self._queued_inputs -= count
            return batch

    def _run(self, batch: list[_Pending]) -> None:
        now = time.time()
        live: list[_Pending] = []
        for pending in batch:
            if pending.handle.claimed:
                continue
            if pending.request.deadline and pending.request.deadline < now:
                self._fail([pending], "deadline_exceeded", "the request deadline passed")
                continue
            live.append(pending)
        if not live:
            return
        items = [(p, j, ids) for p in live for j, ids in enumerate(p.inputs)]
        items.sort(key=lambda item: len(item[2]))
        outputs = {id(p): np.zeros((len(p.inputs), self.dimensions), np.float32) for p in live}
        started = time.time()
        try:
            for start in range(0, len(items), self.max_batch):
                chunk = items[start : start + self.max_batch]
                vectors = self._embed([ids for _, _, ids in chunk])
                for (p, j, _), vector in zip(chunk, vectors, strict=True):
                    outputs[id(p)][j] = vector
        except Exception:
            logger.exception("encoder %s: batch of %d inputs failed", self.name, len(items))
            self._fail(live, "internal_error", "the model failed on the input")
            return
        answered = [p for p in live if p.handle.claim()]
        tokens = 0
        for pending in answered:
            prompt_tokens = sum(len(ids) for ids in pending.inputs)
            tokens += prompt_tokens
            pending.sink.embeddings(pending.request.request_id, outputs[id(pending)], prompt_tokens)
        self.meter.add(tokens)
        self._flush_and_complete(answered, FinishReason.STOP, started)

    def _embed(self, inputs: list[tuple[int, ...]]) -> np.ndarray:
        width = max(len(ids) for ids in inputs)
        ids = np.full((len(inputs), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(inputs), width), dtype=np.int64)
        for row, seq in enumerate(inputs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._wants_token_types:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (vectors,) = self._session.run([OUTPUT_NAME], feeds)
        self.runs += 1
        return np.asarray(vectors, dtype=np.float32)

    def _fail(self, batch: list[_Pending], code: str, message: str) -> None:
        failed = [p for p in batch if p.handle.claim()]
        for pending in failed:
            pending.sink.error(pending.request.request_id, code, message)
        self._flush_and_complete(failed, FinishReason.ERROR, 0.0, code, message)

    def _flush_and_complete(
        self,
        batch: list[_Pending],
        reason: FinishReason,
        started: float,
        code: str = "",
        message: str = "",
    ) -> None:
        sinks = {id(p.sink): p.sink for p in batch}
        for sink in sinks.values():
            try:
                sink.flush()
            except Exception:
                logger.exception("encoder %s: writing events failed", self.name)
        for pending in batch:
            pending.handle.complete(_result(pending, reason, started, code, message))


def _result(
    pending: _Pending, reason: FinishReason, started: float, code: str = "", message: str = ""
) -> RequestResult:
    return RequestResult(
        finish_reason=reason.value,
        prompt_tokens=sum(len(ids) for ids in pending.inputs),
        completion_tokens=0,
        admitted_at=started,
        finished_at=time.time(),
        error_code=code,
        error_message=message,
    )
