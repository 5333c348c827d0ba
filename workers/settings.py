"""Worker configuration, read from the environment only (a worker node has no Django settings)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from workers.contract import inference_queue


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    broker_url: str
    redis_url: str
    pool: str
    node: str
    max_batch: int
    max_prefill_tokens: int
    embed_max_batch: int
    embed_max_wait_ms: float
    concurrency: int
    visibility_timeout_s: int
    task_time_limit_s: int
    tensor_max_batch: int = 64  # rows of the batch dimension per tensor-model run
    tensor_max_wait_ms: float = 5.0
    engine_idle_s: float = 1800.0  # unload a model version unused this long (0: never)
    # Engines admit online requests fairly across organizations (docs/service_tiers.md);
    # off (MANTLE_FAIR_SHARING=0): by tier, then arrival order, the baseline of the benchmark.
    fair_sharing: bool = True
    flex_max_wait_s: float = 30.0  # a flex request not started by then: 429 resource_unavailable
    # /metrics over HTTP for Prometheus (workers/metrics.py); 0: not served.
    metrics_port: int = 0

    @property
    def queue(self) -> str:
        return inference_queue(self.pool)

    @classmethod
    def from_env(cls) -> WorkerSettings:
        return cls(
            broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            pool=os.environ.get("MANTLE_POOL", "cpu"),
            node=os.environ.get("MANTLE_NODE") or f"{socket.gethostname()}-{os.getpid()}",
            max_batch=_int("MANTLE_MAX_BATCH", 32),
            max_prefill_tokens=_int("MANTLE_MAX_PREFILL_TOKENS", 4096),
            embed_max_batch=_int("MANTLE_EMBED_MAX_BATCH", 32),
            embed_max_wait_ms=_float("MANTLE_EMBED_MAX_WAIT_MS", 5.0),
            tensor_max_batch=_int("MANTLE_TENSOR_MAX_BATCH", 64),
            tensor_max_wait_ms=_float("MANTLE_TENSOR_MAX_WAIT_MS", 5.0),
            engine_idle_s=_float("MANTLE_ENGINE_IDLE_S", 1800.0),
            fair_sharing=os.environ.get("MANTLE_FAIR_SHARING", "1").strip() not in ("0", "false"),
            flex_max_wait_s=_float("MANTLE_FLEX_MAX_WAIT_S", 30.0),
            metrics_port=_int("MANTLE_WORKER_METRICS_PORT", 0),
            # The slot count in heartbeats: tasks this node takes at once (-c of the threads pool).
            concurrency=_int("MANTLE_CONCURRENCY", 64),
            visibility_timeout_s=_int("MANTLE_VISIBILITY_TIMEOUT_S", 3600),
            task_time_limit_s=_int("MANTLE_TASK_TIME_LIMIT_S", 900),
        )
