"""The relay's order when a stream fails after it started: the worker is told to stop,
the client gets the error in-band, and only then is the request settled, on a fresh Redis
connection after an outage (settling first on the dead connections would fail and leave
the reservation held until the wallet resynchronises). A one-shot request (embeddings, /v2
tensors) gets its result through the pipeline's `result_of`, which stops the worker when the
client goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway import replies
from gateway.errors import OpenAIError
from gateway.pipeline import Choice, Generation


class Scripted(Generation):
    """A generation whose worker sends one piece of text, then fails with `failure`."""

    def __init__(self, failure: BaseException, order: list[str]) -> None:
        self.request_id = "req-1"
        self.prompt_tokens = 3
        self.completion_tokens = 0
        self.finished = False
        self.finish_reason = "stop"
        self.n = 1
        self.choices = [Choice()]
        self.arrived = time.perf_counter()
        self.failure = failure
        self.order = order

    async def _events(self) -> AsyncIterator[dict[str, str]]:
        yield {"type": "delta", "text": "Hi", "tokens": "1"}
        raise self.failure

    def events(self) -> AsyncIterator[dict[str, str]]:
        return self._events()

    async def cancel(self) -> None:
        self.order.append("cancel")

    async def settle(self) -> None:
        self.order.append("settle")


def relay(generation: Generation, order: list[str]) -> list[str]:
    async def run() -> None:
        stream = replies.relay_sse(
            generation,
            opening=[{"o": 1}],
            chunks=lambda read: [{"d": read.text}] if read.kind == "text" else [],
            usage=None,
        )
        async for chunk in stream:
            order.append(chunk.decode().strip())

    asyncio.run(run())
    return order


def test_a_worker_error_mid_stream_cancels_then_tells_the_client_then_settles() -> None:
    order: list[str] = []
    failure = OpenAIError(500, "the worker failed", type_="server_error", code="server_error")
    relay(Scripted(failure, order), order)
    assert order[:2] == ['data: {"o":1}', 'data: {"d":"Hi"}']
    assert order[2] == "cancel"
    assert order[3].startswith("data: ") and '"code":"server_error"' in order[3]
    assert order[4:] == ["settle"]


def test_a_redis_outage_mid_stream_drops_the_dead_connections_before_settling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []

    async def forget() -> None:
        order.append("forget idle connections")

    monkeypatch.setattr(replies, "forget_idle_redis_connections", forget)
    relay(Scripted(RedisConnectionError("gone"), order), order)
    assert order[:3] == ['data: {"o":1}', 'data: {"d":"Hi"}', "forget idle connections"]
    assert '"code":"redis_unavailable"' in order[3]
    assert order[4:] == ["settle"]  # and no cancel: it could not reach Redis anyway


def test_a_client_that_goes_away_stops_the_worker_and_settles() -> None:
    order: list[str] = []

    async def run() -> None:
        generation = Scripted(RuntimeError("never reached"), order)
        stream = replies.relay_sse(
            generation,
            opening=[{"o": 1}],
            chunks=lambda read: [{"d": read.text}] if read.kind == "text" else [],
            usage=None,
        )
        await stream.__anext__()
        await stream.aclose()  # the client went away after the first chunk

    asyncio.run(run())
    assert order == ["cancel", "settle"]


def one_shot(
    monkeypatch: pytest.MonkeyPatch, events: list[dict[str, str]], *, hang: bool
) -> tuple[Mapping[str, str] | None, list[str]]:
    """`pipeline.result_of` over scripted worker events: (its result, what was cancelled)."""
    from gateway import dispatch, pipeline

    cancelled: list[str] = []

    async def scripted(ticket: object) -> AsyncIterator[dict[str, str]]:
        for event in events:
            yield event
        if hang:
            await asyncio.Event().wait()  # the worker is still computing

    async def cancel(request_id: str) -> None:
        cancelled.append(request_id)

    monkeypatch.setattr(dispatch, "events", scripted)
    monkeypatch.setattr(dispatch, "cancel", cancel)
    ticket = dispatch.Ticket("task", {}, "queue", "pool", "req-9", 0.0, 0.0)

    async def run() -> Mapping[str, str] | None:
        job = asyncio.ensure_future(pipeline.result_of(ticket, "tensors"))
        if hang:
            await asyncio.sleep(0.01)
            job.cancel()  # the client went away
        return await job

    try:
        return asyncio.run(run()), cancelled
    except asyncio.CancelledError:
        return None, [*cancelled, "caller cancelled"]


def test_a_one_shot_result_is_returned_and_nothing_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = [{"type": "started"}, {"type": "tensors", "outputs": "[]"}]
    assert one_shot(monkeypatch, events, hang=False) == ({"type": "tensors", "outputs": "[]"}, [])
    assert one_shot(monkeypatch, [{"type": "started"}], hang=False) == (None, [])


def test_a_one_shot_request_whose_client_goes_away_stops_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert one_shot(monkeypatch, [{"type": "started"}], hang=True) == (
        None,
        ["req-9", "caller cancelled"],
    )


def test_a_one_shot_workers_error_is_raised_as_its_openai_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = {"type": "error", "code": "invalid_request", "message": "bad input"}
    with pytest.raises(OpenAIError) as raised:
        one_shot(monkeypatch, [error], hang=False)
    assert (raised.value.status, raised.value.code) == (400, "invalid_request")
