"""A webhook receiver on loopback for the alert tests: a real HTTP server in a thread that
records each request and answers the statuses queued (then 200), with a `location` header
when one is set (a redirect); on 127.0.0.1 or [::1]; and the receiver's signature check
exactly as docs/billing.md writes it (not the platform's code)."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    location: str = ""  # sent as `location` with every answer when set
    # When set, a request is held (not recorded, not answered) until the test sets it.
    gate: threading.Event | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        host = "[::1]" if self.server.address_family == socket.AF_INET6 else "127.0.0.1"
        return f"http://{host}:{self.port}/hooks/mantle"

    def wait_for(self, count: int, timeout_s: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.requests)


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextmanager
def webhook_receiver(host: str = "127.0.0.1") -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            rec = state["r"]
            if rec.gate is not None:
                rec.gate.wait(60)
            rec.requests.append(
                Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            status = rec.statuses.pop(0) if rec.statuses else 200
            self.send_response(status)
            if rec.location:
                self.send_header("location", rec.location)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = (_Server6 if ":" in host else ThreadingHTTPServer)((host, 0), Handler)
    state["r"] = Receiver(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["r"]
    finally:
        server.shutdown()
        server.server_close()


def verify_as_documented(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """docs/billing.md's snippet, verbatim."""
    parts = dict(p.split("=", 1) for p in header.split(","))
    timestamp = int(parts["t"])
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = hmac.new(
        secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])
