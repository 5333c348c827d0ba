"""A raw-socket HTTP/1.1 client that keeps sending a body until the server answers: what the
body-limit tests attack real servers with (a server that read whole bodies before looking at
them would take every byte before replying)."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

CHUNK = 64 * 1024


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the client got into the connection before the reply came

    def json(self) -> Any:
        return json.loads(self.body)


def send_until_answered(
    url: str, head: bytes, chunks: Iterator[bytes], *, timeout: float = 60
) -> Reply:
    """Sends `head`, then `chunks` one by one until the server answers or stops taking them."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    sent = 0
    try:
        sock.sendall(head)
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # the reply came before the body was all sent
            sock.settimeout(2)
            try:
                view = memoryview(chunk)
                while view:
                    n = sock.send(view)
                    sent += n
                    view = view[n:]
            except TimeoutError:
                break  # the server stopped reading: its reply must be there
            except (BrokenPipeError, ConnectionResetError):
                break  # it closed the connection after its reply
        sock.settimeout(timeout)
        return read_reply(sock, sent)
    finally:
        sock.close()


def read_reply(sock: socket.socket, sent: int) -> Reply:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            got = sock.recv(65536)
            if not got:
                break
            data += got
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(
            (name.lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        )
        if headers.get("transfer-encoding") == "chunked":
            while not body.endswith(b"0\r\n\r\n"):
                got = sock.recv(65536)
                if not got:
                    break
                body += got
            body = dechunk(body)
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            got = sock.recv(65536)
            if not got:
                break
            body += got
    except ConnectionResetError:
        raise AssertionError(f"the connection was reset before a whole reply: {data!r}") from None
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    return Reply(status=status, headers=headers, body=body, sent=sent)


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def request_head(
    url: str,
    path: str,
    *,
    authorization: str | None,
    length: int | None,
    extra: str = "",
    content_type: str = "application/json",
) -> bytes:
    """A POST's head; `length` None: the body follows chunked."""
    host = urlsplit(url).netloc
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Type: {content_type}"]
    if authorization:
        lines.append(f"Authorization: {authorization}")
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def plain_body(total: int) -> Iterator[bytes]:
    chunk = b"x" * CHUNK
    for _ in range(total // CHUNK):
        yield chunk


def chunked_body(total: int) -> Iterator[bytes]:
    for chunk in plain_body(total):
        yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
