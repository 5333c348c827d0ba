"""Clients that read very slowly: the worker's slot is freed at once, gateway memory bounded."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from catalog.models import Endpoint
from core.redis import get_redis
from tests.reliability.conftest import Tenant, builtin_versions, endpoint_on, tenant_on
from tests.reliability.support import usage_by_request, wait_until
from tests.support.stack import Process, Stack, builtin_manifests
from workers.contract import worker_info_key

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(240),
    pytest.mark.models,
]


POOL = "relclients"
EMBED = "all-minilm-l6-v2"


# The gateway that drops clients which take no data for this long (MANTLE_SEND_TIMEOUT_S).
IMPATIENT_S = 2


@dataclass
class Served:
    url: str
    gateway: Process
    worker: Process
    manifests: list[dict[str, Any]]
    impatient_url: str
    impatient: Process
    tenant: Tenant | None = None

    @property
    def secret(self) -> str:
        assert self.tenant is not None
        return self.tenant.secret


@pytest.fixture(scope="module")
def platform(django_db_setup: None, django_db_blocker: Any) -> Iterator[Served]:
    manifests = builtin_manifests()
    stack = Stack.for_tests()
    try:
        gateway, url = stack.gateway(name="rel-clients-gateway")
        impatient, impatient_url = stack.gateway(
            name="rel-clients-impatient-gateway", MANTLE_SEND_TIMEOUT_S=str(IMPATIENT_S)
        )
        worker = stack.worker(POOL, name="rel-clients-worker", concurrency=16)
        yield Served(
            url=url,
            gateway=gateway,
            worker=worker,
            manifests=manifests,
            impatient_url=impatient_url,
            impatient=impatient,
        )
    finally:
        stack.stop_all()


@pytest.fixture
def served(platform: Served, transactional_db: None) -> Served:
    return dataclasses.replace(platform, tenant=tenant_on(POOL, platform.manifests))


def open_stream(
    url: str, secret: str, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> tuple[socket.socket, str]:
    """Sends a request on a socket with a tiny receive buffer; reads only the head."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect((parts.hostname, parts.port))
    payload = json.dumps(body).encode()
    sock.sendall(
        (
            f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
            f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + payload
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200 "), head
    match = re.search(rb"x-request-id: (\S+)", head, re.IGNORECASE)
    assert match, head
    return sock, match.group(1).decode()


def read_slowly(sock: socket.socket, step: int = 512, pause: float = 0.01) -> str:
    data = b""
    while chunk := sock.recv(step):
        data += chunk
        time.sleep(pause)
    sock.close()
    return data.decode(errors="replace")


def events_of(raw: str) -> list[Any]:
    out: list[Any] = []
    for line in raw.splitlines():
        if line.startswith("data: "):
            value = line.removeprefix("data: ")
            out.append(value if value == "[DONE]" else json.loads(value))
    return out


def slots(node: str) -> tuple[int, int]:
    info = json.loads(get_redis().get(worker_info_key(node)) or "{}")
    return int(info.get("free_slots", -1)), int(info.get("total_slots", -2))


def test_a_client_that_does_not_read_does_not_hold_the_worker(served: Served) -> None:
    body = {
        "model": served.tenant.chat.id if served.tenant else "",
        "messages": [{"role": "user", "content": "Write a poem about autumn leaves."}],
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sock, request_id = open_stream(served.url, served.secret, body)
    # The client reads nothing; the worker finishes and records usage regardless.
    assert wait_until(lambda: request_id in usage_by_request(get_redis()), timeout=90)
    node = served.worker.node
    assert wait_until(lambda: slots(node)[0] == slots(node)[1], timeout=15)
    event = usage_by_request(get_redis())[request_id]
    assert len(event) == 1 and event[0]["status"] in {"stop", "length"}
    events = events_of(read_slowly(sock))
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    text = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events[:-2] if e["choices"]
    )
    assert text
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        int(event[0]["input_tokens"]),
        int(event[0]["output_tokens"]),
    )


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_many_slow_readers_keep_the_gateway_memory_bounded(served: Served) -> None:
    prompt = " ".join(f"word{i}" for i in range(1000))
    body = {
        "model": served.tenant.echo.id if served.tenant else "",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 3000,
        "stream": True,
    }
    pid = served.gateway.popen.pid
    baseline = rss_kib(pid)
    peak = baseline
    opened = [open_stream(served.url, served.secret, body) for _ in range(12)]
    results: list[str] = []
    lock = threading.Lock()

    def reader(sock: socket.socket) -> None:
        raw = read_slowly(sock, step=1024, pause=0.005)
        with lock:
            results.append(raw)

    assert wait_until(
        lambda: all(rid in usage_by_request(get_redis()) for _, rid in opened), timeout=90
    )
    threads = [threading.Thread(target=reader, args=(sock,)) for sock, _ in opened]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_kib(pid))
        time.sleep(0.1)
    assert len(results) == 12
    for raw in results:
        assert events_of(raw)[-1] == "[DONE]"
    # Twelve replies of ~40 KB each are held at most once each, never accumulated.
    assert peak - baseline < 40 * 1024, (baseline, peak)


def read_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the server still sends, and whether it ended with a reset."""
    sock.settimeout(30)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, True
    finally:
        sock.close()
    return data, False


def dechunk(body: bytes) -> bytes:
    """A body sent with chunked transfer encoding, joined."""
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if not length:
            break
        out += rest[:length]
        body = rest[length + 2 :]
    return out


def embedding_endpoint(served: Served) -> Endpoint:
    assert served.tenant is not None
    version = builtin_versions(served.manifests)[EMBED]
    return endpoint_on(served.tenant.org, served.tenant.chat.pool, version)


def test_a_client_that_stops_reading_is_dropped_and_the_gateway_carries_on(
    served: Served,
) -> None:
    # About 8 MB of JSON: more than the kernel's socket buffers take on loopback, so
    # the gateway's writes wait on the client, which reads nothing after the head.
    endpoint = embedding_endpoint(served)
    body = {"model": endpoint.id, "input": [f"sentence {i} on the weather" for i in range(1024)]}
    sock, request_id = open_stream(served.impatient_url, served.secret, body, "/v1/embeddings")
    log = served.impatient.log
    dropped = f"({request_id}): the client took no data for {IMPATIENT_S:g} s; connection dropped"
    assert wait_until(lambda: dropped in log.read_text(errors="replace"), timeout=90), (
        served.impatient.tail()
    )
    rest, _ = read_until_closed(sock)
    # The reply was cut: it is not whole JSON (Content-Length would be far larger).
    with pytest.raises(ValueError):
        json.loads(rest)
    # The worker answered and was metered once; its slot is free.
    events = usage_by_request(get_redis())[request_id]
    assert len(events) == 1
    node = served.worker.node
    assert wait_until(lambda: slots(node)[0] == slots(node)[1], timeout=15)
    # The same gateway serves the next client, and the drop was a warning, not a crash.
    reply = httpx.post(
        f"{served.impatient_url}/v1/embeddings",
        json={**body, "input": "hello"},
        headers={"authorization": f"Bearer {served.secret}"},
        timeout=60,
    )
    assert reply.status_code == 200 and len(reply.json()["data"]) == 1
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "ASGI callable" not in text, text[-3000:]


def test_readers_that_keep_reading_are_never_dropped(served: Served) -> None:
    # Slow but steady: each write waits far less than the bound, however long the reply.
    endpoint = embedding_endpoint(served)
    body = {"model": endpoint.id, "input": [f"sentence {i} on the weather" for i in range(512)]}
    sock, request_id = open_stream(served.impatient_url, served.secret, body, "/v1/embeddings")
    data = b""
    while chunk := sock.recv(16384):
        data += chunk
        time.sleep(0.002)
    sock.close()
    assert len(json.loads(dechunk(data))["data"]) == 512
    assert request_id not in served.impatient.log.read_text(errors="replace")
