"""The gateway's bound on clients that stop reading, on real sockets (config.asgi).

End to end through uvicorn: tests/reliability/test_client_faults.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest

from config.asgi import drop_when_undrained

REPLY = 8_000_000  # more than the kernel's buffers take on loopback


def run_server_with(
    on_connection: Callable[[asyncio.Transport], Awaitable[None]],
    client: Callable[[socket.socket], None],
) -> None:
    """Serves one connection whose handler writes REPLY bytes, then awaits `on_connection`."""

    async def main() -> None:
        finished = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"x" * REPLY)
            transport = writer.transport
            assert isinstance(transport, asyncio.Transport)
            await on_connection(transport)
            finished.set()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect(("127.0.0.1", port))
        thread = threading.Thread(target=client, args=(sock,))
        thread.start()
        try:
            await asyncio.wait_for(finished.wait(), 60)
        finally:
            await asyncio.to_thread(thread.join, 60)
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def read_all(sock: socket.socket, pause: float = 0.0) -> tuple[int, bool]:
    sock.settimeout(60)
    received = 0
    try:
        while chunk := sock.recv(65536):
            received += len(chunk)
            if pause:
                threading.Event().wait(pause)
    except ConnectionResetError:
        return received, True
    finally:
        sock.close()
    return received, False


def test_a_reply_left_unread_in_the_buffers_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    seen: dict[str, object] = {}
    gone = threading.Event()

    async def watch(transport: asyncio.Transport) -> None:
        seen["buffered"] = transport.get_write_buffer_size()
        await drop_when_undrained(transport, 0.3, "GET /v1/x (req_1)")
        seen["closing"] = transport.is_closing()
        gone.set()

    def client(sock: socket.socket) -> None:
        gone.wait(60)  # reads nothing until the server has given up on it
        seen["read"] = read_all(sock)

    with caplog.at_level(logging.WARNING, logger="mantle.gateway"):
        run_server_with(watch, client)
    assert int(seen["buffered"]) > 0  # type: ignore[call-overload]
    assert seen["closing"] is True
    received, _ = seen["read"]  # type: ignore[misc]
    assert received < REPLY  # what the kernel already held, then the end
    assert "GET /v1/x (req_1): the client took none of the last" in caplog.text


def test_a_reader_that_makes_progress_is_never_dropped(caplog: pytest.LogCaptureFixture) -> None:
    seen: dict[str, object] = {}

    async def watch(transport: asyncio.Transport) -> None:
        await drop_when_undrained(transport, 1.0, "GET /v1/x (req_2)")
        seen["closing"] = transport.is_closing()
        transport.close()

    def client(sock: socket.socket) -> None:
        seen["read"] = read_all(sock, pause=0.0002)

    with caplog.at_level(logging.WARNING, logger="mantle.gateway"):
        run_server_with(watch, client)
    assert seen["closing"] is False
    assert seen["read"] == (REPLY, False)
    assert "took none" not in caplog.text
