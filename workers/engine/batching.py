"""Dynamic batching: gather requests briefly on one engine thread, run them in few session calls."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Generic, TypeVar

from workers.contract import FinishReason
from workers.engine.base import EventSink, RateMeter, RequestHandle, RequestResult
from workers.engine.priority import is_batch

logger = logging.getLogger(__name__)


class Pending:
    """One submitted request waiting in (or running on) a batching engine.

    `size` is what it weighs against the batch limit: inputs for an encoder,
    rows of the batch dimension for a tensor model. `batch`: a batch line (tensor
    requests have no class and are online).
    """

    __slots__ = ("arrived", "batch", "handle", "request", "sink", "size")

    def __init__(self, request: Any, sink: EventSink, size: int) -> None:
        self.request = request
        self.sink = sink
        self.size = size
        self.batch = is_batch(getattr(request, "service_class", ""))
        self.handle = RequestHandle(request.request_id)
        self.arrived = time.monotonic()


_P = TypeVar("_P", bound=Pending)


class DynamicBatcher(Generic[_P]):
    """One thread per model version that turns many small requests into few session runs.

    A batch closes when it weighs `max_batch` or when its oldest request has
    waited `max_wait_ms`: a lone request pays at most that much latency, while
    a burst fills whole batches. Only whole requests join a batch; the first one
    is taken even when it alone weighs more than a batch. Subclasses say how a
    batch runs (`_run`) and what a request's result is (`_result`); exactly one
    party finishes each request (`RequestHandle.claim`).

    Online requests go into a batch before batch lines, whatever their arrival
    order; batch lines fill what room is left. A run is never interrupted, so an
    online request that arrives during one waits for it (a batch line with many
    inputs runs as several session calls in one run).
    """

    def __init__(self, *, name: str, max_batch: int, max_wait_ms: float) -> None:
        self.name = name
        self.max_batch = max(1, max_batch)
        self._max_wait_s = max_wait_ms / 1000.0
        self._cond = threading.Condition()
        # Waiting requests by class, each in arrival order: online ones go first.
        self._queue: deque[_P] = deque()
        self._batch_queue: deque[_P] = deque()
        self._queued = 0
        self._stopping = False
        self.runs = 0  # session runs so far (tests reason about batching with it)
        self.meter = RateMeter()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> DynamicBatcher[_P]:
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
        return max(0, self.max_batch - self._queued)

    def tokens_per_s(self) -> float:
        return self.meter.rate()

    # --- for subclasses -------------------------------------------------------------

    def _enqueue(self, pending: _P) -> RequestHandle:
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"engine {self.name} is stopped")
            (self._batch_queue if pending.batch else self._queue).append(pending)
            self._queued += pending.size
            self._cond.notify()
        return pending.handle

    def _refuse(self, pending: _P, code: str, message: str) -> RequestHandle:
        """Answers a request that cannot run at all, without queueing it."""
        self._fail([pending], code, message)
        return pending.handle

    def _run(self, batch: list[_P]) -> None:
        raise NotImplementedError

    def _result(
        self, pending: _P, reason: FinishReason, started: float, code: str, message: str
    ) -> RequestResult:
        raise NotImplementedError

    def _live(self, batch: list[_P]) -> list[_P]:
        """The requests of a batch still worth running: unclaimed and before their deadline."""
        now = time.time()
        live: list[_P] = []
        for pending in batch:
            if pending.handle.claimed:
                continue
            deadline = getattr(pending.request, "deadline", 0.0)
            if deadline and deadline < now:
                self._fail([pending], "deadline_exceeded", "the request deadline passed")
                continue
            live.append(pending)
        return live

    def _fail(self, batch: list[_P], code: str, message: str) -> None:
        failed = [
            (p, self._result(p, FinishReason.ERROR, 0.0, code, message))
            for p in batch
            if p.handle.claim()
        ]
        for pending, result in failed:
            pending.sink.error(pending.request.request_id, code, message, result=result)
        self._flush_and_complete(failed)

    def _flush_and_complete(self, finished: list[tuple[_P, RequestResult]]) -> None:
        """One flush per sink for the whole batch, then every submitter is woken. Each
        result went with its request's final event (`EventSink.done`'s `result`)."""
        sinks = {id(p.sink): p.sink for p, _ in finished}
        for sink in sinks.values():
            try:
                sink.flush()
            except Exception:
                logger.exception("engine %s: writing events failed", self.name)
        for pending, result in finished:
            pending.handle.complete(result)

    # --- the engine thread ----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                break
            try:
                self._run(batch)
            except Exception:
                # The thread must survive: fail this batch and keep serving.
                logger.exception("engine %s: batch failed", self.name)
                self._fail(batch, "internal_error", "the model failed on the input")
        with self._cond:
            left = [*self._queue, *self._batch_queue]
            self._queue.clear()
            self._batch_queue.clear()
        self._fail(left, "worker_shutdown", "the worker is shutting down")

    def _collect(self) -> list[_P] | None:
        with self._cond:
            while not self._queue and not self._batch_queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            oldest = min(q[0].arrived for q in (self._queue, self._batch_queue) if q)
            close_at = oldest + self._max_wait_s
            while self._queued < self.max_batch and not self._stopping:
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_P] = []
            weight = 0
            for queue in (self._queue, self._batch_queue):
                while queue and (not batch or weight + queue[0].size <= self.max_batch):
                    pending = queue.popleft()
                    batch.append(pending)
                    weight += pending.size
            self._queued -= weight
            return batch
