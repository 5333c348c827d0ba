"""Prometheus metrics of a worker process, per pool and tier: the autoscaler's signals.

Gauges (queue depth, utilization, tokens/s) are read from the runtime when scraped, so
they cost nothing between scrapes; counters and the waiting-time histogram are
recorded once per request in `WorkerRuntime._serve_once`. The registry is this
module's own: a worker never mixes in another process's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.contract import ServiceClass, inference_queue, priority_queue
from workers.engine.inplace import session_calls_total
from workers.settings import WorkerSettings


class WorkerRuntime(Protocol):
    """What the collector reads of workers.serving.WorkerRuntime (a Protocol: serving
    records requests here, so this module does not import it)."""

    settings: WorkerSettings
    total_slots: int

    def engines(self) -> Mapping[str, Any]: ...

    def in_flight(self) -> int: ...


logger = logging.getLogger(__name__)

# The gauge the autoscaler reads beside the broker's queue depth (deploy/k8s/autoscaling.yaml).
ENGINE_WAITING = "mantle_worker_engine_waiting_requests"

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "mantle_worker_requests_total",
    "Requests a worker finished, by pool, tier and outcome",
    ["pool", "tier", "outcome"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "mantle_worker_tokens_total",
    "Tokens computed, by pool, tier and kind (input, output)",
    ["pool", "tier", "kind"],
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "mantle_worker_queue_wait_seconds",
    "Time from enqueue at the gateway to admission by an engine, by pool and tier",
    ["pool", "tier"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)


def observe_request(
    *,
    pool: str,
    tier: str,
    outcome: str,
    queue_s: float,
    input_tokens: int,
    output_tokens: int,
) -> None:
    """Records one finished request (called once per request the worker ran or refused)."""
    REQUESTS.labels(pool, tier, outcome).inc()
    QUEUE_WAIT.labels(pool, tier).observe(max(0.0, queue_s))
    if input_tokens:
        TOKENS.labels(pool, tier, "input").inc(input_tokens)
    if output_tokens:
        TOKENS.labels(pool, tier, "output").inc(output_tokens)


def _waiting_by_class(engine: Any) -> dict[str, int]:
    by_class = getattr(engine, "waiting_by_class", None)
    if callable(by_class):
        return dict(by_class())
    return {ServiceClass.ONLINE.value: int(getattr(engine, "waiting", 0) or 0)}


class RuntimeCollector(Collector):
    """Reads the runtime's engines (and the broker queue's length) at scrape time."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        runtime = self.runtime
        pool = runtime.settings.pool
        engines = list(runtime.engines().values())

        waiting = GaugeMetricFamily(
            ENGINE_WAITING,
            "Requests waiting in this worker's engines for a batch slot, by pool and tier",
            labels=["pool", "tier"],
        )
        totals = {c.value: 0 for c in ServiceClass}
        for engine in engines:
            for tier, count in _waiting_by_class(engine).items():
                totals[tier] = totals.get(tier, 0) + count
        for tier, count in sorted(totals.items()):
            waiting.add_metric([pool, tier], count)
        yield waiting

        broker = GaugeMetricFamily(
            "mantle_worker_broker_queue_length",
            "Messages in the pool's broker queues, its own and its priority tier's (Redis "
            "broker only; with RabbitMQ read its queues' own metrics)",
            labels=["pool", "queue"],
        )
        for queue, length in self._broker_lengths().items():
            broker.add_metric([pool, queue], length)
        yield broker

        rows = sum(int(getattr(e, "running", 0) or 0) for e in engines)
        capacity = sum(int(getattr(e, "max_batch", 0) or 0) for e in engines)
        slot = GaugeMetricFamily(
            "mantle_worker_batch_slot_utilization",
            "Running rows over the engines' max_batch (0 with no batching engine loaded)",
            labels=["pool"],
        )
        slot.add_metric([pool], rows / capacity if capacity else 0.0)
        yield slot

        busy, total = runtime.in_flight(), max(1, runtime.total_slots)
        threads = GaugeMetricFamily(
            "mantle_worker_task_slot_utilization",
            "Busy task threads over the worker's concurrency",
            labels=["pool"],
        )
        threads.add_metric([pool], min(1.0, busy / total))
        yield threads

        rate = GaugeMetricFamily(
            "mantle_worker_tokens_per_second",
            "Output tokens per second over the engines' recent window",
            labels=["pool"],
        )
        rate.add_metric([pool], sum(float(e.tokens_per_s()) for e in engines))
        yield rate

        # Adaptive threads (MANTLE_ORT_ADAPTIVE_THREADS, docs/service_tiers.md "A shared
        # node"): which session ran the model calls, and what the choice was made on.
        totals = session_calls_total()
        if any(totals.values()):
            calls = CounterMetricFamily(
                "mantle_worker_model_calls",
                "Model calls of adaptive-thread engines since the worker started, by "
                "session: wide (every intra-op thread) or narrow (one thread, while the "
                "session's cores are crowded)",
                labels=["pool", "session"],
            )
            for name, count in sorted(totals.items()):
                calls.add_metric([pool, name], count)
            yield calls
        crowding = []
        for engine in engines:
            read = getattr(engine, "cpu_crowding", None)
            seen = read() if callable(read) else None
            if seen is not None:
                crowding.append(float(seen))
        if crowding:
            crowd = GaugeMetricFamily(
                "mantle_worker_cpu_crowding_cores",
                "Cores other processes and the worker's threads outside its model sessions "
                "took from the sessions' cores over the contention monitor's last window",
                labels=["pool"],
            )
            crowd.add_metric([pool], max(crowding))
            yield crowd

    def _broker_lengths(self) -> dict[str, int]:
        url = self.runtime.settings.broker_url
        if not url.startswith(("redis://", "rediss://")):
            return {}
        pool = self.runtime.settings.pool
        queues = (inference_queue(pool), priority_queue(pool))
        try:
            import redis

            client = redis.Redis.from_url(url, socket_timeout=1.0)
            with client.pipeline(transaction=False) as pipe:
                for queue in queues:
                    pipe.llen(queue)
                lengths = pipe.execute()
            return {q: int(n) for q, n in zip(queues, lengths, strict=True)}
        except Exception:  # a scrape never fails because the broker is slow
            logger.warning("reading the broker queues' lengths failed", exc_info=True)
            return {}


def serve_metrics(runtime: WorkerRuntime, port: int) -> None:
    """Registers the runtime's collector and serves /metrics on `port` (0: off)."""
    if port <= 0:
        return
    REGISTRY.register(RuntimeCollector(runtime))
    try:
        start_http_server(port, registry=REGISTRY)
    except OSError:  # serving requests matters more than being scraped
        logger.exception("worker metrics not served: port %d is not free", port)
        return
    logger.info("worker metrics on :%d/metrics", port)
