"""Outbound HTTP to destinations that operators or tenants name (upstream providers).

The policy (docs/security.md, docs/providers.md):
- `https` only; plain `http` only to hosts in MANTLE_PROVIDER_ALLOWED_HTTP;
- no credentials in the URL, no fragment, a host and a valid port;
- every address the host resolves to must be public: never loopback, private, link-local
  (cloud metadata: 169.254.169.254, fd00:ec2::254), CGNAT, multicast, reserved, unspecified,
  documentation or benchmarking ranges, nor an IPv6 form embedding such an IPv4 address
  (IPv4-mapped, 6to4, NAT64, Teredo), unless the host or network is in
  MANTLE_PROVIDER_ALLOWED_PRIVATE (`host`, `host:port` or a CIDR);
- numeric host forms that resolvers read as IPv4 (`2130706433`, `0x7f.1`, `127.1`,
  `0177.0.0.1`) are read as the address they mean;
- the address checked is the address connected to (pinned: no DNS rebinding between the
  check and the connection), with the Host header and TLS (SNI and certificate check) for the
  URL's host name;
- no redirects followed, no proxy or other settings from the environment.

Response bounds are the caller's, with `read_bounded` and `iter_lines`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Only these request headers are ever sent; the relay sets their values itself.
ALLOWED_HEADERS = frozenset(
    {"content-type", "accept", "user-agent", "authorization", "api-key", "content-length"}
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")


class DestinationRefused(Exception):
    """A URL or address the policy does not allow; the message says why (never a secret)."""


class ResponseTooLarge(Exception):
    """A response, or one of its lines, went past its bound."""


@dataclass(frozen=True, slots=True)
class Destination:
    url: str  # as named
    scheme: str
    host: str  # the URL's host name (Host header, SNI, certificate)
    port: int
    address: str  # the resolved address connected to
    connect_url: str  # the URL with the pinned address in place of the host


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _SIX_TO_FOUR and ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    # IPv4-compatible (deprecated ::a.b.c.d)
    if int(ip) >> 32 == 0 and int(ip) > 1:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public(ip: IPAddress) -> bool:
    """Whether an address is a public unicast one (and embeds no non-public IPv4)."""
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        return False
    if ip.is_private or ip.is_reserved or not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:
            return False
        return all(is_public(v4) for v4 in _embedded_ipv4(ip))
    return True


def numeric_host(host: str) -> IPAddress | None:
    """The address a host written as an IP means, in any form a resolver accepts (dotted,
    shortened, decimal, octal, hex IPv4; IPv6 with or without brackets), or None for a
    name."""
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if bare and all(c in "0123456789abcdefxABCDEFX." for c in bare) and bare[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def _allow_list() -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    names: set[str] = set()
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in settings.MANTLE_PROVIDER_ALLOWED_PRIVATE:
        value = str(entry).strip().lower()
        if not value:
            continue
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            names.add(value)
    return names, networks


def _allowed_private(host: str, port: int, ip: IPAddress) -> bool:
    names, networks = _allow_list()
    if host in names or f"{host}:{port}" in names:
        return True
    return any(ip.version == net.version and ip in net for net in networks)


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise DestinationRefused(f"the provider URL is not a valid URL ({exc})") from exc
    return parts


def check_url(url: str) -> None:
    """The checks that need no DNS: scheme, host, credentials, fragment, port, and an IP
    written in the URL. Raises DestinationRefused naming what is wrong."""
    _checked(url)


def _checked(url: str) -> tuple[SplitResult, str, int]:
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise DestinationRefused("the provider URL must use https")
    if parts.username is not None or parts.password is not None:
        raise DestinationRefused("the provider URL must not carry credentials")
    if parts.fragment:
        raise DestinationRefused("the provider URL must not have a fragment")
    raw_host = (parts.hostname or "").rstrip(".")
    if not raw_host:
        raise DestinationRefused("the provider URL has no host")
    try:
        host = raw_host.lower() if raw_host.isascii() else raw_host.encode("idna").decode()
    except UnicodeError as exc:
        raise DestinationRefused("the provider URL's host is not a valid name") from exc
    port = parts.port or (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise DestinationRefused("the provider URL's port is out of range")
    if scheme == "http":
        allowed = {str(h).strip().lower() for h in settings.MANTLE_PROVIDER_ALLOWED_HTTP}
        if host not in allowed and f"{host}:{port}" not in allowed:
            raise DestinationRefused(
                "the provider URL must use https (plain http only to hosts the operator allows)"
            )
    literal = numeric_host(host)
    if literal is not None:
        _check_address(host, port, literal)
    return parts, host, port


def _check_address(host: str, port: int, ip: IPAddress) -> None:
    if is_public(ip) or _allowed_private(host, port, ip):
        return
    named = host if numeric_host(host) is not None else f"{host} resolves to {ip}, which"
    raise DestinationRefused(
        f"{named} is not a public address; outbound requests go only to public addresses "
        "unless the operator allows the host"
    )


async def resolve(url: str, *, timeout_s: float = 5.0) -> Destination:
    """The URL checked, its host resolved and every address checked, one address pinned."""
    parts, host, port = _checked(url)
    literal = numeric_host(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(0.1, timeout_s)):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (TimeoutError, OSError) as exc:
            raise httpx.ConnectError(f"could not resolve {host}") from exc
        addresses = []
        for info in infos:
            raw = str(info[4][0]).split("%", 1)[0]
            found = ipaddress.ip_address(raw)
            if found not in addresses:
                addresses.append(found)
        if not addresses:
            raise httpx.ConnectError(f"{host} has no address")
    for address in addresses:
        _check_address(host, port, address)
    pinned = addresses[0]
    shown = f"[{pinned}]" if pinned.version == 6 else str(pinned)
    netloc = f"{shown}:{port}"
    connect_url = urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))
    return Destination(
        url=url,
        scheme=parts.scheme.lower(),
        host=host,
        port=port,
        address=str(pinned),
        connect_url=connect_url,
    )


def outbound_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Only the allowed request headers, lower-cased: nothing else of a customer's request
    can ride along."""
    return {k.lower(): v for k, v in headers.items() if k.lower() in ALLOWED_HEADERS}


# One client per (event loop, scheme, address, port, host name): a pooled connection is
# reused only for the destination it was made for (its TLS session names that host).
_clients: dict[tuple[int, str, str, int, str], httpx.AsyncClient] = {}
MAX_CLIENTS = 256


def _client(destination: Destination) -> httpx.AsyncClient:
    key = (
        id(asyncio.get_running_loop()),
        destination.scheme,
        destination.address,
        destination.port,
        destination.host,
    )
    found = _clients.get(key)
    if found is None or found.is_closed:
        if len(_clients) >= MAX_CLIENTS:
            _, oldest = _clients.popitem()
            asyncio.get_running_loop().create_task(oldest.aclose())
        found = _clients[key] = httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
    return found


async def send(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    content: bytes,
    connect_timeout_s: float,
    read_timeout_s: float,
) -> httpx.Response:
    """The response's head, its body still to read (`read_bounded`, `iter_lines`); the
    caller closes it (`aclose`). Raises DestinationRefused, or httpx's errors."""
    destination = await resolve(url, timeout_s=connect_timeout_s)
    host_header = (
        destination.host
        if destination.port == (443 if destination.scheme == "https" else 80)
        else f"{destination.host}:{destination.port}"
    )
    client = _client(destination)
    request = client.build_request(
        method,
        destination.connect_url,
        headers={**outbound_headers(headers), "host": host_header, "accept-encoding": "identity"},
        content=content,
        extensions={
            "sni_hostname": destination.host,
            "timeout": {
                "connect": connect_timeout_s,
                "read": read_timeout_s,
                "write": connect_timeout_s,
                "pool": connect_timeout_s,
            },
        },
    )
    return await client.send(request, stream=True, follow_redirects=False)


async def read_bounded(response: httpx.Response, limit: int, *, truncate: bool = False) -> bytes:
    """The body, at most `limit` bytes: past it, ResponseTooLarge (or, with `truncate`, the
    first `limit` bytes)."""
    out = bytearray()
    async for chunk in response.aiter_bytes():
        out += chunk
        if len(out) > limit:
            if truncate:
                return bytes(out[:limit])
            raise ResponseTooLarge(f"the response is larger than {limit} bytes")
    return bytes(out)


async def iter_lines(response: httpx.Response, max_line: int) -> AsyncIterator[bytes]:
    """The body's lines (without their ends), each at most `max_line` bytes."""
    buffer = bytearray()
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[:end]).rstrip(b"\r")
            del buffer[: end + 1]
            if len(line) > max_line:
                raise ResponseTooLarge(f"a line is longer than {max_line} bytes")
            yield line
        if len(buffer) > max_line:
            raise ResponseTooLarge(f"a line is longer than {max_line} bytes")
    if buffer:
        yield bytes(buffer).rstrip(b"\r")
