"""How much of the node's CPU other processes take, for a worker that shares its node.

ONNX Runtime splits each operator of a call between its intra-op threads and waits for
the last one at the end. On a node where other processes (the gateway, Redis, clients:
the all-in-one box of `bin/run` and the benchmarks) keep cores busy, one of the threads
is preempted in most calls and the others wait for it: measured on a 2-core machine with
bursty processes taking ~0.7 of a core, a 43-token prompt took 90 ms p50 / 105-120 ms p95
with two threads against 86 / 90 ms with one (47 / 48 ms with two on an idle machine),
and the same logits to the bit (docs/benchmarks.md, "Issue 18", stop 36).

`CpuContention` samples the kernel's counters (`/proc/stat` for the whole machine,
`/proc/self/stat` for this process, or with `SessionThreads` only the threads that run the
session's calls, so the worker's other threads count as crowding too) at most every
`interval_s` and says whether the
others' share leaves too little for every intra-op thread: contended when the cores
left to this process fall below `threads - enter_margin`, free again only above
`threads - leave_margin` (hysteresis, so a call's choice does not flap).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
INTERVAL_S = 0.5
STALE_INTERVALS = 4


def machine_busy_s(cpus: frozenset[int] | None = None) -> float | None:
    """CPU seconds the cores in `cpus` (None: every core) spent busy since boot (None: no
    /proc/stat). A container's /proc/stat is the host's: its per-core lines, limited to the
    cores this process may run on, are what its own cores did."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            lines = [line.split() for line in fh if line.startswith("cpu")]
    except OSError:
        return None
    busy, seen = 0, False
    for fields in lines:
        name = fields[0]
        if cpus is None and name != "cpu":
            continue
        if cpus is not None and (name == "cpu" or int(name[3:]) not in cpus):
            continue
        # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
        ticks = [int(x) for x in fields[1:9]]
        busy += sum(ticks) - ticks[3] - ticks[4]
        seen = True
    return busy / CLK_TCK if seen else None


def process_busy_s() -> float:
    """CPU seconds this process (all its threads) has used."""
    try:
        raw = Path("/proc/self/stat").read_text(encoding="ascii")
        # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
        after = raw.rsplit(")", 1)[1].split()
        return (int(after[11]) + int(after[12])) / CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return time.process_time()


def threads_busy_s(tids: Iterable[int]) -> float:
    """CPU seconds the threads `tids` of this process have used (gone threads: nothing)."""
    ticks = 0
    for tid in tids:
        try:
            raw = Path(f"/proc/self/task/{tid}/stat").read_text(encoding="ascii")
            after = raw.rsplit(")", 1)[1].split()
            ticks += int(after[11]) + int(after[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return ticks / CLK_TCK


def thread_ids() -> frozenset[int]:
    """This process's threads now (empty without /proc)."""
    try:
        return frozenset(int(p.name) for p in Path("/proc/self/task").iterdir())
    except (OSError, ValueError):
        return frozenset()


class SessionThreads:
    """The CPU time of the threads that run a session's calls: its intra-op pool's (the
    threads that appeared while the session was made) and the threads that call it (the
    engine's, added when it asks). The rest of the worker process (Celery's task threads,
    tokenizers, the event publisher) takes cores from the session's threads just as another
    process does, so with this as `process` it counts as the others'."""

    def __init__(self, pool: Iterable[int]) -> None:
        self.tids = set(pool)

    def __call__(self) -> float:
        self.tids.add(threading.get_native_id())
        return threads_busy_s(self.tids)


class CpuContention:
    """Whether other processes leave this one fewer cores than `threads` (see module doc)."""

    def __init__(
        self,
        threads: int,
        cores: int | None = None,
        *,
        interval_s: float = INTERVAL_S,
        enter_margin: float = 0.5,
        leave_margin: float = 0.3,
        machine: Callable[[], float | None] | None = None,
        process: Callable[[], float] = process_busy_s,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not leave_margin < enter_margin:
            raise ValueError("leave_margin must be below enter_margin (hysteresis)")
        allowed = frozenset(os.sched_getaffinity(0))
        self.cores = cores if cores is not None else len(allowed)
        # More threads than cores can never all run: the cores are what a call can use.
        self.threads = min(threads, self.cores)
        self.interval_s = interval_s
        self.enter_margin = enter_margin
        self.leave_margin = leave_margin
        self._machine = machine or (lambda: machine_busy_s(allowed))
        self._process = process
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, float, float] | None = None
        self.others = 0.0  # cores the other processes used over the last interval
        self.contended = False
        self.switches = 0  # times the answer changed (logs, tests)

    def check(self) -> bool:
        """Whether the node is contended now; samples when `interval_s` has passed."""
        now = self._clock()
        with self._lock:
            if self._last is not None and now - self._last[0] < self.interval_s:
                return self.contended
            machine = self._machine()
            if machine is None:  # no /proc: never contended
                return False
            mine = self._process()
            if self._last is not None:
                then, machine_then, mine_then = self._last
                elapsed = now - then
                # After a long quiet gap (no calls) the window would average the gap: the
                # first calls of a burst are decided on the last answer, the next from a
                # fresh window.
                fresh = self.interval_s == 0 or elapsed <= STALE_INTERVALS * self.interval_s
                # Counted threads that ended (a session released) take their time with
                # them: that window would read their time as the others'.
                fresh = fresh and mine >= mine_then
                if elapsed > 0 and fresh:
                    others = ((machine - machine_then) - (mine - mine_then)) / elapsed
                    self.others = max(0.0, others)
                    left = self.cores - self.others
                    was = self.contended
                    if was:
                        self.contended = left < self.threads - self.leave_margin
                    else:
                        self.contended = left < self.threads - self.enter_margin
                    if was != self.contended:
                        self.switches += 1
                        logger.debug(
                            "other processes take %.2f of %d cores: calls on %s",
                            self.others,
                            self.cores,
                            "one thread" if self.contended else f"{self.threads} threads",
                        )
            self._last = (now, machine, mine)
            return self.contended
