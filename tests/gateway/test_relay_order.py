"""The SSE relay's order when a stream fails after it started: the worker is told to stop,
the client gets the error in-band, and only then is the request settled, on a fresh Redis
connection after an outage (settling first on the dead connections would fail and leave
the reservation held until the wallet resynchronises)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway import replies
from gateway.errors import OpenAIError
from gateway.pipeline import Generation


class Scripted(Generation):
    """A generation whose worker sends one piece of text, then fails with `failure`."""

    def __init__(self, failure: BaseException, order: list[str]) -> None:
        self.request_id = "req-1"
        self.prompt_tokens = 3
        self.completion_tokens = 0
        self.finished = False
        self.finish_reason = "stop"
        self.failure = failure
        self.order = order

    async def _events(self) -> AsyncIterator[dict[str, str]]:
        yield {"type": "delta", "text": "Hi", "tokens": "1"}
        raise self.failure

    def events(self) -> AsyncIterator[dict[str, str]]:  # type: ignore[override]
        return self._events()

    async def cancel(self) -> None:
        self.order.append("cancel")

    async def settle(self) -> None:
        self.order.append("settle")


def relay(generation: Generation, order: list[str]) -> list[str]:
    async def run() -> None:
        stream = replies.relay_sse(
            generation,
            opening={"o": 1},
            delta=lambda text: {"d": text},
            finish=lambda reason: {"f": reason},
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
            generation, opening={"o": 1}, delta=lambda t: {"d": t}, finish=dict, usage=None
        )
        await stream.__anext__()
        await stream.aclose()  # the client went away after the first chunk

    asyncio.run(run())
    assert order == ["cancel", "settle"]
