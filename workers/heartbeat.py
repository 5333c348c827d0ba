"""Worker registration: a periodic heartbeat in Redis, removed on clean shutdown."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.contract import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_TTL_S,
    WorkerHeartbeat,
    pool_live_key,
    worker_info_key,
)

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)


RESTART_GAP_S = 3.0
"""How long a node restarted under the same name stays unlisted after its previous
process's listing went stale: more than two of the gateway's idle polls (one a second)."""


def outwait_previous_process(
    client: redis.Redis,
    *,
    node: str,
    pool: str,
    ttl_s: float = HEARTBEAT_TTL_S,
    gap_s: float = RESTART_GAP_S,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Before a node restarted under its old name (a container restarted in its pod) takes
    work, let its previous process be seen dead; returns the seconds waited.

    Gateways and workers judge a node by its name's heartbeat. A process that died
    without unlisting (SIGKILL, OOM) and came back within the heartbeat TTL would look
    alive throughout, so the requests it held would wait for their deadline instead of
    ending with `worker_lost` or being sent again. A clean stop unlists the node, so a
    clean restart does not wait.
    """
    last = client.zscore(pool_live_key(pool), node)
    if last is None:
        return 0.0
    wait = float(last) + ttl_s + gap_s - time.time()
    if wait <= 0:
        return 0.0
    logger.warning(
        "node %s restarted %.1f s after its last heartbeat: staying unlisted %.1f s so that "
        "what its previous process held is seen as lost",
        node,
        time.time() - float(last),
        wait,
    )
    sleep(wait)
    return wait


@dataclass(frozen=True, slots=True)
class NodeStats:
    """What the node reports about itself at each beat."""

    providers: tuple[str, ...]
    models_loaded: tuple[str, ...]
    free_slots: int
    total_slots: int
    tokens_per_s: float
    # Batch lines running here, and the batch lines this node accepts now in total
    # (WorkerRuntime.batch_capacity): the batch runners' pace.
    batch_in_flight: int = 0
    batch_capacity: int = 0


class Heartbeat:
    """A daemon thread that keeps this node listed as live for its pool.

    Admission reads `pool_live_key(pool)` (score = last beat) to fail fast when
    a pool has no live worker; the console reads `worker_info_key(node)`.
    Entries of nodes that died without saying so are pruned by every beat.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        node: str,
        pool: str,
        queues: tuple[str, ...],
        stats: Callable[[], NodeStats],
        interval_s: float = HEARTBEAT_INTERVAL_S,
        ttl_s: float = HEARTBEAT_TTL_S,
    ) -> None:
        self._redis = client
        self.node = node
        self.pool = pool
        self._queues = queues
        self._stats = stats
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()  # listed before the first task could be refused for want of a live worker
        self._thread.start()
        logger.info("heartbeat started: node %s in pool %s", self.node, self.pool)
        return self

    def stop(self) -> None:
        """Stop beating and unlist the node, so admission stops counting on it at once."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(self._interval_s + 1.0)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(pool_live_key(self.pool), self.node)
            pipe.delete(worker_info_key(self.node))
            pipe.execute()
        except Exception:
            logger.warning("heartbeat: could not unlist node %s", self.node, exc_info=True)
        logger.info("heartbeat stopped: node %s left pool %s", self.node, self.pool)

    def beat(self) -> None:
        stats = self._stats()
        now = time.time()
        info = WorkerHeartbeat(
            node=self.node,
            pool=self.pool,
            providers=stats.providers,
            models_loaded=stats.models_loaded,
            free_slots=stats.free_slots,
            total_slots=stats.total_slots,
            tokens_per_s=round(stats.tokens_per_s, 2),
            sent_at=now,
            queues=self._queues,
            batch_in_flight=stats.batch_in_flight,
            batch_capacity=stats.batch_capacity,
        )
        live = pool_live_key(self.pool)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(
            worker_info_key(self.node),
            json.dumps(dataclasses.asdict(info)),
            px=int(self._ttl_s * 1000),
        )
        pipe.zadd(live, {self.node: now})
        pipe.zremrangebyscore(live, "-inf", now - self._ttl_s * 3)
        pipe.execute()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self.beat()
            except Exception:
                # Redis may blip; the next beat retries, and missing a few is
                # exactly what the TTL tolerates.
                logger.warning("heartbeat: beat failed for node %s", self.node, exc_info=True)
