"""Oldest request first on a gateway process's event loop.

asyncio runs the ready tasks a step each in turn: the loop shares its CPU among every
request in progress. When a burst of requests arrives at once, each one's parsing, key
check, admission and upstream request interleave with all the others', so every request of
the burst is ready to call its provider only when the whole burst's work is done: the first
waits as long as the last. Requests that arrive together then come back together (a
provider's answers take about the same time), and the next burst is the same burst again:
the clients stay in step and every cycle pays the burst's whole CPU
(docs/benchmarks.md, the relay's overhead).

A turn makes that work run one request at a time, the oldest first. An inference view takes
a turn when it starts (`take`); it gives it away while it waits on Redis, the database or a
thread (`away`, in the places that wait: the key's resolution, database reads, the grammar
build, the admission), and comes back in the order of arrival, before newer requests; it
gives it up for good when the request leaves the gateway's own work (the provider is
called, or the pool is handed the request; `give_up`, also at the end of every view).

Waiting for a turn is bounded: a request that has waited `MAX_WAIT_S` goes on beside the
holder (a holder that waits on something the code did not mark costs the others at most
that for each time they wait, and nothing can wait on a turn forever). A request that
fails, is refused or is cancelled gives its turn up at once. Turns order work; they never
refuse any.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
import weakref
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from django.conf import settings

from core import metrics

MAX_WAIT_S = 0.025
# How long a request keeps its turn while it waits on Redis (a round trip on a local network
# takes well under a millisecond).
REDIS_HOLD_S = 0.005

_order = itertools.count()


@dataclass
class Turns:
    """One event loop's turns: how many requests hold one (one, except past a bounded wait)
    and the waiting requests by arrival (a heap; entries whose wait ended are dropped as
    they come to the top, and all at once when they outnumber the live ones)."""

    held: int = 0
    waiting: list[tuple[float, int, asyncio.Future[None]]] = field(default_factory=list)
    live: int = 0  # entries of `waiting` still waiting
    # Counters (tests, metrics): turns handed over in order, waits that ran out.
    handed: int = 0
    expired: int = 0

    async def take(self, arrival: float) -> None:
        if self.held == 0:  # nobody holds one, so nobody waits for one (`give`)
            self.held = 1
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self.waiting, (arrival, next(_order), future))
        self.live += 1
        timer = loop.call_later(MAX_WAIT_S, self._expire, future)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.give()  # handed a turn it will not use: the next one gets it
            else:
                future.cancel()
                self.live -= 1
                self._prune()
            raise
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future[None]) -> None:
        if not future.done():
            self.held += 1  # goes on beside the holder
            self.live -= 1
            self.expired += 1
            metrics.TURN_WAITS_EXPIRED.inc()
            future.set_result(None)
            self._prune()

    def give(self) -> None:
        if self.held > 1:  # one of those past a wait: back to one holder
            self.held -= 1
            return
        while self.waiting:
            _, _, future = heapq.heappop(self.waiting)
            if not future.done():
                self.live -= 1
                self.handed += 1
                metrics.TURNS_HANDED.inc()
                future.set_result(None)  # the turn passes on: `held` is unchanged
                self._prune()
                return
        self.held = 0

    def _prune(self) -> None:
        while self.waiting and self.waiting[0][2].done():
            heapq.heappop(self.waiting)
        if len(self.waiting) > 2 * self.live + 64:
            self.waiting = [w for w in self.waiting if not w[2].done()]
            heapq.heapify(self.waiting)


@dataclass
class _Turn:
    turns: Turns
    arrival: float
    # The request's own task: a task it starts sees this turn in its context, but it is a
    # request of its own. Weak: such a task may outlive the request.
    task: weakref.ref[asyncio.Task[object]] | None
    holding: bool = False
    done: bool = False  # given up for good: `away` and `give_up` do nothing
    io: object = None  # the `away` block the request is in (its timer acts for that one only)


_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = weakref.WeakKeyDictionary()
_current: ContextVar[_Turn | None] = ContextVar("mantle_turn", default=None)

metrics.TURNS_HELD.set_function(lambda: sum(t.held for t in list(_loops.values())))
metrics.TURNS_WAITING.set_function(lambda: sum(t.live for t in list(_loops.values())))


def of_loop() -> Turns:
    """The running loop's turns."""
    loop = asyncio.get_running_loop()
    found = _loops.get(loop)
    if found is None:
        found = _loops[loop] = Turns()
    return found


def _mine() -> _Turn | None:
    """The running request's turn, not given up."""
    turn = _current.get()
    if turn is None or turn.done or turn.task is None or turn.task() is not asyncio.current_task():
        return None
    return turn


def holding() -> bool:
    """Whether the running request has a turn it has not given up (a view called by another
    view's request leaves the turn to its caller)."""
    return _mine() is not None


async def take() -> None:
    """The request's turn (called first in an inference view; its arrival is now). A
    request that holds one already (a view called from another) keeps it."""
    if _mine() is not None or not settings.MANTLE_GATEWAY_TURNS:
        return
    task = asyncio.current_task()
    turn = _Turn(of_loop(), time.monotonic(), weakref.ref(task) if task is not None else None)
    _current.set(turn)
    await turn.turns.take(turn.arrival)
    turn.holding = True


def give_up() -> None:
    """The request's gateway work is over (or it failed, or is refused): its turn passes on
    for good."""
    turn = _mine()
    if turn is None:
        return
    _end(turn)
    _current.set(None)


def _end(turn: _Turn) -> None:
    turn.done = True
    if turn.holding:
        turn.holding = False
        turn.turns.give()


@contextlib.asynccontextmanager
async def away(hold_s: float = 0.0) -> AsyncIterator[None]:
    """Around a wait on I/O: the turn goes to the next request meanwhile (after `hold_s` of
    waiting: a round trip to Redis usually ends sooner, and keeping the turn for it keeps
    the requests' sends apart), and comes back before any request that arrived later. A
    wait that ends in an error gives the turn up for good (the request is failing)."""
    turn = _mine()
    if turn is None or not turn.holding:
        yield
        return
    token, outer = object(), turn.io
    turn.io = token
    timer: asyncio.TimerHandle | None = None
    if hold_s > 0:
        timer = asyncio.get_running_loop().call_later(hold_s, _let_go, turn, token)
    else:
        _let_go(turn, token)
    try:
        yield
    except BaseException:
        _end(turn)
        raise
    finally:
        turn.io = outer
        if timer is not None:
            timer.cancel()
    if not turn.done and not turn.holding:
        await turn.turns.take(turn.arrival)
        turn.holding = True


def _let_go(turn: _Turn, token: object) -> None:
    if turn.io is token and turn.holding and not turn.done:
        turn.holding = False
        turn.turns.give()
