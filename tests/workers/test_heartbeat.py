"""Worker heartbeat: listed while alive, unlisted on clean shutdown, stale nodes pruned."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from workers import heartbeat
from workers.contract import pool_live_key, worker_info_key
from workers.heartbeat import Heartbeat, NodeStats, outwait_previous_process

NOW = 1_700_000_000.0


class FrozenTime:
    """`time` for workers.heartbeat with its clock stopped at `now`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def stats() -> NodeStats:
    return NodeStats(
        providers=("CPUExecutionProvider",),
        models_loaded=("mv-1",),
        free_slots=7,
        total_slots=8,
        tokens_per_s=123.456,
        batch_in_flight=3,
        batch_capacity=5,
    )


def test_heartbeat_lists_then_unlists_the_node(redis_client: Any) -> None:
    beat = Heartbeat(
        redis_client,
        node="node-a",
        pool="testpool",
        queues=("inference.testpool",),
        stats=stats,
        interval_s=0.05,
        ttl_s=1.0,
    )
    before = time.time()
    beat.start()
    try:
        first = redis_client.zscore(pool_live_key("testpool"), "node-a")
        assert first is not None and before <= first <= time.time()  # listed at start, now
        # It keeps beating: a later score comes (polled, bounded; the interval is 0.05 s).
        assert wait_for(lambda: redis_client.zscore(pool_live_key("testpool"), "node-a") > first)
        info = json.loads(redis_client.get(worker_info_key("node-a")))
        assert info["node"] == "node-a" and info["pool"] == "testpool"
        assert info["providers"] == ["CPUExecutionProvider"]
        assert info["models_loaded"] == ["mv-1"]
        assert (info["free_slots"], info["total_slots"]) == (7, 8)
        assert info["tokens_per_s"] == 123.46
        assert info["queues"] == ["inference.testpool"]
        assert (info["batch_in_flight"], info["batch_capacity"]) == (3, 5)
        assert 0 < redis_client.pttl(worker_info_key("node-a")) <= 1000
    finally:
        beat.stop()
    assert redis_client.zscore(pool_live_key("testpool"), "node-a") is None
    assert redis_client.exists(worker_info_key("node-a")) == 0


def test_beat_prunes_nodes_that_died_silently(redis_client: Any) -> None:
    now = time.time()
    redis_client.zadd(pool_live_key("p"), {"dead": now - 100, "recent": now - 1})
    Heartbeat(redis_client, node="me", pool="p", queues=(), stats=stats, ttl_s=10).beat()
    assert set(redis_client.zrange(pool_live_key("p"), 0, -1)) == {"recent", "me"}


def test_a_node_back_under_its_name_stays_unlisted_until_its_old_process_is_seen_dead(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its previous process beat 2 s ago and was killed (never unlisted). The clock stands
    # still at NOW while it decides.
    monkeypatch.setattr(heartbeat, "time", FrozenTime(NOW))
    last = NOW - 2.0
    redis_client.zadd(pool_live_key("p"), {"node-a": last})
    slept: list[float] = []
    waited = outwait_previous_process(
        redis_client, node="node-a", pool="p", ttl_s=10.0, gap_s=3.0, sleep=slept.append
    )
    # Listed again only once gateways have seen the old listing stale for the gap: the
    # listing goes stale at last + TTL, and the gap follows.
    assert waited == last + 10.0 + 3.0 - NOW == 11.0
    assert slept == [11.0]


def test_a_cleanly_stopped_or_long_dead_node_starts_at_once(redis_client: Any) -> None:
    slept: list[float] = []
    assert outwait_previous_process(redis_client, node="n", pool="p", sleep=slept.append) == 0
    redis_client.zadd(pool_live_key("p"), {"n": time.time() - 30})
    assert outwait_previous_process(redis_client, node="n", pool="p", sleep=slept.append) == 0
    assert slept == []
