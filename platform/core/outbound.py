"""Outbound HTTP to URLs operators or tenants name: only to allowed destinations, pinned,
bounded.

Every request the platform makes to a provider's base URL (the relay, `gateway.relay`) or to
a customer's webhook endpoint (`billing.alerts.delivery`) goes through here; catalog
services and the webhook service check a URL with `check_url` when it is saved.

The policy (docs/security.md, item 14):

- **Whose destination.** Each caller names its `Policy`, and only that policy's allow-lists
  apply: `OPERATOR` (the operator's providers: MANTLE_PROVIDER_ALLOWED_HTTP and
  MANTLE_PROVIDER_ALLOWED_PRIVATE), `ORGANIZATION_PROVIDER` (an organization's own provider:
  MANTLE_PROVIDER_BYOK_ALLOWED_HTTP / _PRIVATE, empty by default) and `WEBHOOK` (customers'
  webhook endpoints: MANTLE_WEBHOOK_ALLOWED_HTTP / _PRIVATE, empty by default, and only port
  443 or 1024-65535 unless the host is listed). A tenant's URL never gets the use of the
  operator's lists.
- **Scheme.** `https` only; plain `http` only to hosts in the policy's http list (`host`,
  `host:port`, or a CIDR for an IP literal).
- **Addresses.** The host is resolved (getaddrinfo on a thread of this module's own, bounded
  by the connect timeout) and *every* address is checked: one loopback, private (RFC 1918),
  CGNAT, link-local (cloud metadata 169.254.169.254 included), multicast, reserved,
  unspecified, broadcast, documentation, benchmarking, unique-local (fd00:ec2::254 included),
  site-local or other non-global address refuses the destination, unless the policy's
  private list names the host, the `host:port` or a network holding the address. IPv6
  addresses that embed an IPv4 one (IPv4-mapped, NAT64, 6to4) are judged by the IPv4
  address; Teredo is refused. IPv4 written other than in dotted decimal (`2130706433`,
  `0x7f.1`, `127.1`, `0177.0.0.1`) is read as the address a resolver makes of it.
- **Pinning.** The request connects to the address that was checked (the URL's host is
  replaced by it), with the original `Host` header, TLS SNI and certificate verification
  against the original host name (httpcore's `sni_hostname` extension), so a second DNS
  answer (rebinding) is never used. Connections are pooled per (scheme, address, port, host
  name): one made for one host name is never reused for another.
- **No redirects** are followed, no proxy or other environment setting is read
  (`trust_env=False`), no cookie is kept, responses must not be compressed (`identity` is
  asked for; a compressed answer is refused rather than inflated).
- **Headers.** Only `outbound_headers`'s allow-list leaves: content type, accept, the
  platform's user agent and the provider's credential (authorization / api-key), which the
  relay sets itself. Nothing of the customer's request is forwarded.
- **Bounds.** Connect and read timeouts per request; `read_bounded` and `iter_lines` stop
  reading past a byte limit.

One `httpx.AsyncClient` per event loop (the gateway runs several); `aclose()` closes the
running loop's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import re
import socket
import ssl
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import idna
from django.conf import settings

USER_AGENT = "mantle-relay/1"

# The request headers that may leave the platform (lower case); anything else is dropped.
# `x-mantle-relay-hops` is the relay's own (docs/providers.md): how many Mantle gateways a
# request has passed, so that a route that leads back to a Mantle relaying it again stops.
ALLOWED_HEADERS = frozenset(
    {"content-type", "accept", "user-agent", "authorization", "api-key", "x-mantle-relay-hops"}
    # The signature and event id of billing's webhook deliveries (billing/alerts/delivery.py).
    | {"mantle-signature", "mantle-event-id"}
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Pools kept per loop: past this many, idle ones are closed, oldest first.
MAX_POOLS = 256
DNS_THREADS = 8

_getaddrinfo = socket.getaddrinfo  # the resolver (tests replace it to simulate rebinding)


class DestinationRefused(Exception):
    """A URL or its resolved addresses that the outbound policy does not allow. The message
    says what is wrong in words a customer can act on; it never quotes the URL's path,
    query or credentials."""


class ResponseTooLarge(Exception):
    """A provider's answer, or one line of it, past its byte limit."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a request goes: `ip` is the checked address the connection is made to,
    `host` the name sent as Host and TLS SNI (IDNA-encoded, lower case, no trailing dot;
    the canonical address for an IP literal), `connect_url` the URL with `ip` for host."""

    url: str
    ip: str
    host: str
    port: int
    scheme: str
    connect_url: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


# --- the address policy ------------------------------------------------------------------

_V4_RANGES: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "a cloud metadata address"),
    ("255.255.255.255/32", "the broadcast address"),
    ("0.0.0.0/8", "an unspecified (this-network) address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "a reserved (IETF protocol) address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a reserved (6to4 relay) address"),
    ("192.168.0.0/16", "a private address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
)
_V6_RANGES: tuple[tuple[str, str], ...] = (
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("fd00:ec2::254/128", "a cloud metadata address"),
    ("64:ff9b:1::/48", "a private (local NAT64) address"),
    ("100::/64", "a reserved (discard) address"),
    ("2001::/32", "a Teredo tunnel address"),
    ("2001:2::/48", "a benchmarking address"),
    ("2001:10::/28", "a reserved (ORCHID) address"),
    ("2001:20::/28", "a reserved (ORCHID) address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "a reserved (segment routing) address"),
    ("fc00::/7", "a unique-local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
)
_V4_NETS = tuple((ipaddress.IPv4Network(n), w) for n, w in _V4_RANGES)
_V6_NETS = tuple((ipaddress.IPv6Network(n), w) for n, w in _V6_RANGES)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def non_public_reason(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast address ("a private address", ...), or None
    when it is. IPv6 embedding IPv4 (mapped, NAT64, 6to4) is judged by the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None:
            reason = non_public_reason(embedded)
            return None if reason is None else f"{reason} ({embedded} embedded in IPv6)"
        for net6, why in _V6_NETS:
            if address in net6:
                return why
        if address not in _GLOBAL_UNICAST or not address.is_global:
            return "a reserved address"
        return None
    for net4, why in _V4_NETS:
        if address in net4:
            return why
    if not address.is_global:
        return "a reserved address"
    return None


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    return None


# --- URL syntax ---------------------------------------------------------------------------

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMERIC_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


@dataclass(frozen=True, slots=True)
class _Parsed:
    scheme: str
    host: str  # normalised name, or the canonical text of an IP literal
    address: IPAddress | None  # set for an IP literal
    port: int
    target: str  # path and query, as given
    written: str  # the host as the URL writes it (for messages)


def _parse(url: str) -> _Parsed:
    if not isinstance(url, str) or not url:
        raise DestinationRefused("the provider URL is empty")
    if len(url) > 2000:
        raise DestinationRefused("the provider URL is longer than 2000 characters")
    if any(ord(c) <= 32 or ord(c) == 127 or c == "\\" for c in url):
        raise DestinationRefused(
            "the provider URL must not contain spaces, control characters or backslashes"
        )
    try:
        parts = urlsplit(url)
    except ValueError:
        raise DestinationRefused("the provider URL is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise DestinationRefused("the provider URL must use https")
    netloc = parts.netloc
    if "@" in netloc:
        raise DestinationRefused(
            "the provider URL must not contain a user name or password; "
            "put the key in the provider's credential"
        )
    if parts.fragment or url.endswith("#"):
        raise DestinationRefused("the provider URL must not have a fragment (#...)")
    raw_host, port = _split_host_port(netloc, scheme)
    host, address = _normalise_host(raw_host)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return _Parsed(scheme, host, address, port, target, raw_host[:80])


def _split_host_port(netloc: str, scheme: str) -> tuple[str, int]:
    default = 443 if scheme == "https" else 80
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise DestinationRefused("the provider URL has an unclosed [ in its host")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise DestinationRefused("the provider URL's host is not valid")
        port_text = rest[1:] if rest else None
    elif ":" in netloc:
        host, port_text = netloc.rsplit(":", 1)
    else:
        host, port_text = netloc, None
    if not host:
        raise DestinationRefused("the provider URL needs a host")
    if port_text is None or port_text == "":
        return host, default
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise DestinationRefused("the provider URL's port must be a number from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise DestinationRefused("the provider URL's port must be a number from 1 to 65535")
    return host, port


def _normalise_host(raw: str) -> tuple[str, IPAddress | None]:
    """(host, address): an IPv6 or dotted-decimal IPv4 literal, or an IDNA-encoded lower-case
    name without its trailing dot. Numeric forms that resolvers read as IPv4 are refused."""
    if raw.startswith("["):
        inner = raw[1:-1]
        if "%" in inner:
            raise DestinationRefused("the provider URL must not use an IPv6 zone (%...)")
        try:
            v6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise DestinationRefused("the provider URL's IPv6 address is not valid") from None
        return str(v6), v6
    if "%" in raw:
        raise DestinationRefused("the provider URL's host must not be percent-encoded")
    name = raw[:-1] if raw.endswith(".") else raw
    if not name or name.endswith("."):
        raise DestinationRefused("the provider URL's host is not valid")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise DestinationRefused(
                "the provider URL's host is not a valid internationalised domain name"
            ) from None
    name = name.lower()
    labels = name.split(".")
    if _NUMERIC_PART.match(labels[-1]):
        # Resolvers (inet_aton) read a name ending in a number as an IPv4 address.
        v4 = _inet_aton(labels)
        if v4 is None:
            raise DestinationRefused(f"the provider URL's host {name!r} is not a valid address")
        return str(v4), v4  # what a resolver would connect to, judged as such
    if len(name) > 253 or not all(_LABEL.match(label) and _punycode_ok(label) for label in labels):
        raise DestinationRefused(f"the provider URL's host {name[:80]!r} is not a valid name")
    return name, None


def _punycode_ok(label: str) -> bool:
    if not label.startswith("xn--"):
        return True
    try:
        idna.decode(label)
    except (idna.IDNAError, UnicodeError):
        return False
    return True


def _inet_aton(labels: Sequence[str]) -> ipaddress.IPv4Address | None:
    """What the C library's inet_aton makes of these parts (1 to 4 of decimal, 0x-hex or
    0-octal numbers, the last filling the remaining bytes), or None."""
    if not 1 <= len(labels) <= 4:
        return None
    values: list[int] = []
    for label in labels:
        if not _NUMERIC_PART.match(label):
            return None
        try:
            if label.startswith("0x"):
                values.append(int(label[2:] or "0", 16))
            elif len(label) > 1 and label.startswith("0"):
                values.append(int(label, 8))
            else:
                values.append(int(label))
        except ValueError:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    total = last
    for i, v in enumerate(head):
        total |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(total)


# --- allow-lists --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _AllowList:
    hosts: frozenset[str]
    host_ports: frozenset[tuple[str, int]]
    networks: tuple[Network, ...]

    def allows(self, host: str, port: int, address: IPAddress | None) -> bool:
        if host in self.hosts or (host, port) in self.host_ports:
            return True
        if address is None:
            return False
        if str(address) in self.hosts or (str(address), port) in self.host_ports:
            return True
        return any(address in net for net in self.networks)


@functools.lru_cache(maxsize=64)
def _allow_list(entries: tuple[str, ...]) -> _AllowList:
    """The parsed list, remembered by its entries: settings are still read at every check
    (an override or a changed list takes effect at once), only the parsing is saved."""
    hosts: set[str] = set()
    host_ports: set[tuple[str, int]] = set()
    networks: list[Network] = []
    for raw in entries or ():
        entry = str(raw).strip().lower()
        if not entry:
            continue
        try:
            hosts.add(str(ipaddress.ip_address(entry.strip("[]"))))
            continue
        except ValueError:
            pass
        if "/" in entry:
            with contextlib.suppress(ValueError):  # an unreadable entry allows nothing
                networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        try:
            host_text, port = _split_host_port(entry, "https")
            host, _ = _normalise_host(host_text)
        except DestinationRefused:
            continue
        if entry.endswith(":" + str(port)):
            host_ports.add((host, port))
        else:
            hosts.add(host)
    return _AllowList(frozenset(hosts), frozenset(host_ports), tuple(networks))


@dataclass(frozen=True, slots=True)
class Policy:
    """Whose destination a URL is, and so which allow-lists (settings read at each check)
    apply to it. `low_ports`: whether ports below 1024 other than 443 (and 80 for an
    allowed plain http host) may be named by a host none of the lists names."""

    name: str
    http_setting: str
    private_setting: str
    low_ports: bool = True
    noun: str = "the provider URL"  # how refusals name the URL

    def words(self, refused: DestinationRefused) -> DestinationRefused:
        """The refusal in this policy's words (the checks below write a provider's)."""
        if self.noun == "the provider URL":
            return refused
        text = str(refused).replace("; put the key in the provider's credential", "")
        return DestinationRefused(text.replace("the provider URL", self.noun))

    def allowed_http(self) -> _AllowList:
        return _allow_list(tuple(map(str, getattr(settings, self.http_setting, None) or ())))

    def allowed_private(self) -> _AllowList:
        return _allow_list(tuple(map(str, getattr(settings, self.private_setting, None) or ())))


# The operator's own providers: the operator names them, and may allow its internal hosts.
OPERATOR = Policy("operator", "MANTLE_PROVIDER_ALLOWED_HTTP", "MANTLE_PROVIDER_ALLOWED_PRIVATE")
# An organization's own provider (BYOK): a tenant names it; empty lists by default.
ORGANIZATION_PROVIDER = Policy(
    "organization provider",
    "MANTLE_PROVIDER_BYOK_ALLOWED_HTTP",
    "MANTLE_PROVIDER_BYOK_ALLOWED_PRIVATE",
)
# A customer's webhook endpoint (billing/alerts/): a tenant names it; empty lists by default,
# and no well-known port but 443 (a POST to someone's SMTP or SSH port is not a webhook).
WEBHOOK = Policy(
    "webhook",
    "MANTLE_WEBHOOK_ALLOWED_HTTP",
    "MANTLE_WEBHOOK_ALLOWED_PRIVATE",
    low_ports=False,
    noun="the webhook URL",
)


def policy_of(*, trusted: bool = True, policy: Policy | None = None) -> Policy:
    """`policy` when given; else the operator's (`trusted`) or an organization's provider."""
    if policy is not None:
        return policy
    return OPERATOR if trusted else ORGANIZATION_PROVIDER


def _check(parsed: _Parsed, policy: Policy) -> None:
    if parsed.scheme == "http" and not policy.allowed_http().allows(
        parsed.host, parsed.port, parsed.address
    ):
        raise DestinationRefused(
            "the provider URL must use https (plain http only to hosts the operator allows)"
        )
    if not policy.low_ports and parsed.port < 1024 and parsed.port not in (443, 80):
        listed = policy.allowed_http().allows(
            parsed.host, parsed.port, parsed.address
        ) or policy.allowed_private().allows(parsed.host, parsed.port, parsed.address)
        if not listed:
            raise DestinationRefused(
                f"the provider URL's port {parsed.port} is not allowed: "
                "use 443 or a port from 1024 to 65535"
            )
    if parsed.address is not None:
        _check_address(parsed, parsed.address, literal=True, policy=policy)


def _check_address(parsed: _Parsed, address: IPAddress, *, literal: bool, policy: Policy) -> None:
    reason = non_public_reason(address)
    if reason is None:
        return
    if policy.allowed_private().allows(parsed.host, parsed.port, address):
        return
    if not literal:
        what = f"{parsed.host} resolves to {address} ({reason})"
    elif parsed.written.strip("[]").lower() != parsed.host:
        what = f"{parsed.written} means {address} ({reason})"
    else:
        what = f"{address} is {reason}"
    raise DestinationRefused(
        f"{what}, not a public address; outbound requests go only to public addresses "
        "unless the operator allows the host"
    )


def check_url(url: str, *, trusted: bool = True, policy: Policy | None = None) -> None:
    """The checks that need no DNS: scheme (https, or http to an allow-listed host), a
    valid host (IDNA, no trailing-dot tricks, no non-standard IPv4), no user name or
    password, no fragment, a port in 1..65535 (and, for a webhook, 443 or 1024..65535), and
    an IP literal's address. Raises DestinationRefused. The allow-lists are `policy`'s;
    without one, the operator's (`trusted`) or, `trusted` False (an organization's own
    provider), those of organizations' providers, never the operator's. Refusals name the
    URL as the policy does ("the webhook URL ...")."""
    chosen = policy_of(trusted=trusted, policy=policy)
    try:
        _check(_parse(url), chosen)
    except DestinationRefused as exc:
        raise chosen.words(exc) from None


# --- resolution ---------------------------------------------------------------------------

_dns_executor = ThreadPoolExecutor(max_workers=DNS_THREADS, thread_name_prefix="outbound-dns")


async def resolve(
    url: str,
    *,
    timeout_s: float = 5.0,
    trusted: bool = True,
    policy: Policy | None = None,
    owner: str = "",
) -> Destination:
    """`check_url`, then the host resolved (on a thread, within `timeout_s`) and every
    address checked; the first is pinned. Raises DestinationRefused for a refused URL or
    address, httpx.ConnectError when the name does not resolve (or `owner`, the
    organization whose destination it is, has DNS_PER_OWNER lookups under way already),
    httpx.ConnectTimeout when resolution takes longer than `timeout_s`."""
    chosen = policy_of(trusted=trusted, policy=policy)
    try:
        parsed = _parse(url)
        _check(parsed, chosen)
    except DestinationRefused as exc:
        raise chosen.words(exc) from None
    if parsed.address is not None:
        addresses: list[IPAddress] = [parsed.address]
    else:
        addresses = await _lookup(parsed.host, parsed.port, timeout_s, owner)
        try:
            for address in addresses:
                _check_address(parsed, address, literal=False, policy=chosen)
        except DestinationRefused as exc:
            raise chosen.words(exc) from None
    pinned = addresses[0]
    ip = str(pinned)
    netloc = f"[{ip}]" if pinned.version == 6 else ip
    connect_url = f"{parsed.scheme}://{netloc}:{parsed.port}{parsed.target}"
    return Destination(
        url=url,
        ip=ip,
        host=parsed.host,
        port=parsed.port,
        scheme=parsed.scheme,
        connect_url=connect_url,
    )


# Answers of the resolver kept briefly, per process: a relayed request does not pay a thread
# hop and a lookup each time. Every use still checks the addresses (`resolve`), and the
# connection goes to the address checked, so the cache cannot widen what is reachable.
DNS_CACHE_S = 30.0
DNS_CACHE_MAX = 1024
_dns_cache: OrderedDict[tuple[str, int], tuple[float, list[IPAddress]]] = OrderedDict()


# A name that did not resolve (or not in time) is not asked again for DNS_NEGATIVE_S: a
# tenant's webhook or provider naming a dead or slow domain would otherwise send every one
# of its requests to the resolver, each holding a thread of the pool every lookup shares.
DNS_NEGATIVE_S = 5.0
_dns_failures: OrderedDict[tuple[str, int], tuple[float, type[httpx.HTTPError], str]] = (
    OrderedDict()
)


# A lookup holds its thread for as long as the system resolver takes, also after `timeout_s`
# has answered the caller: a tenant naming slow names (random subdomains of a domain whose
# name server never answers: each is a new name, which no cache covers) would otherwise
# hold every thread of the pool, and every other destination's lookups would wait. An
# organization's destinations (its own provider, its identity provider: `owner`) have at
# most DNS_PER_OWNER lookups under way at once, all organizations' together at most
# DNS_THREADS - DNS_OPERATOR_RESERVE: the operator's own destinations always find a thread.
# Counted until the thread is free again, not until the caller stopped waiting.
DNS_PER_OWNER = 2
DNS_OPERATOR_RESERVE = 2
_owned_lookups: dict[str, int] = {}
_owned_lock = threading.Lock()


async def _lookup(host: str, port: int, timeout_s: float, owner: str = "") -> list[IPAddress]:
    now = time.monotonic()
    key = (host, port)
    cached = _dns_cache.get(key)
    if cached is not None and cached[0] > now:
        return cached[1]
    failed = _dns_failures.get(key)
    if failed is not None and failed[0] > now:
        raise failed[1](failed[2])
    try:
        found = await _lookup_now(host, port, timeout_s, owner)
    except LookupsBusy:
        raise  # nothing was asked: not a failure of the name
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        _remember(_dns_failures, key, (now + DNS_NEGATIVE_S, type(exc), str(exc)))
        raise
    _dns_failures.pop(key, None)
    _remember(_dns_cache, key, (now + DNS_CACHE_S, found))
    return found


def _remember(cache: OrderedDict[Any, Any], key: tuple[str, int], value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > DNS_CACHE_MAX:
        cache.popitem(last=False)


def forget_dns() -> None:
    """Drops the cached resolver answers and failures (tests that change what a name
    resolves to)."""
    _dns_cache.clear()
    _dns_failures.clear()


class LookupsBusy(httpx.ConnectError):
    """An organization's destinations have their most name lookups under way already."""


def _take_lookup(owner: str) -> None:
    with _owned_lock:
        mine = _owned_lookups.get(owner, 0)
        if mine >= DNS_PER_OWNER or sum(_owned_lookups.values()) >= (
            DNS_THREADS - DNS_OPERATOR_RESERVE
        ):
            raise LookupsBusy(
                f"too many name lookups are under way for this organization's destinations "
                f"(at most {DNS_PER_OWNER}; slow names hold them): try again shortly"
            )
        _owned_lookups[owner] = mine + 1


def _give_lookup(owner: str) -> None:
    with _owned_lock:
        left = _owned_lookups.get(owner, 1) - 1
        if left > 0:
            _owned_lookups[owner] = left
        else:
            _owned_lookups.pop(owner, None)


async def _lookup_now(host: str, port: int, timeout_s: float, owner: str = "") -> list[IPAddress]:
    if owner:
        _take_lookup(owner)
    try:
        job = _dns_executor.submit(
            _getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )
    except BaseException:
        if owner:
            _give_lookup(owner)
        raise
    if owner:
        # When the thread is done with it (or it was cancelled before a thread took it).
        job.add_done_callback(lambda _: _give_lookup(owner))
    call = asyncio.wrap_future(job)
    try:
        infos = await asyncio.wait_for(call, timeout=max(0.001, timeout_s))
    except TimeoutError:
        raise httpx.ConnectTimeout(f"resolving {host} took longer than {timeout_s}s") from None
    except OSError as exc:
        raise httpx.ConnectError(f"{host} does not resolve ({exc.strerror or exc})") from None
    found: list[IPAddress] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        text = str(sockaddr[0]).split("%", 1)[0]
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address not in found:
            found.append(address)
    if not found:
        raise httpx.ConnectError(f"{host} resolves to no IP address")
    return found


# --- headers ------------------------------------------------------------------------------


def outbound_headers(extra: Mapping[str, str]) -> dict[str, str]:
    """The headers a provider may see: of `extra`, only content-type, accept, authorization
    and api-key (lower-cased names; values with line breaks dropped); the user agent is
    always the platform's. Nothing else (the customer's key, cookies, forwarding headers,
    Host) passes."""
    headers: dict[str, str] = {}
    for name, value in extra.items():
        key = str(name).strip().lower()
        if key not in ALLOWED_HEADERS or key == "user-agent":
            continue
        text = str(value)
        if any(c in text for c in "\r\n\0"):
            continue
        headers[key] = text
    headers["user-agent"] = USER_AGENT
    return headers


# --- the client: one per event loop, pools keyed by (scheme, ip, port, host) ------------


def ssl_context() -> ssl.SSLContext:
    """Certificate verification against certifi's roots, host name checked; no environment
    setting is read."""
    return httpx.create_ssl_context(verify=True, trust_env=False)


_PoolKey = tuple[str, str, int, str]

# What aiohttp would add of its own: the request carries exactly what `request` built.
_NO_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class _PinnedTransport(httpx.AsyncBaseTransport):
    """Sends each httpx request over aiohttp (its C HTTP parser costs about a fifth of
    h11's CPU a request, measured in bench/relay_overhead.py's setting), through a
    connection pool of its own (scheme, address, port, SNI host), so a connection made for
    one host name is never reused for another at the same address. aiohttp resolves
    nothing: the URL names the pinned address, and `server_hostname` the name that SNI
    and the certificate check use. Its errors come out as httpx's."""

    def __init__(self) -> None:
        self._ssl = ssl_context()
        self._pools: OrderedDict[_PoolKey, aiohttp.ClientSession] = OrderedDict()
        self._in_use: dict[_PoolKey, int] = {}
        self.is_closed = False

    def _pool(self, key: _PoolKey) -> aiohttp.ClientSession:
        pool = self._pools.get(key)
        if pool is None:
            connector = aiohttp.TCPConnector(
                ssl=self._ssl, limit=0, limit_per_host=0, use_dns_cache=False
            )
            pool = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._pools[key] = pool
        self._pools.move_to_end(key)
        return pool

    async def _evict(self) -> None:
        for key in list(self._pools):
            if len(self._pools) <= MAX_POOLS:
                return
            if self._in_use.get(key, 0) == 0:
                await self._pools.pop(key).close()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sni = request.extensions.get("sni_hostname")
        if not sni:
            raise RuntimeError("an outbound request without its pinned host name")
        url = request.url
        key: _PoolKey = (url.scheme, url.host, url.port or 0, str(sni))
        timeouts = request.extensions.get("timeout", {})
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        pool = self._pool(key)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            with _as_httpx_errors(request, connecting=True):
                answer = await pool.request(
                    request.method,
                    str(url),
                    headers=headers,
                    data=request.content or None,
                    allow_redirects=False,
                    server_hostname=str(sni) if url.scheme == "https" else None,
                    timeout=aiohttp.ClientTimeout(
                        total=None,
                        sock_connect=timeouts.get("connect"),
                        sock_read=timeouts.get("read"),
                    ),
                )
        except BaseException:
            self._release(key)
            raise
        response = httpx.Response(
            answer.status,
            headers=list(answer.raw_headers),
            stream=_Body(answer, request, lambda: self._release(key)),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )
        if len(self._pools) > MAX_POOLS:
            await self._evict()
        return response

    def _release(self, key: _PoolKey) -> None:
        left = self._in_use.get(key, 1) - 1
        if left <= 0:
            self._in_use.pop(key, None)
        else:
            self._in_use[key] = left

    async def aclose(self) -> None:
        self.is_closed = True
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.close()


@contextlib.contextmanager
def _as_httpx_errors(request: httpx.Request, *, connecting: bool = False) -> Iterator[None]:
    """aiohttp's errors as the httpx ones callers catch (timeouts as TimeoutException,
    refused or failed connections as ConnectError, broken answers as RemoteProtocolError)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except aiohttp.ServerTimeoutError as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except aiohttp.ClientResponseError as exc:  # an answer that is not HTTP/1.1
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except aiohttp.ClientError as exc:
        error = httpx.ConnectError if connecting else httpx.ReadError
        raise error(f"{type(exc).__name__}: {exc}", request=request) from exc


def _received_before_the_cut(content: aiohttp.StreamReader) -> bytes:
    """The bytes an aiohttp body reader still holds once its error is set. aiohttp has no
    public way to them (its readers raise first; aio-libs/aiohttp#3026), so this takes its
    internal buffer's reader; tests/core/test_outbound.py fails if a new aiohttp moves it."""
    take = getattr(content, "_read_nowait", None)
    if take is None:
        return b""
    try:
        return bytes(take(-1))
    except Exception:  # a changed internal: the cut still raises, without its last bytes
        return b""


class _Body(httpx.AsyncByteStream):
    """An aiohttp answer's body as httpx reads it; closing it before its end closes the
    connection (never returned to the pool half-read)."""

    def __init__(self, answer: aiohttp.ClientResponse, request: httpx.Request, done: Any) -> None:
        self._answer = answer
        self._request = request
        self._done = done
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._answer.content
        with _as_httpx_errors(self._request):
            try:
                async for chunk in content.iter_any():
                    yield chunk
            except aiohttp.ClientPayloadError:
                # A body broken off (the peer closed mid-answer): aiohttp raises it before
                # the bytes it had received ahead of the cut, so a reader slower than the
                # network (a busy gateway) would lose them. They go out first.
                rest = _received_before_the_cut(content)
                if rest:
                    yield rest
                raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._answer.content.at_eof():
                self._answer.release()
            else:
                self._answer.close()
        finally:
            self._done()


_clients: dict[int, tuple[weakref.ref[asyncio.AbstractEventLoop], _PinnedTransport]] = {}
_clients_lock = threading.Lock()


def _client() -> _PinnedTransport:
    loop = asyncio.get_running_loop()
    with _clients_lock:
        for loop_id, (ref, _) in list(_clients.items()):
            other = ref()
            if other is None or other.is_closed():
                del _clients[loop_id]  # its loop is gone: nothing can await a close now
        found = _clients.get(id(loop))
        if found is not None and found[0]() is loop:
            return found[1]
        client = _PinnedTransport()
        _clients[id(loop)] = (weakref.ref(loop), client)
        return client


async def aclose() -> None:
    """Closes the running loop's client and its connections (the next request opens a new
    one). Call it when a loop that sent requests shuts down."""
    loop = asyncio.get_running_loop()
    with _clients_lock:
        found = _clients.get(id(loop))
        if found is None or found[0]() is not loop:
            return
        del _clients[id(loop)]
    await found[1].aclose()


async def request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    content: bytes = b"",
    connect_timeout_s: float,
    read_timeout_s: float,
    stream: bool = False,
    trusted: bool = True,
    policy: Policy | None = None,
    owner: str = "",
) -> httpx.Response:
    """One request to `url` under the outbound policy: resolved and checked (`resolve`,
    within the connect timeout), connected to the pinned address with the original Host,
    SNI and certificate name, headers through `outbound_headers`, no redirect followed
    (a 3xx is returned as it is), `accept-encoding: identity`.

    `stream=False`: the body is read, bounded by MANTLE_PROVIDER_MAX_RESPONSE_BYTES
    (ResponseTooLarge past it), and the connection released; the response's `.content` is
    the body. `stream=True`: the response is returned with its body unread; the caller
    reads it (`read_bounded`, `iter_lines`) and must `await response.aclose()`.

    Raises DestinationRefused, ResponseTooLarge, httpx.HTTPError (timeouts, connection
    errors, DNS failures as httpx.ConnectError / ConnectTimeout)."""
    destination = await resolve(
        url, timeout_s=connect_timeout_s, trusted=trusted, policy=policy, owner=owner
    )
    sent = outbound_headers(headers)
    sent["host"] = destination.host_header
    sent["accept-encoding"] = "identity"
    timeout = httpx.Timeout(
        connect=connect_timeout_s,
        read=read_timeout_s,
        write=max(connect_timeout_s, read_timeout_s),
        pool=connect_timeout_s,
    )
    outgoing = httpx.Request(
        method,
        destination.connect_url,
        headers=sent,
        content=content,
        extensions={"timeout": timeout.as_dict(), "sni_hostname": destination.host},
    )
    response = await _client().handle_async_request(outgoing)
    response.extensions = {**response.extensions, "mantle_destination": destination}
    if stream:
        return response
    try:
        body = await read_bounded(response, settings.MANTLE_PROVIDER_MAX_RESPONSE_BYTES)
    finally:
        await response.aclose()
    whole = httpx.Response(
        response.status_code,
        headers=response.headers,
        content=body,
        request=outgoing,
        extensions=response.extensions,
    )
    return whole


async def send(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    content: bytes = b"",
    connect_timeout_s: float,
    read_timeout_s: float,
    trusted: bool = True,
    policy: Policy | None = None,
    owner: str = "",
) -> httpx.Response:
    """`request(..., stream=True)`: the response with its body unread; the caller must
    `await response.aclose()`. `trusted` and `policy`: whose destination (`check_url`);
    `owner`: the organization that chose it, if one did (its name lookups are bounded)."""
    return await request(
        method,
        url,
        headers=headers,
        content=content,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
        stream=True,
        trusted=trusted,
        policy=policy,
        owner=owner,
    )


def destination_of(response: httpx.Response) -> Destination | None:
    """The Destination a response of `request` came from (its pinned address)."""
    found = response.extensions.get("mantle_destination")
    return found if isinstance(found, Destination) else None


# --- bounded reading ----------------------------------------------------------------------


def _raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise httpx.DecodingError(
            f"the provider answered with content-encoding {encoding[:40]!r}; only identity "
            "is accepted",
            request=response.request,
        )
    return response.aiter_raw()


async def read_bounded(
    response: httpx.Response, limit_bytes: int, *, truncate: bool = False
) -> bytes:
    """The body of a streamed response, at most `limit_bytes`: past it, ResponseTooLarge
    (or, with `truncate`, the first `limit_bytes` bytes, the rest unread). A declared
    content-length past the limit is refused before reading."""
    declared = response.headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > limit_bytes:
        raise ResponseTooLarge(f"the answer declares {declared} bytes, over {limit_bytes}")
    buffer = bytearray()
    async for chunk in _raw_chunks(response):
        buffer += chunk
        if len(buffer) > limit_bytes:
            if truncate:
                return bytes(buffer[:limit_bytes])
            raise ResponseTooLarge(f"the answer is over {limit_bytes} bytes")
    return bytes(buffer)


async def iter_lines(
    response: httpx.Response, max_line_bytes: int, *, max_total_bytes: int | None = None
) -> AsyncIterator[bytes]:
    """The lines of a streamed response (server-sent events), without their `\\n` or
    `\\r\\n`; a line longer than `max_line_bytes` (or a body past `max_total_bytes`)
    raises ResponseTooLarge before it is held whole. A last line without a newline is
    yielded too."""
    pending = bytearray()
    total = 0
    async for chunk in _raw_chunks(response):
        total += len(chunk)
        if max_total_bytes is not None and total > max_total_bytes:
            raise ResponseTooLarge(f"the stream is over {max_total_bytes} bytes")
        pending += chunk
        start = 0
        while True:
            end = pending.find(b"\n", start)
            if end < 0:
                break
            line = pending[start:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > max_line_bytes:
                raise ResponseTooLarge(f"a line of the stream is over {max_line_bytes} bytes")
            yield bytes(line)
            start = end + 1
        del pending[:start]
        if len(pending) > max_line_bytes:
            raise ResponseTooLarge(f"a line of the stream is over {max_line_bytes} bytes")
    if pending:
        yield bytes(pending)
