"""Faults on demand: a private Redis that can be killed and restarted, and TCP proxies to cut."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.support.stack import free_port


class PrivateRedis:
    """A redis-server of this test's own, durable (AOF, fsync always) across kill and restart.

    The machine's shared Redis is never stopped; faults happen to this one only.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mantle-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError("the private redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only what the AOF already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class TcpProxy:
    """A TCP forwarder (asyncio, in a thread of the test process) that can be cut and restored.

    `cut()` stops listening and aborts every open connection, so the dependency
    behind it is unreachable for the processes that dial the proxy; `restore()`
    listens again on the same port. It listens on 127.0.0.1 and a free port unless
    told an address (another host's side of a network namespace's link) and a port.
    """

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = listen_port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.restore()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._open -= {writer, up_writer}

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self.port, reuse_address=True
        )

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        self._run(self._listen())

    def cut(self) -> None:
        self._run(self._cut())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()  # its self-pipe sockets, which would otherwise leak


@dataclass
class Outcome:
    """What one client request ended as, seen from the client."""

    stream: bool
    url: str = ""
    status: int = 0
    request_id: str = ""
    usage: tuple[int, int] | None = None  # (prompt, completion) the client was told
    error_code: str | None = None
    error_message: str = ""
    done: bool = False  # a stream that ended with [DONE]
    transport_error: str = ""  # a hang (timeout) or a broken connection: never acceptable


def call(
    url: str,
    secret: str,
    model: str,
    *,
    stream: bool,
    content: str = "hello there, how are you today?",
    max_tokens: int = 16,
    timeout: float = 60,
    extra: dict[str, Any] | None = None,
) -> Outcome:
    """One chat completion, streamed or not, recorded as an Outcome (never raises);
    `extra`: more body fields."""
    import json

    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
        **(extra or {}),
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    out = Outcome(stream=stream, url=url)
    headers = {"authorization": f"Bearer {secret}"}
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout
        ) as response:
            out.status = response.status_code
            out.request_id = response.headers.get("x-request-id", "")
            if not stream or response.status_code != 200:
                payload = json.loads(response.read())
                if response.status_code == 200:
                    usage = payload["usage"]
                    out.usage = (usage["prompt_tokens"], usage["completion_tokens"])
                else:
                    out.error_code = payload["error"]["code"]
                    out.error_message = payload["error"]["message"]
                return out
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    out.done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error_code = chunk["error"]["code"]
                    out.error_message = chunk["error"]["message"]
                elif chunk.get("usage"):
                    out.usage = (
                        chunk["usage"]["prompt_tokens"],
                        chunk["usage"]["completion_tokens"],
                    )
    except (httpx.HTTPError, ValueError) as exc:
        out.transport_error = f"{type(exc).__name__}: {exc}"
    return out


@dataclass
class Load:
    """Client threads calling in a loop until stopped; every outcome kept."""

    url: str | list[str]
    secret: str
    model: str
    threads: int = 4
    max_tokens: int = 16
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _loop(self, index: int) -> None:
        urls = self.url if isinstance(self.url, list) else [self.url]
        n = 0
        while not self._stop.is_set():
            url = urls[(index + n) % len(urls)]
            outcome = call(
                url,
                self.secret,
                self.model,
                stream=(index + n) % 2 == 0,
                max_tokens=self.max_tokens,
            )
            n += 1
            with self._lock:
                self.outcomes.append(outcome)

    def start(self) -> Load:
        for i in range(self.threads):
            thread = threading.Thread(target=self._loop, args=(i,), daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in self._workers), "a client request hung"
        return list(self.outcomes)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@contextlib.contextmanager
def redis_url_of_tests(url: str) -> Iterator[None]:
    """Points this test process's Redis (settings and the shared client) at `url`."""
    from django.conf import settings

    from core import redis as config_redis

    saved = settings.REDIS_URL
    settings.REDIS_URL = url
    config_redis._sync_client = None
    try:
        yield
    finally:
        settings.REDIS_URL = saved
        config_redis._sync_client = None


def usage_by_request(client: redis.Redis) -> dict[str, list[dict[str, str]]]:
    from workers.contract import USAGE_STREAM

    found: dict[str, list[dict[str, str]]] = {}
    for _, fields in client.xrange(USAGE_STREAM):
        decoded = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        found.setdefault(decoded["request_id"], []).append(decoded)
    return found


def await_usage_events(outcomes: list[Outcome], client: redis.Redis, timeout: float = 15) -> None:
    """Waits (bounded) until every answered request's usage event is in the stream.

    A worker appends the event just after the answer's last event, so a client can
    finish a moment before its usage is written; what is checked is that it is written.
    """
    answered = {o.request_id for o in outcomes if o.usage is not None and o.error_code is None}
    wait_until(lambda: answered <= set(usage_by_request(client)), timeout=timeout)


def check_usage_exactly_once(outcomes: list[Outcome], client: redis.Redis) -> None:
    """Each answered request has one usage event equal to what its client was told; others <= 1."""
    await_usage_events(outcomes, client)
    events = usage_by_request(client)
    for outcome in outcomes:
        found = events.get(outcome.request_id, [])
        if outcome.usage is not None and outcome.error_code is None:
            assert len(found) == 1, (outcome, found)
            assert (int(found[0]["input_tokens"]), int(found[0]["output_tokens"])) == outcome.usage
        else:
            assert len(found) <= 1, (outcome, found)
