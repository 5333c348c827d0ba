"""Turns on a gateway loop: a burst's requests do their own work one at a time, oldest
first, and nothing can hold or lose a turn for good (core/turns.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from core import turns

STEPS = 5  # each request's own work: this many steps, each a yield to the loop


@pytest.fixture(autouse=True)
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """No wait runs out in these tests unless one sets MAX_WAIT_S itself: what they see is
    the order turns give, not the bound (a loaded machine cannot change them)."""
    monkeypatch.setattr(turns, "MAX_WAIT_S", 30.0)


async def _request(
    name: str, log: list[str], io: Callable[[], Awaitable[None]] | None = None
) -> None:
    """A request's gateway work: steps that yield to the loop (as a coroutine that awaits
    anything does), a wait on I/O in the middle, then the provider is called."""
    await turns.take()
    try:
        for step in range(STEPS):
            log.append(f"{name}{step}")
            await asyncio.sleep(0)
            if step == 2 and io is not None:
                async with turns.away():
                    await io()
        log.append(f"{name}-sent")
        turns.give_up()
    finally:
        turns.give_up()


async def _burst(count: int, *, ordered: bool) -> list[str]:
    log: list[str] = []

    async def plain(name: str) -> None:  # the same work without turns
        for step in range(STEPS):
            log.append(f"{name}{step}")
            await asyncio.sleep(0)
        log.append(f"{name}-sent")

    names = [chr(ord("a") + i) for i in range(count)]
    work = [_request(n, log) if ordered else plain(n) for n in names]
    await asyncio.gather(*work)
    assert turns.of_loop().expired == 0
    assert turns.of_loop().held == 0
    return log


def test_a_burst_sends_its_first_request_after_that_request_s_own_work() -> None:
    log = asyncio.run(_burst(8, ordered=True))
    # Without turns the first request is sent only after every request's work (the loop
    # shares itself among them); with turns, after its own work alone.
    assert log.index("a-sent") == STEPS
    assert [e for e in log if e.endswith("-sent")] == [f"{c}-sent" for c in "abcdefgh"]
    for c in "abcdefgh":  # each request's steps run together
        first = log.index(f"{c}0")
        assert log[first : first + STEPS + 1] == [f"{c}{s}" for s in range(STEPS)] + [f"{c}-sent"]


def test_without_turns_the_first_request_waits_for_the_whole_burst() -> None:
    # The shape the turns exist to change, checked so that the test above can fail.
    log = asyncio.run(_burst(8, ordered=False))
    assert log.index("a-sent") >= 8 * STEPS


def test_back_from_io_a_request_goes_before_those_that_arrived_later() -> None:
    async def scene() -> list[str]:
        log: list[str] = []
        release = asyncio.Event()

        async def io() -> None:
            await release.wait()

        first = asyncio.create_task(_request("a", log, io))
        await asyncio.sleep(0)  # a holds the turn
        others = [asyncio.create_task(_request(n, log)) for n in "bcd"]
        while "b0" not in log:  # a went away at its I/O: b has the turn
            await asyncio.sleep(0)
        release.set()  # a's I/O ends while b works; c and d wait
        await asyncio.gather(first, *others)
        return log

    log = asyncio.run(scene())
    sends = [e for e in log if e.endswith("-sent")]
    assert sends == ["b-sent", "a-sent", "c-sent", "d-sent"]
    assert log.index("a3") > log.index("b-sent")  # a came back when b was done
    assert log.index("a3") < log.index("c0")  # and before c, which arrived later


def test_a_short_wait_keeps_the_turn_and_a_long_one_passes_it_on() -> None:
    async def scene(hold_s: float, io_s: float) -> tuple[list[str], int]:
        log: list[str] = []

        async def first() -> None:
            await turns.take()
            try:
                log.append("a-before")
                async with turns.away(hold_s):
                    await asyncio.sleep(io_s)
                log.append("a-after")
            finally:
                turns.give_up()

        async def second() -> None:
            await turns.take()
            log.append("b")
            turns.give_up()

        a = asyncio.create_task(first())
        await asyncio.sleep(0)
        await asyncio.gather(a, second())
        assert turns.of_loop().expired == 0
        return log, turns.of_loop().handed

    # Kept through the wait: b gets the turn when a is done (one handing).
    assert asyncio.run(scene(hold_s=1.0, io_s=0.01)) == (["a-before", "a-after", "b"], 1)
    # Let go after hold_s: b is handed the turn and runs meanwhile; a comes back to a free
    # turn.
    assert asyncio.run(scene(hold_s=0.01, io_s=0.2)) == (["a-before", "b", "a-after"], 1)


def test_a_holder_that_never_gives_its_turn_up_delays_the_next_request_boundedly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(turns, "MAX_WAIT_S", 0.025)

    async def scene() -> tuple[int, int, float]:
        gate = asyncio.Event()

        async def hog() -> None:
            await turns.take()
            await gate.wait()  # waits on something unmarked, holding the turn
            turns.give_up()

        hogging = asyncio.create_task(hog())
        await asyncio.sleep(0)
        started = time.monotonic()
        await turns.take()  # goes on beside it, after MAX_WAIT_S
        waited = time.monotonic() - started
        held = turns.of_loop().held
        turns.give_up()
        gate.set()
        await hogging
        return turns.of_loop().expired, held, waited

    expired, held, waited = asyncio.run(scene())
    assert expired == 1
    assert held == 2
    assert waited >= turns.MAX_WAIT_S


def test_cancelled_requests_leave_no_turn_held_or_waiting() -> None:
    async def scene() -> tuple[int, int, list[str]]:
        log: list[str] = []

        async def waiter(name: str) -> None:
            await turns.take()
            try:
                log.append(name)
            finally:
                turns.give_up()

        await turns.take()  # this request holds the turn
        cancelled = asyncio.create_task(waiter("cancelled"))
        handed = asyncio.create_task(waiter("handed-then-cancelled"))
        kept = asyncio.create_task(waiter("kept"))
        await asyncio.sleep(0)  # the three wait, in this order
        cancelled.cancel()  # cancelled while it waits
        await asyncio.sleep(0)
        turns.give_up()  # the turn goes to the oldest still waiting...
        handed.cancel()  # ...which is cancelled before it could run
        await asyncio.gather(cancelled, handed, kept, return_exceptions=True)
        state = turns.of_loop()
        return state.held, sum(not w[2].done() for w in state.waiting), log

    held, waiting, log = asyncio.run(scene())
    assert log == ["kept"]
    assert (held, waiting) == (0, 0)


def test_a_request_that_fails_in_a_wait_does_not_wait_for_its_turn_again() -> None:
    async def scene() -> tuple[list[str], int]:
        log: list[str] = []
        release = asyncio.Event()

        async def failing() -> None:
            await turns.take()
            try:
                async with turns.away():  # lets the turn go while it waits...
                    await asyncio.sleep(0.01)
                    raise RuntimeError("the database is down")  # ...and fails
            finally:
                log.append("a-failed")
                turns.give_up()

        async def holder() -> None:
            await turns.take()  # handed the turn when a lets it go, and keeps it
            await release.wait()
            log.append("b")
            turns.give_up()

        a = asyncio.create_task(failing())
        await asyncio.sleep(0)
        b = asyncio.create_task(holder())
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(a, 5.0)  # not behind b's turn
        release.set()
        await b
        # Outside any request: `away` and `give_up` change nothing.
        async with turns.away():
            await asyncio.sleep(0)
        turns.give_up()
        return log, turns.of_loop().held

    assert asyncio.run(scene()) == (["a-failed", "b"], 0)


def test_waits_that_ran_out_do_not_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two holders that never give their turns up (past a wait): every later request waits
    MAX_WAIT_S and goes on; the heap of waiters does not keep them."""
    monkeypatch.setattr(turns, "MAX_WAIT_S", 0.0)

    async def scene() -> tuple[int, int, int]:
        state = turns.of_loop()
        await state.take(0.0)
        await state.take(0.0)  # expired at once: two holders
        for i in range(2000):
            await state.take(float(i))  # each expires, and is never given back
            state.give()
        return len(state.waiting), state.live, state.held

    waiting, live, held = asyncio.run(scene())
    assert waiting <= 64
    assert live == 0
    assert held == 2


def test_a_view_called_by_another_leaves_the_turn_to_its_caller() -> None:
    from django.http import HttpRequest, HttpResponse

    from gateway.replies import gateway_view

    @gateway_view
    async def inner(request: HttpRequest) -> HttpResponse:
        await turns.take()
        return HttpResponse(b"inner")

    async def scene() -> tuple[bool, bool]:
        await turns.take()
        await inner(HttpRequest())
        still = turns.holding()
        turns.give_up()
        return still, turns.holding()

    assert asyncio.run(scene()) == (True, False)


def test_turns_switched_off_leave_the_loop_shared(settings: object) -> None:
    settings.MANTLE_GATEWAY_TURNS = False  # type: ignore[attr-defined]
    log = asyncio.run(_burst(8, ordered=True))
    assert log.index("a-sent") >= 8 * STEPS
