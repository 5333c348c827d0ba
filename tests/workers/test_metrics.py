"""Worker Prometheus metrics: the collectors in-process, and /metrics of a real worker."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stack import Process, Stack
from tests.workers.conftest import TEST_REDIS_URL
from tests.workers.test_serving import ECHO, IDENTITY, settings
from workers import metrics
from workers.contract import (
    GenerateRequest,
    SamplingParams,
    ServiceClass,
    TaskName,
    inference_queue,
    priority_queue,
    response_stream_key,
    to_payload,
)
from workers.serving import WorkerRuntime

ROOT = Path(__file__).resolve().parents[2]
POOL = "testpool"


def request(rid: str, tier: str = ServiceClass.ONLINE.value) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model=ECHO,
        identity=IDENTITY,
        prompt_token_ids=(5, 6, 7, 8),
        sampling=SamplingParams(max_tokens=3, temperature=0.0),
        deadline=time.time() + 30,
        enqueued_at=time.time() - 0.5,
        service_class=tier,
    )


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@dataclasses.dataclass
class StubEngine:
    running: int
    max_batch: int
    waiting: int
    by_class: dict[str, int] | None = None

    def tokens_per_s(self) -> float:
        return 12.5

    def __getattr__(self, name: str) -> Any:
        if name == "waiting_by_class" and self.by_class is not None:
            return lambda: dict(self.by_class or {})
        raise AttributeError(name)


def test_a_served_request_counts_by_tier_outcome_and_tokens(
    redis_client: Any,
) -> None:
    runtime = WorkerRuntime(settings(), redis_client)
    labels = {"pool": "testpool", "tier": "flex"}
    before_done = sample("mantle_worker_requests_total", **labels, outcome="length")
    before_out = sample("mantle_worker_tokens_total", **labels, kind="output")
    before_in = sample("mantle_worker_tokens_total", **labels, kind="input")
    before_wait = sample("mantle_worker_queue_wait_seconds_count", **labels)
    before_fast = sample("mantle_worker_queue_wait_seconds_bucket", **labels, le="0.25")
    try:
        outcome = runtime.serve_generate(request("m-1", ServiceClass.FLEX.value))
    finally:
        runtime.stop_engines()
    assert outcome.status == "length"
    assert sample("mantle_worker_requests_total", **labels, outcome="length") == before_done + 1
    assert sample("mantle_worker_tokens_total", **labels, kind="output") == before_out + 3
    assert sample("mantle_worker_tokens_total", **labels, kind="input") == before_in + 4
    assert sample("mantle_worker_queue_wait_seconds_count", **labels) == before_wait + 1
    # It waited half a second since the gateway enqueued it: not in the 0.25 s bucket.
    assert sample("mantle_worker_queue_wait_seconds_bucket", **labels, le="0.25") == before_fast


def test_the_collector_reads_queue_depth_utilization_and_rate_from_the_engines(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = WorkerRuntime(settings(broker_url=TEST_REDIS_URL), redis_client)
    engines = {
        "a": StubEngine(running=3, max_batch=8, waiting=5, by_class={"priority": 2, "online": 3}),
        "b": StubEngine(running=1, max_batch=8, waiting=4),  # no waiting_by_class: "online"
    }
    monkeypatch.setattr(runtime, "engines", lambda: engines)
    monkeypatch.setattr(runtime, "in_flight", lambda: 6)
    for i in range(7):
        redis_client.rpush(inference_queue("testpool"), f"message-{i}")
    redis_client.rpush(priority_queue("testpool"), "urgent")
    registry = CollectorRegistry()
    registry.register(metrics.RuntimeCollector(runtime))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"pool": "testpool", **labels})

    assert value("mantle_worker_engine_waiting_requests", tier="online") == 7
    assert value("mantle_worker_engine_waiting_requests", tier="priority") == 2
    assert value("mantle_worker_engine_waiting_requests", tier="flex") == 0
    assert value("mantle_worker_broker_queue_length", queue="inference.testpool") == 7
    assert value("mantle_worker_broker_queue_length", queue="inference.testpool.priority") == 1
    assert value("mantle_worker_batch_slot_utilization") == 4 / 16
    assert value("mantle_worker_task_slot_utilization") == 6 / 8
    assert value("mantle_worker_tokens_per_second") == 25.0


def test_the_collector_counts_model_calls_by_session_and_reads_the_crowd(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adaptive threads (MANTLE_ORT_ADAPTIVE_THREADS): calls by the session that ran them,
    counted for the process (an unloaded engine takes none of them away), and the largest
    share of the sessions' cores that others took."""
    from workers.engine import inplace
    from workers.engine.inplace import AdaptiveInPlaceSession

    runtime = WorkerRuntime(settings(), redis_client)
    registry = CollectorRegistry()
    registry.register(metrics.RuntimeCollector(runtime))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"pool": "testpool", **labels})

    class Runner:
        """An in-place session as the adaptive one calls it (the calls are what count)."""

        def get_inputs(self) -> list[Any]:
            return []

        def get_outputs(self) -> list[Any]:
            return []

    monkeypatch.setattr(inplace, "_calls_total", {"wide": 0, "narrow": 0})
    monkeypatch.setattr(runtime, "engines", lambda: {})
    assert b"mantle_worker_model_calls_total{" not in generate_latest(registry)

    monkeypatch.setattr(inplace.InPlaceSession, "run_in_place", lambda *a, **k: None)
    crowded = [True]
    session = AdaptiveInPlaceSession(Runner(), Runner(), lambda: crowded[0])
    for contended in (True, True, False, True, False):
        crowded[0] = contended
        session.run_in_place({}, [])
    assert (session.narrow_calls, session.wide_calls) == (3, 2)

    def adaptive(crowding: float) -> StubEngine:
        engine = StubEngine(running=0, max_batch=8, waiting=0)
        engine.cpu_crowding = lambda: crowding  # type: ignore[attr-defined]
        return engine

    engines: dict[str, StubEngine] = {
        "a": adaptive(0.7),
        "b": adaptive(0.6),
        "plain": StubEngine(running=0, max_batch=8, waiting=0),  # no adaptive threads
    }
    monkeypatch.setattr(runtime, "engines", lambda: engines)
    assert value("mantle_worker_model_calls_total", session="narrow") == 3
    assert value("mantle_worker_model_calls_total", session="wide") == 2
    assert value("mantle_worker_cpu_crowding_cores") == pytest.approx(0.7)

    # The engines unloaded: the counts stay, the crowding figure goes.
    engines.clear()
    assert value("mantle_worker_model_calls_total", session="narrow") == 3
    assert b"mantle_worker_cpu_crowding_cores" not in generate_latest(registry)


def test_no_broker_length_is_exported_for_rabbitmq(redis_client: Any) -> None:
    runtime = WorkerRuntime(settings(broker_url="amqp://guest@127.0.0.1//"), redis_client)
    registry = CollectorRegistry()
    registry.register(metrics.RuntimeCollector(runtime))
    assert b"mantle_worker_broker_queue_length{" not in generate_latest(registry)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def worker_with_metrics(redis_client: Any, tmp_path: Path) -> Iterator[tuple[Process, int]]:
    port = free_port()
    env = {
        **os.environ,
        "CELERY_BROKER_URL": TEST_REDIS_URL,
        "REDIS_URL": TEST_REDIS_URL,
        "PYTHONPATH": str(ROOT),
    }
    stack = Stack(env=env, log_dir=tmp_path)
    try:
        proc = stack.start_worker(
            POOL, "metrics-test-worker", 4, env={"MANTLE_WORKER_METRICS_PORT": str(port)}
        )
        stack.wait_registered(proc, POOL)
        yield proc, port
    finally:
        stack.stop_all()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


@pytest.mark.e2e
def test_a_real_worker_exports_its_requests_on_metrics(
    worker_with_metrics: tuple[Process, int],
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery import Celery

    _, port = worker_with_metrics
    monkeypatch.setenv("CELERY_BROKER_URL", TEST_REDIS_URL)
    sender = Celery("test-sender", broker=TEST_REDIS_URL)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    for i, tier in enumerate(("online", "online", "priority")):
        sender.send_task(
            TaskName.GENERATE.value,
            kwargs={"payload": to_payload(request(f"m-real-{i}", tier))},
            queue=inference_queue(POOL),
        )
    end = time.monotonic() + 30
    while time.monotonic() < end:
        done = [
            any(f["type"] == "done" for _, f in redis_client.xrange(response_stream_key(rid)))
            for rid in ("m-real-0", "m-real-1", "m-real-2")
        ]
        if all(done):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the worker did not answer the three requests")
    scraped = scrape(port)

    def value(name: str, **labels: str) -> float | None:
        wanted = {"pool": POOL, **labels}
        for family in text_string_to_metric_families(scraped):
            for s in family.samples:
                if s.name == name and s.labels == wanted:
                    return float(s.value)
        return None

    assert value("mantle_worker_requests_total", tier="online", outcome="length") == 2
    assert value("mantle_worker_requests_total", tier="priority", outcome="length") == 1
    assert value("mantle_worker_tokens_total", tier="online", kind="output") == 6
    assert value("mantle_worker_queue_wait_seconds_count", tier="online") == 2
    assert value("mantle_worker_engine_waiting_requests", tier="online") == 0
    assert value("mantle_worker_broker_queue_length", queue="inference.testpool") == 0
    assert value("mantle_worker_task_slot_utilization") == 0
