"""Dynamic batching of embedding requests over a numpy stand-in for the encoder."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from tests.workers.fakes_support import FakeEncoder, RecordingSink
from workers.contract import BillingIdentity, EmbedRequest, ModelRef
from workers.engine import batching
from workers.engine.encoder import EncoderEngine

IDENTITY = BillingIdentity("org", "proj", "key", "ep", "mv", "fake-embed")
MODEL = ModelRef("mv-e", "onnx-encoder", "0" * 64, "/nonexistent")


def embed_request(
    rid: str,
    inputs: Sequence[Sequence[int]],
    deadline: float | None = None,
    service_class: str = "online",
) -> EmbedRequest:
    return EmbedRequest(
        request_id=rid,
        model=MODEL,
        identity=IDENTITY,
        inputs=tuple(tuple(i) for i in inputs),
        deadline=time.time() + 60 if deadline is None else deadline,
        service_class=service_class,
    )


@pytest.fixture
def engines() -> Iterator[list[EncoderEngine]]:
    started: list[EncoderEngine] = []
    yield started
    for engine in started:
        engine.stop()


class BatcherClock:
    """The batcher's monotonic clock, moved only by the batcher's own timed waits: how long
    a batch was held open is then exactly what it waited, whatever the machine's speed."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:  # request deadlines stay on the real clock
        return time.time()


class ClockedCondition(threading.Condition):
    """A timed wait returns at once with the clock moved on by its timeout (no one notifies
    a batcher holding a batch open in these tests); an untimed one really waits."""

    def __init__(self, clock: BatcherClock) -> None:
        super().__init__()
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            return super().wait()
        self.clock.waits.append(timeout)
        self.clock.now += timeout
        return False


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> BatcherClock:
    clock = BatcherClock()
    monkeypatch.setattr(batching, "time", clock)
    return clock


def start(
    engines: list[EncoderEngine],
    session: FakeEncoder,
    clock: BatcherClock | None = None,
    **kwargs: object,
) -> EncoderEngine:
    options: dict[str, object] = {"dimensions": 4, "max_input_tokens": 8, **kwargs}
    engine = EncoderEngine(session, **options)  # type: ignore[arg-type]
    if clock is not None:
        engine._cond = ClockedCondition(clock)  # before its thread first waits
    engines.append(engine.start())
    return engine


def test_concurrent_requests_share_one_run_and_split_back(engines: list[EncoderEngine]) -> None:
    session = FakeEncoder()
    engine = start(engines, session, max_wait_ms=100)
    sink = RecordingSink()
    requests = [
        embed_request("a", [[1, 2, 3]]),
        embed_request("b", [[4], [5, 6]]),
        embed_request("c", [[7, 7, 7, 7, 7], [1], [2, 2]]),
    ]
    handles = [engine.submit(r, sink) for r in requests]
    for h in handles:
        assert h.wait(5) is not None
    assert session.batches == [(6, 5)]  # six inputs, padded to the longest
    for r, h in zip(requests, handles, strict=True):
        assert sink.results[r.request_id] is h.result  # given with the final event
        ((kind, fields),) = sink.of(r.request_id)
        assert kind == "embeddings"
        expected = np.array([[len(i), sum(i), 0, 0] for i in r.inputs], dtype=np.float32)
        np.testing.assert_array_equal(fields["vectors"], expected)
        assert fields["prompt_tokens"] == sum(len(i) for i in r.inputs)


def test_a_lone_request_waits_at_most_max_wait(
    engines: list[EncoderEngine], clock: BatcherClock
) -> None:
    session = FakeEncoder()
    engine = start(engines, session, clock, max_wait_ms=20)
    assert engine.submit(embed_request("a", [[1]]), RecordingSink()).wait(5) is not None
    # Held open for max_wait on the batcher's clock, then run alone.
    assert sum(clock.waits) == pytest.approx(0.020)
    assert session.batches == [(1, 1)]


def test_a_full_batch_does_not_wait(engines: list[EncoderEngine], clock: BatcherClock) -> None:
    session = FakeEncoder()
    engine = start(engines, session, clock, max_wait_ms=5_000, max_batch=4)
    result = engine.submit(embed_request("a", [[1]] * 4), RecordingSink()).wait(5)
    assert result is not None
    assert clock.waits == []  # closed the moment it was full: no timed wait at all
    assert session.batches == [(4, 1)]


def test_a_request_larger_than_a_batch_runs_in_chunks(engines: list[EncoderEngine]) -> None:
    session = FakeEncoder()
    engine = start(engines, session, max_batch=4, max_wait_ms=1)
    sink = RecordingSink()
    inputs = [[i + 1] * (1 + i % 3) for i in range(10)]
    assert engine.submit(embed_request("big", inputs), sink).wait(5) is not None
    assert [b for b, _ in session.batches] == [4, 4, 2]
    ((_, fields),) = sink.of("big")
    np.testing.assert_array_equal(fields["vectors"][:, 0], [len(i) for i in inputs])
    np.testing.assert_array_equal(fields["vectors"][:, 1], [sum(i) for i in inputs])


def test_inputs_are_clamped_to_the_model_limit(engines: list[EncoderEngine]) -> None:
    session = FakeEncoder()
    engine = start(engines, session, max_input_tokens=8, max_wait_ms=1)
    sink = RecordingSink()
    result = engine.submit(embed_request("long", [[1] * 30]), sink).wait(5)
    assert result is not None and result.prompt_tokens == 8
    assert session.batches == [(1, 8)]


def test_expired_and_failed_requests_get_errors(engines: list[EncoderEngine]) -> None:
    sink = RecordingSink()
    engine = start(engines, FakeEncoder(), max_wait_ms=1)
    late = engine.submit(embed_request("late", [[1]], deadline=time.time() - 1), sink).wait(5)
    assert late is not None and late.error_code == "deadline_exceeded"
    assert [k for k, _ in sink.of("late")] == ["error"]
    assert sink.results["late"] is late  # given with the final event

    broken = start(engines, FakeEncoder(fail=True), max_wait_ms=1)
    failed = broken.submit(embed_request("x", [[1]]), sink).wait(5)
    assert failed is not None and failed.error_code == "internal_error"
    assert [k for k, _ in sink.of("x")] == ["error"]
    assert sink.results["x"] is failed


def test_empty_input_is_refused(engines: list[EncoderEngine]) -> None:
    session = FakeEncoder()
    engine = start(engines, session)
    sink = RecordingSink()
    result = engine.submit(embed_request("e", [[1], []]), sink).wait(1)
    assert result is not None and result.error_code == "invalid_request"
    assert session.batches == []


def test_many_threads_submitting(engines: list[EncoderEngine]) -> None:
    session = FakeEncoder()
    engine = start(engines, session, max_batch=8, max_wait_ms=10)
    sink = RecordingSink()
    results: dict[int, object] = {}

    def worker(i: int) -> None:
        results[i] = engine.submit(embed_request(f"t{i}", [[i + 1, i + 1]]), sink).wait(5)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] is not None for i in range(24))
    assert len(session.batches) < 24  # batched
    for i in range(24):
        ((_, fields),) = sink.of(f"t{i}")
        assert fields["vectors"][0, 1] == 2 * (i + 1)


class HeldEncoder(FakeEncoder):
    """Holds its first run until released: requests queue up behind it meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self, output_names: Sequence[str], feeds: Any) -> list[np.ndarray]:
        self.entered.set()
        assert self.release.wait(10), "never released"
        return super().run(output_names, feeds)


def test_online_requests_go_into_a_batch_before_earlier_batch_lines(
    engines: list[EncoderEngine],
) -> None:
    session = HeldEncoder()
    engine = start(engines, session, max_wait_ms=1, max_batch=2)
    sink = RecordingSink()
    first = engine.submit(embed_request("first", [[9]]), sink)
    assert session.entered.wait(10)
    # While the first run is held: two batch lines, then an online request (longer input).
    lines = [
        engine.submit(embed_request(f"line-{i}", [[i + 1]], service_class="batch"), sink)
        for i in range(2)
    ]
    online = engine.submit(embed_request("online", [[3, 3]]), sink)
    session.release.set()
    for handle in (first, online, *lines):
        assert handle.wait(5) is not None
    # The next run took the online request and the first line; the second line ran last.
    assert session.batches == [(1, 1), (2, 2), (1, 1)]
    assert [rid for _, rid, _ in sink.events] == ["first", "online", "line-0", "line-1"]
