"""API key secrets: generation, the peppered HMAC that is stored, and the Redis lookup cache."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from core import integrity
from core.ids import random_token
from core.redis import delete_if_unchanged, get_async_redis, get_redis

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

SECRET_PREFIX = "sk-"  # noqa: S105 - the public prefix, not a secret
SECRET_LENGTH = 48  # 48 base62 characters: about 285 bits of entropy
DISPLAY_PREFIX_LENGTH = 12

CACHE_TTL_S = 3600
NEGATIVE_CACHE_TTL_S = 60
LAST_USED_HASH = "mantle:apikey-last-used"


def generate_secret() -> str:
    return SECRET_PREFIX + random_token(SECRET_LENGTH)


def secret_digest(secret: str) -> str:
    if not settings.API_KEY_PEPPER:
        # A process without the pepper (MANTLE_ROLE) must fail loudly, never hash under "".
        raise ImproperlyConfigured("MANTLE_API_KEY_PEPPER is not set in this process")
    pepper = str(settings.API_KEY_PEPPER).encode()
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[:DISPLAY_PREFIX_LENGTH]


def looks_like_secret(secret: str) -> bool:
    return secret.startswith(SECRET_PREFIX) and len(secret) == len(SECRET_PREFIX) + SECRET_LENGTH


@dataclasses.dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What the gateway needs to know about a key, cached in Redis by digest."""

    digest: str
    key_id: str
    organization_id: str
    project_id: str
    scopes: tuple[str, ...]
    expires_at: float | None
    revoked: bool
    organization_active: bool
    rpm_limit: int
    tpm_limit: int
    project_rpm_limit: int
    project_tpm_limit: int
    # The model names the key may use; empty: every model (a record cached before the
    # field existed reads as empty, as the key was then).
    allowed_models: tuple[str, ...] = ()

    def may_use(self, model_name: str) -> bool:
        return not self.allowed_models or model_name in self.allowed_models

    def usable(self, now: float | None = None) -> bool:
        if self.revoked or not self.organization_active:
            return False
        return self.expires_at is None or self.expires_at > (now or time.time())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> KeyIdentity:
        """Parses a record; its seal, if any, is not checked (see `identity_from_cache`)."""
        data = integrity.unsealed_fields(json.loads(raw))
        return cls.from_fields(data)

    @classmethod
    def from_fields(cls, data: dict[str, Any]) -> KeyIdentity:
        data["scopes"] = tuple(data["scopes"])
        data["allowed_models"] = tuple(data.get("allowed_models") or ())
        return cls(**data)


_UNKNOWN = "unknown"
UNKNOWN = _UNKNOWN  # the negative cache's value (accounts.auth tells it from an identity)


def cache_key(digest: str) -> str:
    return f"mantle:apikey:{digest}"


def identity_of(
    *,
    digest: str,
    key_id: str,
    organization_id: str,
    project_id: str,
    scopes: list[str],
    expires_at: datetime | None,
    revoked: bool,
    organization_active: bool,
    limits: tuple[int, int, int, int],
    allowed_models: list[str] | None = None,
) -> KeyIdentity:
    return KeyIdentity(
        digest=digest,
        key_id=key_id,
        organization_id=organization_id,
        project_id=project_id,
        scopes=tuple(scopes),
        expires_at=expires_at.timestamp() if expires_at else None,
        revoked=revoked,
        organization_active=organization_active,
        rpm_limit=limits[0],
        tpm_limit=limits[1],
        project_rpm_limit=limits[2],
        project_tpm_limit=limits[3],
        allowed_models=tuple(allowed_models or ()),
    )


def cache_record(identity: KeyIdentity) -> str:
    """The identity as stored in Redis: sealed (core/integrity.py) for its own cache key."""
    return integrity.seal(
        cache_key(identity.digest), dataclasses.asdict(identity), ttl_s=CACHE_TTL_S
    )


def identity_from_cache(digest: str, raw: str) -> KeyIdentity | None:
    """The identity cached for `digest`, or None (logged) when the record fails its check.

    Whoever can write Redis but lacks MANTLE_IDENTITY_KEY cannot make a record that
    passes: the caller treats it as a miss and reads the database.
    """
    identity = integrity.unseal_as(cache_key(digest), raw, KeyIdentity.from_fields)
    if identity is not None and constant_time_equal(identity.digest, digest):
        return identity
    logger.warning(
        "cached identity for key digest %s... failed its integrity check; "
        "discarded, reading the database",
        digest[:12],
    )
    return None


def cache_put(identity: KeyIdentity) -> None:
    """Write-through on every change, so revocation is visible to all gateways at once."""
    get_redis().set(cache_key(identity.digest), cache_record(identity), ex=CACHE_TTL_S)


async def cache_get(digest: str) -> KeyIdentity | str | None:
    """The cached identity, `"unknown"` for a known-bad digest, or None on a miss.

    A record that fails its integrity check is a miss.
    """
    raw = await get_async_redis().get(cache_key(digest))
    if raw is None:
        return None
    if raw == _UNKNOWN:
        return _UNKNOWN
    return identity_from_cache(digest, str(raw))


async def cache_discard_async(digest: str, raw: str) -> None:
    """Removes a record that failed its check (unless a write-through replaced it since),
    so that the fill from the database lands."""
    await delete_if_unchanged(cache_key(digest), raw)


async def cache_fill_async(identity: KeyIdentity | None, digest: str) -> None:
    """The gateway's cache fill after a database read: only where nothing is cached.

    Every change (creation, revocation, suspension) is written through by `cache_put`;
    a fill from a read made just before a revocation must not overwrite it with the key
    still active (SET NX). Negative caching keeps a flood of made-up keys off the database.
    """
    if identity is None:
        value, ttl = _UNKNOWN, NEGATIVE_CACHE_TTL_S
    else:
        value, ttl = cache_record(identity), CACHE_TTL_S
    await get_async_redis().set(cache_key(digest), value, ex=ttl, nx=True)


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# --- Guessing -------------------------------------------------------------------------------


def failures_key(address: str) -> str:
    """Incorrect keys sent from one address in the current window (gateway and API share it)."""
    return f"mantle:keyfail:{address}"


def queue_failure(pipe: Any, address: str) -> None:
    """Queues the count of an incorrect key from `address` on a pipeline, sync or asyncio.

    A fixed window: it starts at the first failure, so a blocked address knows when it
    may try again. The pipeline's first result is the count.
    """
    pipe.incr(failures_key(address))
    pipe.expire(failures_key(address), settings.MANTLE_KEY_FAILURE_WINDOW_S, nx=True)


def record_failure(client: redis.Redis, address: str) -> int:
    """Counts an incorrect key from `address` in a fixed window; logs it, never the key."""
    pipe = client.pipeline(transaction=False)
    queue_failure(pipe, address)
    count = int(pipe.execute()[0])
    log_failure(address, count)
    return count


def log_failure(address: str, count: int) -> None:
    if count == settings.MANTLE_KEY_FAILURE_LIMIT:
        logger.warning(
            "API key guessing suspected: %d incorrect keys from %s within %ds; "
            "refusing its requests until the window ends",
            count,
            address,
            settings.MANTLE_KEY_FAILURE_WINDOW_S,
        )
    else:
        logger.info("incorrect API key from %s (%d in this window)", address, count)
