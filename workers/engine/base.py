"""What every engine shares: the event sink, request handles and a throughput meter."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class EventSink(Protocol):
    """Where an engine writes a request's events (`streams.ResponseWriter` in a worker).

    Writes may be buffered; the engine calls `flush` once per step for every
    sink it wrote to, so one step of a whole batch costs one round trip. The
    events and their fields are those of `workers/contract.py`.
    """

    def delta(
        self,
        request_id: str,
        text: str,
        tokens: int,
        index: int | None = None,
        logprobs: list[Any] | None = None,
    ) -> None:
        """`index`: the choice, only when a request has several; `logprobs`: the entries
        (`contract.logprob_entry`) of the tokens since the choice's last delta, only when
        the request asked for them."""

    def prompt_logprobs(self, request_id: str, logprobs: list[Any]) -> None: ...

    def choice_done(
        self, request_id: str, index: int, finish_reason: str, completion_tokens: int
    ) -> None: ...

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
        """`cached_tokens`: the prompt tokens served from the prefix cache. `result`: how the
        request ended, given with every final event (done, embeddings, error) of a request
        the engine ran, so that a writer can bill it in the same write
        (`streams.ResponseWriter.bill_with_final`)."""

    def embeddings(
        self,
        request_id: str,
        vectors: np.ndarray,
        prompt_tokens: int,
        *,
        result: RequestResult | None = None,
    ) -> None: ...

    def error(
        self, request_id: str, code: str, message: str, *, result: RequestResult | None = None
    ) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RequestResult:
    """How a request ended, for its usage event and for tests."""

    finish_reason: str  # a `FinishReason` value
    prompt_tokens: int
    completion_tokens: int
    admitted_at: float  # unix time the engine started computing it (0 if it never did)
    finished_at: float
    first_token_at: float = 0.0
    admitted_step: int = -1  # engine step counters, so tests can reason about overlap
    finished_step: int = -1
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error_code: str = ""
    error_message: str = ""
    # Compute time charged to this request when it shared a run with others
    # (its part of the run); None: the whole span from admitted_at to finished_at.
    compute_s: float | None = None

    @property
    def ran(self) -> bool:
        return self.admitted_at > 0


class RequestHandle:
    """The submitter's side of a request that an engine runs.

    Exactly one party finishes a request: `claim()` is the race between the
    engine finishing it and the submitting task giving up on it, and only the
    winner writes the final events.
    """

    __slots__ = ("_claimed", "_done", "_lock", "request_id", "result")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.result: RequestResult | None = None
        self._claimed = False
        self._lock = threading.Lock()
        self._done = threading.Event()

    def claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    @property
    def claimed(self) -> bool:
        return self._claimed

    def complete(self, result: RequestResult) -> None:
        """Publish the result (after its events were flushed) and wake the submitter."""
        self.result = result
        self._done.set()

    def wait(self, timeout: float | None = None) -> RequestResult | None:
        self._done.wait(timeout)
        return self.result


class RateMeter:
    """Tokens per second over a sliding window, for the heartbeat."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, count: int, now: float | None = None) -> None:
        if count <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, count))
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._events) / self._window_s

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self._window_s:
            self._events.popleft()
