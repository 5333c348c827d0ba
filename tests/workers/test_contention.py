"""Whether other processes crowd the node (workers/runtime/contention.py)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from typing import Any

import pytest

from workers.runtime.contention import (
    CpuContention,
    SessionThreads,
    machine_busy_s,
    process_busy_s,
    thread_ids,
    threads_busy_s,
)


class Counters:
    """The kernel's counters as a test sets them: the machine's busy seconds, this
    process's, and the clock."""

    def __init__(self) -> None:
        self.now = 100.0
        self.machine = 1000.0
        self.mine = 10.0

    def advance(self, seconds: float, *, others: float, mine: float) -> None:
        """`seconds` pass with the other processes on `others` cores and this one on `mine`."""
        self.now += seconds
        self.mine += mine * seconds
        self.machine += (others + mine) * seconds

    def contention(self, **kwargs: float) -> CpuContention:
        return CpuContention(
            2,
            2,
            machine=lambda: self.machine,
            process=lambda: self.mine,
            clock=lambda: self.now,
            **kwargs,  # type: ignore[arg-type]
        )


def test_other_processes_taking_more_than_half_a_core_of_two_make_the_node_contended() -> None:
    c = Counters()
    watch = c.contention()
    assert watch.check() is False  # the first sample has nothing to compare with

    c.advance(1.0, others=0.2, mine=1.8)  # the worker alone, both threads busy
    assert watch.check() is False
    assert watch.others == pytest.approx(0.2)

    c.advance(1.0, others=0.7, mine=1.3)  # the gateway and its clients take 0.7 of a core
    assert watch.check() is True
    assert watch.others == pytest.approx(0.7)


def test_the_answer_holds_between_samples_and_leaves_contention_only_well_below() -> None:
    c = Counters()
    watch = c.contention(interval_s=0.5)
    watch.check()
    c.advance(1.0, others=0.8, mine=1.0)
    assert watch.check() is True

    # Within the interval the counters are not read again, whatever happened.
    c.advance(0.2, others=0.0, mine=2.0)
    assert watch.check() is True

    # Between the thresholds (entered above 0.5, left below 0.3): still contended.
    c.advance(1.0, others=0.4, mine=1.0)
    assert watch.check() is True
    c.advance(1.0, others=0.25, mine=1.0)
    assert watch.check() is False
    # ... and from free, 0.4 is not enough to enter again.
    c.advance(1.0, others=0.4, mine=1.0)
    assert watch.check() is False
    assert watch.switches == 2


def test_a_long_quiet_gap_is_not_averaged_into_the_next_answer() -> None:
    c = Counters()
    watch = c.contention(interval_s=0.5)
    watch.check()
    c.advance(1.0, others=0.8, mine=1.0)
    assert watch.check() is True
    # Ten quiet seconds without a call, then a second of a busy node: averaged together
    # they would read 0.07 cores of others; the gap is a fresh baseline instead.
    c.advance(10.0, others=0.0, mine=0.0)
    assert watch.check() is True  # the last answer stands for the first calls
    c.advance(1.0, others=0.8, mine=1.0)
    assert watch.check() is True
    assert watch.others == pytest.approx(0.8)


def test_a_counted_thread_that_ends_starts_a_fresh_window() -> None:
    """With only the session's threads counted, a thread that ends takes its CPU time out
    of the sum: that window is a fresh baseline, not a burst of the others'."""
    c = Counters()
    watch = c.contention(interval_s=0.5)
    watch.check()
    c.advance(1.0, others=0.1, mine=1.9)
    assert watch.check() is False
    c.advance(0.5, others=0.1, mine=1.9)
    c.mine -= 5.0  # a counted pool thread gone with its five seconds
    assert watch.check() is False
    assert watch.others == pytest.approx(0.1)  # not 10 cores of others
    c.advance(1.0, others=0.8, mine=1.2)
    assert watch.check() is True


def test_threads_beyond_the_cores_count_as_the_cores() -> None:
    """MANTLE_ORT_THREADS=4 on two cores: with the others idle the node is free (4
    threads could never all run, and that is not contention)."""
    c = Counters()
    watch = CpuContention(
        4, 2, machine=lambda: c.machine, process=lambda: c.mine, clock=lambda: c.now
    )
    assert watch.threads == 2
    watch.check()
    c.advance(1.0, others=0.1, mine=1.9)
    assert watch.check() is False


def test_only_the_cores_this_process_may_use_are_read() -> None:
    """A container's /proc/stat is the host's: the lines of the cores outside this
    process's affinity are not its node's load."""
    if machine_busy_s() is None:
        pytest.skip("no /proc/stat here")
    allowed = frozenset(os.sched_getaffinity(0))
    whole, mine = machine_busy_s(), machine_busy_s(allowed)
    assert whole is not None and mine is not None
    # Every core allowed: the per-core lines add up to the machine's line (a few ticks
    # apart, read a moment later).
    if len(allowed) == os.cpu_count():
        assert mine == pytest.approx(whole, abs=0.5)
    one = machine_busy_s(frozenset([min(allowed)]))
    assert (one is not None and one < mine) or len(allowed) == 1
    assert machine_busy_s(frozenset([10**6])) is None  # no such core: nothing read


def test_a_machine_without_proc_is_never_contended() -> None:
    watch = CpuContention(2, 2, machine=lambda: None, process=lambda: 0.0)
    assert watch.check() is False
    assert watch.check() is False


def test_margins_must_leave_room_for_hysteresis() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        CpuContention(2, 2, enter_margin=0.3, leave_margin=0.5)


def _spin(seconds: float, started: Any = None) -> None:
    if started is not None:
        started.set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _others_over(watch: CpuContention, seconds: float, *, spin: bool = False) -> float:
    """The other processes' cores over the next `seconds`, this process sleeping or
    spinning meanwhile."""
    watch.check()
    if spin:
        _spin(seconds)
    else:
        time.sleep(seconds)
    watch.check()
    return watch.others


def test_real_busy_processes_beside_this_one_are_seen() -> None:
    """Two processes spinning on the CPU are counted as others (from /proc), this one's
    own time is not. A machine running the suite has other work too (RabbitMQ's schedulers
    spin for a while after use), so each window is read against the quiet ones beside it."""
    if machine_busy_s() is None:
        pytest.skip("no /proc/stat here")
    watch = CpuContention(2, 2, interval_s=0.0)

    before = process_busy_s()
    quiet = [_others_over(watch, 0.5)]
    own = _others_over(watch, 0.5, spin=True)  # this process's own work is not the others'
    quiet.append(_others_over(watch, 0.5))
    assert process_busy_s() - before > 0.3
    # Counted as others, a core of spinning would read about 1.0 above the quiet windows.
    assert own < max(quiet) + 0.5, f"own work read as others': {own:.2f} (quiet {quiet})"

    ctx = multiprocessing.get_context("spawn")
    flags = [ctx.Event() for _ in range(2)]
    hogs = [ctx.Process(target=_spin, args=(3.0, flag)) for flag in flags]
    for hog in hogs:
        hog.start()
    try:
        # Spawned interpreters import this module before they spin: wait until both do.
        assert all(flag.wait(30) for flag in flags), "the spinning processes did not start"
        busy = _others_over(watch, 0.6)
        assert busy > min(quiet) + 1.0, f"two spinning processes read as {busy:.2f} cores"
        assert watch.contended is True
    finally:
        for hog in hogs:
            hog.join()


def test_the_workers_own_threads_outside_the_session_crowd_it_too() -> None:
    """With SessionThreads, the thread that calls (the engine's) and the session's pool are
    this process's; another thread of this process spinning (a task thread tokenizing,
    say) is counted with the others, as real CPU time from /proc/self/task."""
    if machine_busy_s() is None or not thread_ids():
        pytest.skip("no /proc here")
    assert threading.get_native_id() in thread_ids()
    watch = CpuContention(2, 2, interval_s=0.0, process=SessionThreads([]))

    quiet = [_others_over(watch, 0.5)]
    own = _others_over(watch, 0.5, spin=True)  # the calling thread: the session's own
    quiet.append(_others_over(watch, 0.5))
    assert own < max(quiet) + 0.5, f"the caller's work read as others': {own:.2f} ({quiet})"

    started = threading.Event()
    spinner = threading.Thread(target=_spin, args=(2.0, started))
    spinner.start()
    try:
        assert started.wait(10)
        busy = _others_over(watch, 0.6)
        assert busy > min(quiet) + 0.7, f"a spinning thread of this process read as {busy:.2f}"
        assert watch.contended is True
    finally:
        spinner.join()
    # The same thread's time, read directly: gone threads count nothing.
    assert threads_busy_s([spinner.native_id or -1]) == 0.0
    assert threads_busy_s([threading.get_native_id()]) > 0.3
