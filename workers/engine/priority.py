"""The batch class of work (issue 17): how many rows batch lines may take beside online traffic.

Online requests and batch lines share an engine. Online ones are admitted first, whatever
the arrival order; batch lines take what online traffic leaves:

- with no online traffic on the engine (none running, waiting, or seen in the last
  ONLINE_LINGER_S), batch lines may fill it (`max_batch` rows);
- while there is some, batch rows are limited to BATCH_SHARE_WITH_ONLINE of `max_batch`,
  and never to rows online requests need (running lines are not cut short; the limit only
  holds back new ones, so a full batch of lines shrinks to the share as its lines end);
- an online request never waits for batch rows to end: it may take up to
  ONLINE_BURST_SHARE of `max_batch` rows beyond `max_batch` while batch rows hold them.

The node's heartbeat derives the batch runner's pace from the same limits
(`batch_capacity`), so lines the engine would not admit are not sent to it.

Plain arithmetic and no numpy: the serving runtime imports it for the heartbeat.
"""

from __future__ import annotations

import threading
import time

from workers.contract import ServiceClass

BATCH_SHARE_WITH_ONLINE = 0.25
"""Batch rows beside online traffic, at most this share of `max_batch` (at least one row)."""

ONLINE_BURST_SHARE = 0.25
"""Rows online requests may take beyond `max_batch` while batch rows hold the batch."""

ONLINE_LINGER_S = 5.0
"""Online traffic counts as present this long after the last online request left, so that
a gap between two online requests does not let batch lines fill the engine again."""


RANKS: dict[str, int] = {
    ServiceClass.PROVISIONED.value: 0,
    ServiceClass.PRIORITY.value: 0,
    ServiceClass.ONLINE.value: 1,
    ServiceClass.FLEX.value: 2,
    ServiceClass.BATCH.value: 3,
}
"""Admission order by class (lower first): provisioned and priority, then the default tier,
then flex, then batch lines. An unknown class is served as the default tier."""


def rank_of(service_class: str) -> int:
    return RANKS.get(service_class, 1)


FLEX_MAX_WAIT_S = 30.0
"""How long a flex request may wait to start (from when the gateway sent it) before it is
refused with `resource_unavailable` (a 429 at the gateway) rather than served late."""

CUT_MIN_STEPS = 4
"""A session call that holds online rows is cut short for a better-placed arrival only
after this many calls ran whole since the last cut: a stream of arrivals cannot stall the
rows already running (batch-only calls are cut at every online arrival, as before)."""


def fair_share(max_batch: int, organizations: int) -> float:
    """Rows each active organization may count on: the engine's rows split evenly."""
    return max_batch / max(1, organizations)


def is_batch(service_class: str) -> bool:
    """Whether a request's class is the batch class (any other value is served as online)."""
    return service_class == ServiceClass.BATCH.value


def batch_share(max_batch: int) -> int:
    return max(1, int(max_batch * BATCH_SHARE_WITH_ONLINE))


def online_burst(max_batch: int) -> int:
    return max(1, int(max_batch * ONLINE_BURST_SHARE))


def batch_row_limit(max_batch: int, online_rows: int, online_present: bool) -> int:
    """The most rows batch lines may hold now, online rows being `online_rows`."""
    if not online_present:
        return max_batch
    return max(0, min(batch_share(max_batch), max_batch - online_rows))


class OnlineActivity:
    """When online traffic was last present, to hold batch lines back a while after it.

    Thread-safe: the serving runtime touches it from task threads and reads it from the
    heartbeat's.
    """

    def __init__(self, linger_s: float = ONLINE_LINGER_S) -> None:
        self.linger_s = linger_s
        self._last = float("-inf")
        self._lock = threading.Lock()

    def touch(self, now: float | None = None) -> None:
        with self._lock:
            self._last = time.monotonic() if now is None else now

    def recent(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            return now - self._last < self.linger_s
