"""The usage drain: the Redis usage stream into raw events and hourly rollups, exactly once.

How a batch goes (docs/billing.md, "Metering", has the argument step by step; each step is
a module of this package):

1. stream.py: XREADGROUP (group `billing-drain`) hands this consumer up to `batch_size`
   entries; they stay pending in the group until acknowledged. A reader thread fetches
   and parses (parse.py) the next batch while the database writes the current one.
2. store.py: one transaction: COPY the batch into a temp table, insert it into the raw
   table with (request_id, occurred_at) unique, upsert the hourly rollups from the rows
   actually inserted (never from duplicates), and write the batch's per-organization
   token counts to the spend outbox. Commit.
3. outbox.py: apply the outbox to Redis (`mantle:spend:<org>`, guarded by a per-batch
   marker), run the `on_counted` hooks, delete the outbox row.
4. stream.py: XACK. Malformed entries go to `mantle:usage:dead` with the reason, acked in
   the same MULTI.

A crash before 2 commits leaves the entries pending: they are read again (this consumer's
history at restart, or XAUTOCLAIM by another drain) and inserted then. A crash after the
commit leaves them pending too, but they are duplicates by then: nothing is counted twice,
and the outbox row, replayed at start, finishes step 3. Partitions (partitions.py) are made
before a batch needs them.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import redis
from django.db import DataError, IntegrityError, OperationalError, connection
from prometheus_client import Counter, Gauge, Histogram

from billing.metering import outbox, parse, partitions, store, stream
from billing.metering.parse import FIELD_NAMES, Batch
from billing.metering.stream import RawEntry

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

CRASH_ENV = "MANTLE_DRAIN_CRASH_AT"
CRASH_AFTER_ENV = "MANTLE_DRAIN_CRASH_AFTER"
CRASH_POINTS = ("before_insert", "before_commit", "before_spend", "after_commit_before_ack")
"""Test hook: with MANTLE_DRAIN_CRASH_AT set to one of these, the drain calls os._exit(1)
at that point of a batch, after MANTLE_DRAIN_CRASH_AFTER (default 0) whole batches."""

LAG = Gauge(
    "mantle_usage_drain_lag_seconds",
    "Age of the oldest usage event not yet counted by the drain (pending or unread)",
)
DRAINED = Counter("mantle_usage_events_drained_total", "Usage events counted (inserted) once")
DUPLICATES = Counter(
    "mantle_usage_duplicates_skipped_total", "Usage events skipped as already counted"
)
DEAD_LETTERS = Counter(
    "mantle_usage_dead_letters_total", "Usage stream entries moved to the dead-letter stream"
)
BATCH_SECONDS = Histogram(
    "mantle_usage_drain_batch_seconds",
    "Time to store and acknowledge one batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


@dataclass(slots=True)
class DrainTotals:
    batches: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead: int = 0


class Drain:
    """One consumer of the usage stream. Several may run at once under different names.

    `consumer` should be stable across restarts of the same process slot (the host name
    by default), so that a restarted drain takes back its own pending entries at once;
    entries of a consumer that never comes back are claimed by the others after
    `claim_idle_ms`.
    """

    def __init__(
        self,
        *,
        consumer: str,
        client: redis.Redis,
        batch_size: int = 5000,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        claim_interval_s: float = 30.0,
        hooks: Sequence[outbox.CountedHook] | None = None,
    ) -> None:
        self.consumer = consumer
        self.client = client
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval_s = claim_interval_s
        self.hooks = tuple(outbox.registered_hooks() if hooks is None else hooks)
        self.totals = DrainTotals()
        self._reader = stream.raw_reader(client)
        self._months_ready: set[datetime] = set()
        self._crash_at = os.environ.get(CRASH_ENV, "")
        self._crash_after = int(os.environ.get(CRASH_AFTER_ENV, "0") or 0)
        if self._crash_at and self._crash_at not in CRASH_POINTS:
            raise ValueError(f"{CRASH_ENV} must be one of {CRASH_POINTS}")
        self._last_lag = 0.0
        self._last_trim = 0.0
        self._last_replay = 0.0
        self._reader_error: BaseException | None = None

    # -- set-up and maintenance --

    def setup(self) -> None:
        stream.ensure_group(self.client)
        partitions.usage_partitions_ensure()
        self._months_ready = {p.start for p in partitions.usage_partitions_list()}
        outbox.outbox_replay(self.client, hooks=self.hooks)
        self._last_replay = time.monotonic()

    def maintain(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_lag >= 1.0:
            LAG.set(stream.drain_lag_seconds(self.client))
            self._last_lag = now
        if force or now - self._last_trim >= 10.0:
            stream.usage_stream_trim(self.client)
            self._last_trim = now
        if now - self._last_replay >= 30.0:
            outbox.outbox_replay(self.client, hooks=self.hooks)
            self._last_replay = now

    # -- reading --

    def read_pending(self, after: str = "0") -> list[RawEntry]:
        """This consumer's own delivered-but-unacknowledged entries after `after`."""
        return stream.read_group(self._reader, self.consumer, after=after, count=self.batch_size)

    def read_new(self, *, block: bool) -> list[RawEntry]:
        return stream.read_group(
            self._reader,
            self.consumer,
            after=">",
            count=self.batch_size,
            block_ms=self.block_ms if block else None,
        )

    def claim(self, start: str = "0-0") -> tuple[str, list[RawEntry]]:
        """Take over entries pending too long in other (dead) consumers. Returns the cursor."""
        return stream.claim_stale(
            self._reader,
            self.consumer,
            min_idle_ms=self.claim_idle_ms,
            start=start,
            count=self.batch_size,
        )

    def _produce(self, out: queue.Queue[Batch | None], stop: threading.Event, once: bool) -> None:
        """The reader thread: own pending entries first, then claims and new entries."""

        def put(entries: list[RawEntry]) -> None:
            batch = parse.assemble_batch(entries)
            while not stop.is_set():
                try:
                    out.put(batch, timeout=0.5)
                    return
                except queue.Full:
                    continue

        def retrying(read: Callable[[], _T]) -> _T | None:
            # Redis going away must not end the drain: wait and read again.
            while not stop.is_set():
                try:
                    return read()
                except redis.RedisError as exc:
                    logger.warning("usage stream read failed, retrying: %s", exc)
                    stop.wait(1.0)
            return None

        def claim_all() -> None:
            cursor = "0-0"
            while not stop.is_set():
                got = retrying(functools.partial(self.claim, cursor))
                if got is None:
                    return
                cursor, claimed = got
                if claimed:
                    logger.info("claimed %d stale usage entries", len(claimed))
                    put(claimed)
                if cursor == "0-0":
                    return

        try:
            after = "0"
            while not stop.is_set():
                own = retrying(functools.partial(self.read_pending, after))
                if not own:
                    break
                put(own)
                after = own[-1][0]
            claim_all()
            last_claim = time.monotonic()
            while not stop.is_set():
                if time.monotonic() - last_claim >= self.claim_interval_s:
                    claim_all()
                    last_claim = time.monotonic()
                entries = retrying(functools.partial(self.read_new, block=not once))
                if entries:
                    put(entries)
                elif once and entries is not None:
                    break
        except Exception as exc:
            logger.exception("usage drain reader failed")
            self._reader_error = exc
            stop.set()
        finally:
            with contextlib.suppress(queue.Full):
                out.put(None, timeout=5)

    # -- storing --

    def _crash(self, point: str) -> None:
        if self._crash_at == point and self.totals.batches >= self._crash_after:
            logger.warning("%s=%s: exiting now (test hook)", CRASH_ENV, point)
            os._exit(1)

    def process(self, batch: Batch) -> store.Stored:
        """Store, count and acknowledge one batch; raises (entries stay pending) on failure."""
        started = time.perf_counter()
        self._crash("before_insert")
        months = [m for m in store.usage_rows_months(batch.rows) if m not in self._months_ready]
        if months:
            partitions.usage_partitions_ensure(months=months)
            self._months_ready.update(months)
        try:
            stored = store.usage_batch_store(
                batch.rows,
                with_events=bool(self.hooks),
                before_commit=lambda: self._crash("before_commit"),
            )
        except (DataError, IntegrityError):
            # A value the database refuses, or a row for a partition dropped since the
            # batch was read (retention running at a month boundary): find the rows.
            stored = self._store_one_by_one(batch)
        self._crash("before_spend")
        self._finish(stored)
        self._crash("after_commit_before_ack")
        self._acknowledge(batch)
        duplicates = stored.duplicates + batch.duplicates
        self.totals.batches += 1
        self.totals.inserted += stored.inserted
        self.totals.duplicates += duplicates
        self.totals.dead += len(batch.dead)
        DRAINED.inc(stored.inserted)
        DUPLICATES.inc(duplicates)
        DEAD_LETTERS.inc(len(batch.dead))
        BATCH_SECONDS.observe(time.perf_counter() - started)
        return stored

    def _finish(self, stored: store.Stored) -> None:
        """After a committed store: its spend and hooks applied, its outbox row deleted."""
        if stored.batch is not None:
            outbox.outbox_finish(
                self.client,
                batch=stored.batch,
                deltas=stored.deltas,
                events=stored.events,
                hooks=self.hooks,
            )

    def _store_one_by_one(self, batch: Batch) -> store.Stored:
        """A batch the database refused as a whole: store what it takes, dead-letter the rest."""
        total = store.Stored(inserted=0, duplicates=0, batch=None, deltas={}, events=[])
        for entry_id, row in zip(batch.row_entry_ids, batch.rows, strict=True):
            try:
                stored = store.usage_batch_store([row], with_events=bool(self.hooks))
            except (DataError, IntegrityError) as exc:
                fields = {n: str(v) for n, v in zip(FIELD_NAMES, row, strict=True)}
                batch.dead.append((entry_id, f"refused by the database: {exc}", fields))
                continue
            self._finish(stored)
            total.inserted += stored.inserted
            total.duplicates += stored.duplicates
        return total

    def _acknowledge(self, batch: Batch) -> None:
        stream.acknowledge(self.client, batch.entry_ids, batch.dead)

    def run(self, *, stop: threading.Event, once: bool = False) -> DrainTotals:
        """Drain until `stop` is set, or (once) until the stream has nothing for us."""
        self.setup()
        batches: queue.Queue[Batch | None] = queue.Queue(maxsize=1)
        reader = threading.Thread(
            target=self._produce, args=(batches, stop, once), name="usage-reader", daemon=True
        )
        reader.start()
        backoff = 0.5
        try:
            while True:
                try:
                    batch = batches.get(timeout=0.5)
                except queue.Empty:
                    self.maintain()
                    continue
                if batch is None:
                    break
                while True:
                    try:
                        self.process(batch)
                        backoff = 0.5
                        break
                    except (OperationalError, redis.ConnectionError, redis.TimeoutError) as exc:
                        # The batch stays pending; a database or Redis outage must not
                        # lose it, so the same batch is retried until it goes through.
                        logger.warning("usage batch failed (%s); retrying in %.1fs", exc, backoff)
                        connection.close()
                        if stop.wait(backoff):
                            return self.totals
                        backoff = min(backoff * 2, 30.0)
                self.maintain()
        finally:
            stop.set()
            reader.join(timeout=10)
        if self._reader_error is not None:
            raise RuntimeError("the usage stream reader failed") from self._reader_error
        self.maintain(force=True)
        return self.totals


def tune_gc_for_draining() -> None:
    """Process-wide, for a process that only drains (the command calls it).

    A batch in flight is hundreds of thousands of small acyclic lists and strings; with
    the default threshold (700 allocations) the cyclic collector runs thousands of times a
    second over all of them, about a third of the drain's CPU. Nothing here makes cycles.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(200_000, 50, 100)


def usage_drain(
    *,
    consumer: str,
    client: redis.Redis,
    once: bool = True,
    stop: threading.Event | None = None,
    **options: Any,
) -> DrainTotals:
    """Run a drain (see `Drain`); with `once`, until the stream has nothing left for it."""
    return Drain(consumer=consumer, client=client, **options).run(
        stop=stop or threading.Event(), once=once
    )
