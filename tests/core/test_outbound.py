"""The outbound safety layer (core/outbound.py): destinations refused or allowed, the checked
address pinned, no redirects, only allowed headers, bounded reads. Requests go to real HTTP
servers on loopback started by the tests; DNS is the system's, except where a rebinding
resolver has to be simulated (no DNS server here answers differently on the second ask)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from django.test import override_settings

from core import outbound
from core.outbound import DestinationRefused, ResponseTooLarge


@pytest.fixture(autouse=True)
def _fresh_dns() -> None:
    """Each test resolves anew (the module keeps answers for DNS_CACHE_S)."""
    outbound.forget_dns()


NOT_PUBLIC = "not a public address"


# --- check_url: no DNS --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://127.0.0.1/v1", "127.0.0.1 is a loopback address"),
        ("https://127.9.9.9/v1", "loopback"),
        ("https://[::1]/v1", "::1 is a loopback address"),
        ("https://10.0.0.5/v1", "10.0.0.5 is a private address"),
        ("https://172.16.3.4/v1", "private"),
        ("https://192.168.1.1/v1", "private"),
        ("https://100.64.0.1/v1", "carrier-grade NAT"),
        ("https://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("https://169.254.1.1/", "link-local"),
        ("https://[fd00:ec2::254]/", "cloud metadata"),
        ("https://[fd12:3456::1]/", "unique-local"),
        ("https://[fe80::1]/", "link-local"),
        ("https://[fec0::1]/", "site-local"),
        ("https://[ff02::1]/", "multicast"),
        ("https://224.0.0.1/", "multicast"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://[::]/", "unspecified"),
        ("https://255.255.255.255/", "broadcast"),
        ("https://240.0.0.1/", "reserved"),
        ("https://192.0.2.10/", "documentation"),
        ("https://[2001:db8::1]/", "documentation"),
        ("https://198.18.0.1/", "benchmarking"),
        # IPv6 forms that embed an IPv4 address are judged by it.
        ("https://[::ffff:127.0.0.1]/v1", "127.0.0.1 embedded in IPv6"),
        ("https://[::ffff:169.254.169.254]/", "cloud metadata"),
        ("https://[2002:7f00:1::]/", "127.0.0.1 embedded"),  # 6to4
        ("https://[64:ff9b::a00:5]/", "10.0.0.5 embedded"),  # NAT64
        ("https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "Teredo"),
        # IPv4 written as a resolver reads it.
        ("https://2130706433/v1", "2130706433 means 127.0.0.1"),
        ("https://0x7f.1/v1", "0x7f.1 means 127.0.0.1"),
        ("https://127.1/v1", "127.1 means 127.0.0.1"),
        ("https://0177.0.0.1/v1", "0177.0.0.1 means 127.0.0.1"),
        ("https://0xa9fea9fe/", "cloud metadata"),
        ("https://012.0.0.5/", "10.0.0.5"),
    ],
)
def test_addresses_that_are_not_public_are_refused(url: str, words: str) -> None:
    with pytest.raises(DestinationRefused) as refused:
        outbound.check_url(url)
    message = str(refused.value)
    assert words in message
    assert NOT_PUBLIC in message
    assert "outbound requests go only to public addresses" in message


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://api.example.com/v1", "must use https"),
        ("ftp://api.example.com/", "must use https"),
        ("//api.example.com/", "must use https"),
        ("https://user:sk-live-SECRET@api.example.com/v1", "user name or password"),
        ("https://sk-live-SECRET@api.example.com/v1", "user name or password"),
        ("https://api.example.com/v1#frag", "fragment"),
        ("https://api.example.com:0/v1", "port"),
        ("https://api.example.com:65536/v1", "port"),
        ("https://api.example.com:x/v1", "port"),
        ("https:///v1", "needs a host"),
        ("https://1.2.3.4.5/", "not a valid address"),
        ("https://256.1.1.1/", "not a valid address"),
        ("https://api.example.0x1/", "not a valid address"),
        ("https://exa mple.com/", "spaces"),
        ("https://evil.example\\@api.example.com/", "backslashes"),
        ("https://api%2eexample.com/", "percent-encoded"),
        ("https://[fe80::1%25eth0]/", "zone"),
        ("https://-bad-.example.com/", "not a valid name"),
        ("https://api..example.com/", "not a valid name"),
        ("https://xn--a.example/", "not a valid name"),
    ],
)
def test_malformed_urls_are_refused_in_words_without_credentials(url: str, words: str) -> None:
    with pytest.raises(DestinationRefused) as refused:
        outbound.check_url(url)
    assert words in str(refused.value)
    assert "SECRET" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1",
        "https://api.openai.com./v1",  # a trailing dot
        "https://API.OpenAI.com:8443/v1?api-version=2024-10-21",
        "https://bücher.example/v1",  # IDNA
        "https://8.8.8.8/v1",
        "https://[2606:4700:4700::1111]/v1",
        "https://[::ffff:8.8.8.8]/v1",  # a public IPv4 address, mapped
        "https://[64:ff9b::808:808]/v1",  # ... through NAT64
        "https://134744072/v1",  # 8.8.8.8 as one number: what it means is public
    ],
)
def test_public_https_urls_pass(url: str) -> None:
    outbound.check_url(url)


def test_the_allow_lists_by_host_host_port_and_network() -> None:
    with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=["10.0.0.0/8", "[::1]:8443"]):
        outbound.check_url("https://10.1.2.3/v1")
        outbound.check_url("https://012.1.2.3/v1")  # 10.1.2.3, whatever the writing
        outbound.check_url("https://[::1]:8443/v1")
        with pytest.raises(DestinationRefused, match="loopback"):
            outbound.check_url("https://[::1]:8444/v1")  # another port of the same host
        with pytest.raises(DestinationRefused, match="loopback"):
            outbound.check_url("https://127.0.0.1/v1")
    with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=["127.0.0.1"]):
        outbound.check_url("https://127.0.0.1:9000/v1")  # a host: any port
        outbound.check_url("https://2130706433/v1")
    with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=["::ffff:10.0.0.0/104"]):
        outbound.check_url("https://[::ffff:10.0.0.7]/v1")


def test_plain_http_only_to_allow_listed_hosts() -> None:
    with pytest.raises(DestinationRefused, match="must use https"):
        outbound.check_url("http://vllm.example.com:8000/v1")
    with override_settings(MANTLE_PROVIDER_ALLOWED_HTTP=["vllm.example.com:8000"]):
        outbound.check_url("http://vllm.example.com:8000/v1")
        outbound.check_url("http://VLLM.example.com.:8000/v1")
        with pytest.raises(DestinationRefused, match="must use https"):
            outbound.check_url("http://vllm.example.com:8001/v1")
    with override_settings(MANTLE_PROVIDER_ALLOWED_HTTP=["vllm.example.com"]):
        outbound.check_url("http://vllm.example.com:8001/v1")
    # http to a private address needs both lists.
    with override_settings(MANTLE_PROVIDER_ALLOWED_HTTP=["10.0.0.5"]):
        with pytest.raises(DestinationRefused, match="private"):
            outbound.check_url("http://10.0.0.5/v1")
        with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=["10.0.0.5"]):
            outbound.check_url("http://10.0.0.5/v1")


def test_the_non_public_ranges_are_judged_by_the_address_not_the_python_version() -> None:
    import ipaddress

    assert outbound.non_public_reason(ipaddress.ip_address("1.1.1.1")) is None
    assert outbound.non_public_reason(ipaddress.ip_address("2a00:1450:4001::1")) is None
    assert outbound.non_public_reason(ipaddress.ip_address("100::1")) is not None
    assert outbound.non_public_reason(ipaddress.ip_address("::1.2.3.4")) is not None
    assert outbound.non_public_reason(ipaddress.ip_address("64:ff9b:1::a00:1")) is not None


# --- resolve: real DNS --------------------------------------------------------------------


def test_a_name_that_resolves_to_loopback_is_refused_unless_allow_listed() -> None:
    with pytest.raises(DestinationRefused) as refused:
        asyncio.run(outbound.resolve("https://localhost/v1", timeout_s=5))
    assert "localhost resolves to" in str(refused.value)
    assert "a loopback address" in str(refused.value)
    with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=["localhost"]):
        found = asyncio.run(outbound.resolve("https://localhost:8443/v1?x=1", timeout_s=5))
    assert found.host == "localhost"
    assert found.ip in {"127.0.0.1", "::1"}
    assert found.port == 8443
    assert found.scheme == "https"
    assert found.host_header == "localhost:8443"
    shown = f"[{found.ip}]" if ":" in found.ip else found.ip
    assert found.connect_url == f"https://{shown}:8443/v1?x=1"
    assert found.url == "https://localhost:8443/v1?x=1"


def test_a_host_port_entry_allows_only_that_port_after_resolution() -> None:
    with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=["localhost:8443"]):
        asyncio.run(outbound.resolve("https://localhost:8443/", timeout_s=5))
        with pytest.raises(DestinationRefused, match="loopback"):
            asyncio.run(outbound.resolve("https://localhost:443/", timeout_s=5))


def test_a_name_that_does_not_resolve_is_a_connection_error() -> None:
    with pytest.raises(httpx.ConnectError):
        asyncio.run(outbound.resolve("https://no-such-host.invalid/", timeout_s=5))


class FakeResolver:
    """A DNS answer that changes between asks, as a rebinding attacker's server does."""

    def __init__(self, *answers: list[str], delay_s: float = 0.0) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.delay_s = delay_s

    def __call__(self, host: str, port: int, *args: Any) -> list[Any]:
        import time

        time.sleep(self.delay_s)
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        out = []
        for ip in answer:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sockaddr = (ip, port, 0, 0) if ":" in ip else (ip, port)
            out.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return out


def test_any_non_public_address_among_the_answers_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outbound, "_getaddrinfo", FakeResolver(["93.184.215.14", "10.0.0.5"]))
    with pytest.raises(DestinationRefused) as refused:
        asyncio.run(outbound.resolve("https://api.example.com/v1", timeout_s=5))
    assert str(refused.value) == (
        "api.example.com resolves to 10.0.0.5 (a private address), not a public address; "
        "outbound requests go only to public addresses unless the operator allows the host"
    )
    monkeypatch.setattr(outbound, "_getaddrinfo", FakeResolver(["::ffff:169.254.169.254"]))
    outbound.forget_dns()
    with pytest.raises(DestinationRefused, match="cloud metadata"):
        asyncio.run(outbound.resolve("https://api.example.com/v1", timeout_s=5))


def test_resolution_is_bounded_by_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbound, "_getaddrinfo", FakeResolver(["8.8.8.8"], delay_s=1.0))
    with pytest.raises(httpx.ConnectTimeout):
        asyncio.run(outbound.resolve("https://slow.example.com/", timeout_s=0.1))


# --- real requests to a real server on loopback --------------------------------------------


@dataclass
class Seen:
    peer: str
    local: tuple[str, int]
    method: str
    path: str
    headers: dict[str, str]
    connection: int


@dataclass
class Server:
    """A small HTTP/1.1 server (keep-alive) whose answers the tests choose by path."""

    host: str
    port: int = 0
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    clients_gone: int = 0
    connections_closed: int = 0
    server: asyncio.AbstractServer | None = None

    async def start(self) -> Server:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                if int(headers.get("content-length", "0")):
                    await reader.readexactly(int(headers["content-length"]))
                peer = writer.get_extra_info("peername")[0]
                local = writer.get_extra_info("sockname")[:2]
                self.requests.append(Seen(peer, local, method, path, headers, number))
                if not await self._answer(path, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.connections_closed += 1

    async def _answer(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Writes the answer; False closes the connection."""
        if path.startswith("/redirect"):
            writer.write(
                b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/latest\r\n"
                b"content-length: 0\r\n\r\n"
            )
        elif path.startswith("/big"):
            # Declares nothing and sends 1 MiB, then closes.
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
            for _ in range(16):
                writer.write(b"x" * 65536)
                await writer.drain()
            return False
        elif path.startswith("/endless"):
            # Chunks until the client goes, which it records.
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            try:
                while True:
                    writer.write(b"400\r\n" + b"e" * 1024 + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.01)
            except ConnectionError:
                self.clients_gone += 1
                return False
        elif path.startswith("/cut"):
            # Two whole events of a chunked stream, then the connection closes mid-answer.
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for event in (b'data: {"a":1}\n\n', b'data: {"b":2}\n\n'):
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            return False
        elif path.startswith("/declared"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 999999999\r\n\r\nabc")
            await writer.drain()
            return False
        elif path.startswith("/long-line"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"connection: close\r\n\r\ndata: {}\r\n\r\n")
            for _ in range(64):  # one endless line
                writer.write(b"y" * 65536)
                await writer.drain()
            return False
        elif path.startswith("/sse"):
            body = b'data: {"a":1}\r\n\r\ndata: {"b":2}\n\n: comment\ndata: [DONE]'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
        elif path.startswith("/gzip"):
            import gzip

            body = gzip.compress(b"z" * 1_000_000)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\n")
            writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
        else:
            body = b'{"ok":true}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
            writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        return True


def with_server(scenario: Callable[[Server], Awaitable[None]], host: str = "127.0.0.1") -> Server:
    async def main() -> Server:
        server = await Server(host).start()
        try:
            await scenario(server)
        finally:
            await outbound.aclose()
            await server.stop()
        return server

    return asyncio.run(main())


LOCAL = override_settings(
    MANTLE_PROVIDER_ALLOWED_PRIVATE=["localhost", "127.0.0.1", "pinned.example"],
    MANTLE_PROVIDER_ALLOWED_HTTP=["localhost", "127.0.0.1", "pinned.example"],
)


async def get(url: str, **kwargs: Any) -> httpx.Response:
    return await outbound.request(
        "GET",
        url,
        headers=kwargs.pop("headers", {}),
        connect_timeout_s=5,
        read_timeout_s=5,
        **kwargs,
    )


def test_a_loopback_server_is_refused_until_allow_listed() -> None:
    async def scenario(server: Server) -> None:
        with pytest.raises(DestinationRefused, match="must use https"):
            await get(f"http://127.0.0.1:{server.port}/ok")
        with override_settings(MANTLE_PROVIDER_ALLOWED_HTTP=["127.0.0.1", "localhost"]):
            with pytest.raises(DestinationRefused, match="loopback"):
                await get(f"http://127.0.0.1:{server.port}/ok")
            with pytest.raises(DestinationRefused, match="loopback"):
                await get(f"http://localhost:{server.port}/ok")
        with LOCAL:
            response = await get(f"http://127.0.0.1:{server.port}/ok")
            assert response.json() == {"ok": True}

    served = with_server(scenario)
    assert len(served.requests) == 1  # the refused ones never connected


def test_the_connection_goes_to_the_address_checked_with_the_names_host_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The name answers 127.0.0.1 first, then (a rebinding attacker) the metadata address.
    resolver = FakeResolver(["127.0.0.1"], ["169.254.169.254"])
    monkeypatch.setattr(outbound, "_getaddrinfo", resolver)

    async def scenario(server: Server) -> None:
        with LOCAL:
            response = await get(f"http://pinned.example:{server.port}/ok")
        assert response.status_code == 200
        destination = outbound.destination_of(response)
        assert destination is not None
        assert destination.ip == "127.0.0.1"
        assert destination.host == "pinned.example"
        assert str(response.request.url) == f"http://127.0.0.1:{server.port}/ok"

    served = with_server(scenario)
    assert resolver.calls == 1  # resolved once: the connection used that answer
    (seen,) = served.requests
    assert seen.local == ("127.0.0.1", served.port)
    assert seen.headers["host"] == f"pinned.example:{served.port}"


def test_a_real_name_is_resolved_once_and_its_checked_address_is_used() -> None:
    checked: list[str] = []

    async def scenario(server: Server) -> None:
        with LOCAL:
            destination = await outbound.resolve(f"http://localhost:{server.port}/ok", timeout_s=5)
            checked.append(destination.ip)
            response = await outbound.request(
                "POST",
                f"http://localhost:{server.port}/ok",
                headers={"content-type": "application/json"},
                content=b"{}",
                connect_timeout_s=5,
                read_timeout_s=5,
                stream=True,
            )
            try:
                assert await outbound.read_bounded(response, 100) == b'{"ok":true}'
            finally:
                await response.aclose()

    # `localhost` resolves to 127.0.0.1 here, where the server listens.
    served = with_server(scenario, host=str(socket.getaddrinfo("localhost", 0)[0][4][0]))
    # The server saw the connection arrive at the address that was checked.
    assert served.requests[0].local[0] == checked[0]
    assert served.requests[0].headers["host"] == f"localhost:{served.port}"


def test_connections_are_reused_only_for_the_same_address_port_and_host_name() -> None:
    async def scenario(server: Server) -> None:
        with LOCAL:
            await get(f"http://localhost:{server.port}/ok")
            await get(f"http://localhost:{server.port}/ok")
            await get(f"http://127.0.0.1:{server.port}/ok")
            await get(f"http://127.0.0.1:{server.port}/ok")

    served = with_server(scenario)
    by_host = {(s.headers["host"].split(":")[0], s.connection) for s in served.requests}
    assert by_host == {("localhost", 1), ("127.0.0.1", 2)}
    assert served.connections == 2


def test_redirects_are_not_followed() -> None:
    async def scenario(server: Server) -> None:
        with LOCAL:
            response = await get(f"http://127.0.0.1:{server.port}/redirect")
        assert response.status_code == 302
        assert response.headers["location"] == "http://169.254.169.254/latest"

    served = with_server(scenario)
    assert [s.path for s in served.requests] == ["/redirect"]


def test_only_documented_headers_leave() -> None:
    customer = {
        "Authorization": "Bearer provider-key",
        "api-key": "azure-key",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "User-Agent": "customer-agent",
        "Cookie": "sessionid=abc",
        "X-Forwarded-For": "203.0.113.9",
        "X-Api-Key": "mantle-key",
        "Host": "169.254.169.254",
        "Proxy-Authorization": "Basic x",
        "X-Evil": "a\r\nInjected: yes",
    }
    assert outbound.outbound_headers(customer) == {
        "authorization": "Bearer provider-key",
        "api-key": "azure-key",
        "content-type": "application/json",
        "accept": "text/event-stream",
        "user-agent": outbound.USER_AGENT,
    }

    async def scenario(server: Server) -> None:
        with LOCAL:
            await get(f"http://127.0.0.1:{server.port}/ok", headers=customer)

    (seen,) = with_server(scenario).requests
    assert set(seen.headers) <= {
        "authorization",
        "api-key",
        "content-type",
        "accept",
        "user-agent",
        "host",
        "accept-encoding",
        "content-length",
    }
    assert seen.headers["user-agent"] == outbound.USER_AGENT
    assert seen.headers["host"] == f"127.0.0.1:{seen.local[1]}"
    assert seen.headers["accept-encoding"] == "identity"


def test_read_bounded_stops_past_its_limit() -> None:
    async def scenario(server: Server) -> None:
        with LOCAL:
            response = await outbound.send(
                "GET",
                f"http://127.0.0.1:{server.port}/big",
                headers={},
                content=b"",
                connect_timeout_s=5,
                read_timeout_s=5,
            )
            try:
                with pytest.raises(ResponseTooLarge):
                    await outbound.read_bounded(response, 100_000)
            finally:
                await response.aclose()
            response = await get(f"http://127.0.0.1:{server.port}/big", stream=True)
            try:
                assert await outbound.read_bounded(response, 1000, truncate=True) == b"x" * 1000
            finally:
                await response.aclose()
            # A declared length past the limit is refused before reading.
            response = await get(f"http://127.0.0.1:{server.port}/declared", stream=True)
            try:
                with pytest.raises(ResponseTooLarge, match="declares"):
                    await outbound.read_bounded(response, 1000)
            finally:
                await response.aclose()
            # Without stream, the whole answer is bounded by the setting.
            with (
                override_settings(MANTLE_PROVIDER_MAX_RESPONSE_BYTES=200_000),
                pytest.raises(ResponseTooLarge),
            ):
                await get(f"http://127.0.0.1:{server.port}/big")
            # A compressed answer is refused, not inflated.
            response = await get(f"http://127.0.0.1:{server.port}/gzip", stream=True)
            try:
                with pytest.raises(httpx.DecodingError):
                    await outbound.read_bounded(response, 10_000_000)
            finally:
                await response.aclose()

    with_server(scenario)


def test_iter_lines_yields_lines_and_stops_at_a_line_past_its_limit() -> None:
    async def scenario(server: Server) -> None:
        with LOCAL:
            response = await get(f"http://127.0.0.1:{server.port}/sse", stream=True)
            try:
                lines = [line async for line in outbound.iter_lines(response, 64)]
            finally:
                await response.aclose()
            assert lines == [
                b'data: {"a":1}',
                b"",
                b'data: {"b":2}',
                b"",
                b": comment",
                b"data: [DONE]",
            ]
            response = await get(f"http://127.0.0.1:{server.port}/long-line", stream=True)
            got: list[bytes] = []
            try:
                with pytest.raises(ResponseTooLarge, match="line"):
                    async for line in outbound.iter_lines(response, 1024 * 1024):
                        got.append(line)
            finally:
                await response.aclose()
            assert got == [b"data: {}", b""]
            response = await get(f"http://127.0.0.1:{server.port}/big", stream=True)
            try:
                with pytest.raises(ResponseTooLarge, match="stream"):
                    async for _ in outbound.iter_lines(
                        response, 10_000_000, max_total_bytes=300_000
                    ):
                        pass
            finally:
                await response.aclose()

    with_server(scenario)


def test_what_came_before_a_cut_is_read_even_when_the_cut_came_first() -> None:
    """aiohttp raises a broken-off body's error before the bytes it had already received
    (the reader took its time: a busy gateway relays the chunks after the provider is
    gone); those bytes are read first, then the cut raises."""

    async def scenario(server: Server) -> None:
        with LOCAL:
            response = await get(f"http://127.0.0.1:{server.port}/cut", stream=True)
            try:
                for _ in range(200):  # until the server has closed the connection
                    if server.requests and server.connections_closed:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # and the client's loop has taken in the close
                got: list[bytes] = []
                with pytest.raises(httpx.RemoteProtocolError):
                    async for line in outbound.iter_lines(response, 1024):
                        got.append(line)
            finally:
                await response.aclose()
            assert got == [b'data: {"a":1}', b"", b'data: {"b":2}', b""]

    with_server(scenario)


def test_one_client_per_event_loop_closed_cleanly() -> None:
    async def two() -> tuple[Any, Any]:
        first = outbound._client()
        assert outbound._client() is first
        await outbound.aclose()
        assert first.is_closed
        second = outbound._client()
        await outbound.aclose()
        return first, second

    a, b = asyncio.run(two())
    assert a is not b
    assert id(a) not in {id(entry[1]) for entry in outbound._clients.values()}


# --- TLS: SNI and the certificate for the name, at the pinned address ----------------------


def make_certificates(directory: Any, name: str) -> tuple[str, str, str]:
    """A CA and a certificate for `name` it signs: (ca.pem, cert.pem, key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outbound test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(paths[0]), str(paths[1]), str(paths[2])


def test_tls_goes_to_the_pinned_address_with_sni_and_the_certificate_for_the_name(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    ca, cert, key = make_certificates(tmp_path, "provider.example")
    monkeypatch.setattr(outbound, "ssl_context", lambda: ssl.create_default_context(cafile=ca))
    monkeypatch.setattr(outbound, "_getaddrinfo", FakeResolver(["127.0.0.1"]))
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)
    names: list[str | None] = []

    def remember(sock: Any, name: str | None, context: Any) -> None:
        names.append(name)

    server_ssl.sni_callback = remember

    async def main() -> Server:
        server = Server("127.0.0.1")
        server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_ssl)
        server.port = server.server.sockets[0].getsockname()[1]
        allowed = override_settings(
            MANTLE_PROVIDER_ALLOWED_PRIVATE=["127.0.0.1", "provider.example", "other.example"]
        )
        try:
            with allowed:
                response = await get(f"https://provider.example:{server.port}/ok")
                assert response.json() == {"ok": True}
                # The same address under another name: its own connection, and the
                # certificate (for provider.example) does not match that name.
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await get(f"https://other.example:{server.port}/ok")
                # The address itself: the certificate names no address.
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await get(f"https://127.0.0.1:{server.port}/ok")
        finally:
            await outbound.aclose()
            await server.stop()
        return server

    served = asyncio.run(main())
    assert names[0] == "provider.example"
    assert "other.example" in names
    (seen,) = served.requests
    assert seen.headers["host"] == f"provider.example:{served.port}"
    assert seen.local == ("127.0.0.1", served.port)


def test_closing_a_stream_midway_closes_its_connection() -> None:
    async def scenario(server: Server) -> None:
        with LOCAL:
            response = await get(f"http://127.0.0.1:{server.port}/endless", stream=True)
            async for _ in response.aiter_raw():
                break
            await response.aclose()
            for _ in range(200):
                if server.clients_gone:
                    break
                await asyncio.sleep(0.01)
            assert server.clients_gone == 1
            await get(f"http://127.0.0.1:{server.port}/ok")

    served = with_server(scenario)
    assert served.connections == 2  # the half-read connection was closed, not reused


def test_a_cached_answer_is_checked_again_on_every_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache saves the lookup, never the check: an allow-list narrowed meanwhile (or a
    cached private answer) is refused on the next use."""
    calls: list[str] = []

    def resolver(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 443))]

    monkeypatch.setattr(outbound, "_getaddrinfo", resolver)
    with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=["10.0.0.0/8"]):
        first = asyncio.run(outbound.resolve("https://internal.example/v1"))
        assert first.ip == "10.1.2.3"
    with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=[]), pytest.raises(DestinationRefused):
        asyncio.run(outbound.resolve("https://internal.example/v1"))
    assert calls == ["internal.example"]  # looked up once


def test_a_name_that_fails_to_resolve_is_not_asked_again_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dead domain named by a tenant costs one lookup per DNS_NEGATIVE_S, not one per
    request; the failure is the same error each time, and the name is asked again after."""
    calls: list[str] = []

    def resolver(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(outbound, "_getaddrinfo", resolver)
    for _ in range(3):
        with pytest.raises(httpx.ConnectError, match=r"dead\.example does not resolve"):
            asyncio.run(outbound.resolve("https://dead.example/hook", timeout_s=5))
    assert calls == ["dead.example"]
    clock = outbound.time.monotonic() + outbound.DNS_NEGATIVE_S + 1
    monkeypatch.setattr(outbound.time, "monotonic", lambda: clock)
    with pytest.raises(httpx.ConnectError):
        asyncio.run(outbound.resolve("https://dead.example/hook", timeout_s=5))
    assert calls == ["dead.example", "dead.example"]


def test_a_slow_name_is_not_asked_again_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = FakeResolver(["8.8.8.8"], delay_s=0.3)
    monkeypatch.setattr(outbound, "_getaddrinfo", resolver)
    for _ in range(2):
        with pytest.raises(httpx.ConnectTimeout):
            asyncio.run(outbound.resolve("https://slow.example.com/", timeout_s=0.05))
    import time

    time.sleep(0.4)  # the lookup under way (0.3 s) has ended
    assert resolver.calls == 1  # the second request did not start a lookup of its own


def test_allow_lists_are_parsed_once_and_read_at_every_check() -> None:
    with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=["10.0.0.0/8", "db.internal:8443"]):
        first = outbound.OPERATOR.allowed_private()
        assert outbound.OPERATOR.allowed_private() is first  # not parsed again
        assert first.allows("db.internal", 8443, None)
    with override_settings(MANTLE_PROVIDER_ALLOWED_PRIVATE=["10.0.0.0/8"]):
        narrowed = outbound.OPERATOR.allowed_private()
        assert narrowed is not first and not narrowed.allows("db.internal", 8443, None)


def test_a_tenants_destination_gets_no_use_of_the_operators_allow_lists() -> None:
    """`trusted=False` (an organization's own provider): public https only, whatever the
    operator allow-lists for its own providers."""
    with override_settings(
        MANTLE_PROVIDER_ALLOWED_PRIVATE=["127.0.0.1", "10.0.0.0/8"],
        MANTLE_PROVIDER_ALLOWED_HTTP=["127.0.0.1"],
    ):
        assert asyncio.run(outbound.resolve("http://127.0.0.1:9/v1")).ip == "127.0.0.1"
        with pytest.raises(DestinationRefused):
            outbound.check_url("http://127.0.0.1:9/v1", trusted=False)
        with pytest.raises(DestinationRefused):
            asyncio.run(outbound.resolve("https://10.1.2.3/v1", trusted=False))
        with pytest.raises(DestinationRefused):
            asyncio.run(
                outbound.send(
                    "POST",
                    "https://127.0.0.1:9/v1",
                    headers={},
                    connect_timeout_s=1,
                    read_timeout_s=1,
                    trusted=False,
                )
            )


def test_an_organizations_slow_names_hold_at_most_its_share_of_the_resolver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack: a tenant's own provider (or identity provider) names ever new subdomains
    of a domain whose name server is slow. Each lookup holds a resolver thread past the
    caller's timeout; at most DNS_PER_OWNER of one organization's are under way (the rest
    refused at once, no thread taken), all organizations' together at most DNS_THREADS -
    DNS_OPERATOR_RESERVE, and the operator's own destinations are always looked up."""
    import time

    resolver = FakeResolver(["8.8.8.8"], delay_s=0.6)
    monkeypatch.setattr(outbound, "_getaddrinfo", resolver)
    assert (outbound.DNS_PER_OWNER, outbound.DNS_THREADS, outbound.DNS_OPERATOR_RESERVE) == (
        2,
        8,
        2,
    )

    async def names(owner: str, count: int, start: int = 0) -> list[str]:
        outcomes = []
        for i in range(start, start + count):
            try:
                await outbound.resolve(
                    f"https://n{i}.{owner}.slow.example/", timeout_s=0.05, owner=owner
                )
                outcomes.append("resolved")
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)
        return outcomes

    assert asyncio.run(names("org-a", 4)) == [
        "ConnectTimeout",
        "ConnectTimeout",
        "LookupsBusy",
        "LookupsBusy",
    ]
    # Two more organizations fill the owners' six threads; a fourth is refused...
    assert asyncio.run(names("org-b", 2)) == ["ConnectTimeout"] * 2
    assert asyncio.run(names("org-c", 2)) == ["ConnectTimeout"] * 2
    assert asyncio.run(names("org-d", 1)) == ["LookupsBusy"]
    # ...while the operator's own destination is still looked up (a thread is kept for it).
    operator = asyncio.run(outbound.resolve("https://api.operator.example/", timeout_s=2))
    assert operator.ip == "8.8.8.8"
    time.sleep(0.8)  # the slow lookups end: their threads, and the counts, are free again
    assert outbound._owned_lookups == {}
    assert resolver.calls == 7  # six slow names and the operator's: the refused asked nothing
    found = asyncio.run(
        outbound.resolve("https://again.org-a.example/", timeout_s=2, owner="org-a")
    )
    assert found.ip == "8.8.8.8" and outbound._owned_lookups == {}
