"""A small asyncio HTTP/1.1 keep-alive load client: cheap enough to share 2 cores with a server."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0
    elapsed: float = 0.0

    def pct(self, p: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(p / 100 * len(data)))] * 1000 if data else 0.0


class Conn:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, path: str, body: dict[str, Any] | None, secret: str
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode() if body is not None else b""
        method = "POST" if body is not None else "GET"
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {secret}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        self.writer.write(head + payload)
        assert self.reader is not None
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        chunked = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value:
                chunked = True
        if not chunked:
            return status, await self.reader.readexactly(length)
        data = b""
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            if size == 0:
                await self.reader.readline()
                return status, data
            data += await self.reader.readexactly(size)
            await self.reader.readline()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_load(
    url: str,
    path: str,
    body: dict[str, Any] | list[dict[str, Any]] | None,
    secret: str,
    *,
    concurrency: int,
    requests: int | None = None,
    seconds: float | None = None,
) -> Result:
    result = Result()
    bodies: list[Any] = body if isinstance(body, list) else [body]
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + seconds if seconds else None

    async def client() -> None:
        conn = Conn(url)
        try:
            while True:
                n = next(counter)
                if requests is not None and n >= requests:
                    return
                if stop_at is not None and time.perf_counter() >= stop_at:
                    return
                started = time.perf_counter()
                status, data = await conn.request(path, bodies[n % len(bodies)], secret)
                result.latencies.append(time.perf_counter() - started)
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 200 and body is not None:
                    usage = json.loads(data).get("usage") or {}
                    result.completion_tokens += int(usage.get("completion_tokens", 0))
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - started
    return result
