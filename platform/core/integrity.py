"""Records the gateway trusts from Redis, sealed with an HMAC under MANTLE_IDENTITY_KEY.

The gateway authorizes and prices a request from two cached records: a key's identity
(`mantle:apikey:<digest>`) and an endpoint's spec (`mantle:endpoint:<id>`). Redis is shared
with processes that must not be able to grant access (workers run tenant-uploaded graphs,
the drain parses usage): each has an ACL user of its own that cannot reach those keys
(deploy/redis/users.acl), and in case one can anyway (a Redis without ACLs, a leaked
password) a record carries an HMAC-SHA256 over the Redis key it is stored under, its
fields and an expiry. Only the processes that write these records (gateway, control
worker) hold the key. A record that does not verify is treated as absent: the gateway
reads the database instead and logs it. The key is a secret of its own, not the pepper:
the pepper must stay unchanged for keys to stay valid, this key can be rotated at will
(every record then misses once and is rewritten).

What the seal does not stop: a process that can write Redis can still delete records or
plant the unsigned "unknown" marker (a denial of service, which such a process can cause
anyway), or put back a record the gateway sealed earlier for the same Redis key until it
expires (a revocation undone for at most the record's TTL); the ACLs keep such a process
from reading or writing these keys in the first place.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

MAC_FIELD = "_mac"
EXPIRES_FIELD = "_exp"

T = TypeVar("T")


def _key() -> bytes:
    value = str(getattr(settings, "MANTLE_IDENTITY_KEY", "") or "")
    if not value:
        # Never sign with an empty key: a record anyone could forge is worse than none.
        raise ImproperlyConfigured(
            "MANTLE_IDENTITY_KEY (or MANTLE_IDENTITY_KEY_FILE) is not set: this process "
            "cannot seal or check the key identities and endpoint specs cached in Redis"
        )
    return value.encode()


def _mac(where: str, body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    message = where.encode() + b"\n" + canonical.encode()
    return hmac.new(_key(), message, hashlib.sha256).hexdigest()


def seal(where: str, payload: Mapping[str, Any], *, ttl_s: int, now: float | None = None) -> str:
    """`payload` as the JSON stored at Redis key `where`, valid for `ttl_s` seconds."""
    body = dict(payload)
    body[EXPIRES_FIELD] = int((time.time() if now is None else now) + ttl_s) + 1
    body[MAC_FIELD] = _mac(where, body)
    return json.dumps(body)


def _open(where: str, raw: str) -> tuple[dict[str, Any], int] | None:
    """(payload, expiry) of a record whose MAC verifies for Redis key `where`."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    mac = body.pop(MAC_FIELD, None)
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(where, body)):
        return None
    expires = body.pop(EXPIRES_FIELD, None)
    if not isinstance(expires, int):
        return None
    return body, expires


def unseal(where: str, raw: str, *, now: float | None = None) -> dict[str, Any] | None:
    """The payload of a record read from Redis key `where`; None unless it verifies.

    A record moved from another Redis key, altered, expired or never sealed is refused.
    """
    opened = _open(where, raw)
    if opened is None or opened[1] < (time.time() if now is None else now):
        return None
    return opened[0]


# Records already verified, by their exact text: the gateway reads the same identity and
# spec on every request, and checking the MAC (a canonical re-encoding and an HMAC) then
# parsing costs tens of microseconds each time. A hit is the very text that verified
# under the same key, so it needs no second check; its expiry still applies. Bounded, and
# emptied when full (a miss only costs one verification).
_verified: dict[tuple[str, str, str], tuple[Any, int]] = {}
VERIFIED_MAX = 1024


def unseal_as(
    where: str, raw: str, build: Callable[[dict[str, Any]], T], *, now: float | None = None
) -> T | None:
    """`build(payload)` of a record that verifies (as `unseal`), or None; `build` raising
    KeyError or TypeError (fields of another release) is a None too. `build` must return
    an immutable value: it is shared by every later read of the same record."""
    moment = time.time() if now is None else now
    remembered = (where, raw, str(getattr(settings, "MANTLE_IDENTITY_KEY", "") or ""))
    hit = _verified.get(remembered)
    if hit is not None:
        return hit[0] if hit[1] >= moment else None
    opened = _open(where, raw)
    if opened is None or opened[1] < moment:
        return None
    try:
        value = build(opened[0])
    except (KeyError, TypeError):
        return None
    if len(_verified) >= VERIFIED_MAX:
        _verified.clear()
    _verified[remembered] = (value, opened[1])
    return value


def unsealed_fields(data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the seal's own fields (to parse a record, checked or not)."""
    data.pop(MAC_FIELD, None)
    data.pop(EXPIRES_FIELD, None)
    return data
