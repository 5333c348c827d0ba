"""Resolving the caller's key and the endpoint named by `model`, from Redis (one round trip)."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.http import HttpRequest

from accounts import keys
from accounts.permissions import Scope
from accounts.services import api_key_identity_load
from catalog import specs
from catalog.selectors import endpoint_spec_load
from catalog.specs import EndpointSpec
from config.redis import get_async_redis
from gateway.backends import database_read
from gateway.errors import OpenAIError, model_not_found, too_many_failed_keys, unauthorized

logger = logging.getLogger(__name__)

_UNKNOWN = specs.UNKNOWN
ENDPOINT_NEGATIVE_TTL_S = 10
ENDPOINT_TTL_S = 24 * 3600


def bearer_secret(request: HttpRequest) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise unauthorized(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    return secret.strip()


def _incorrect_key(secret: str) -> OpenAIError:
    shown = f"{secret[:6]}***{secret[-4:]}" if len(secret) > 12 else "***"
    return unauthorized(f"Incorrect API key provided: {shown}.")


def _endpoint_cache_key(model: str) -> str:
    return specs.endpoint_key(model) if model.startswith("ep-") else specs.endpoint_name_key(model)


def client_address(request: HttpRequest) -> str:
    # The peer, or behind a load balancer the address that the ASGI server's
    # --proxy-headers (trusted proxies only) took from X-Forwarded-For.
    return str(request.META.get("REMOTE_ADDR") or "unknown")


failures_key = keys.failures_key


async def _record_failure(address: str) -> None:
    """Counts a wrong key from `address` in a fixed window; logs it, never the key."""
    async with get_async_redis().pipeline(transaction=False) as pipe:
        keys.queue_failure(pipe, address)
        count = int((await pipe.execute())[0])
    keys.log_failure(address, count)


async def _refuse_blocked(address: str) -> OpenAIError:
    ttl = await get_async_redis().ttl(failures_key(address))
    return too_many_failed_keys(max(1, int(ttl)))


async def resolve(
    request: HttpRequest, model: str | None
) -> tuple[keys.KeyIdentity, EndpointSpec | None]:
    """The key's identity and (if `model` is given) the endpoint it may call.

    Both come from Redis in one pipelined round trip, with the count of wrong keys
    recently sent from the caller's address (an address past the limit is refused
    before its key is even looked at, so guessing is slowed to the limit). The
    database is read only on a cache miss, and the result is written back for
    every gateway.
    """
    secret = bearer_secret(request)
    address = client_address(request)
    digest = keys.secret_digest(secret) if keys.looks_like_secret(secret) else ""
    client = get_async_redis()
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(failures_key(address))
        if digest:
            pipe.get(keys.cache_key(digest))
            if model:
                pipe.get(_endpoint_cache_key(model))
        results = await pipe.execute()
    if int(results[0] or 0) >= settings.MANTLE_KEY_FAILURE_LIMIT:
        raise await _refuse_blocked(address)
    if not digest:
        await _record_failure(address)
        raise _incorrect_key(secret)
    identity = await _identity(digest, results[1])
    if identity is None or not keys.constant_time_equal(identity.digest, digest):
        await _record_failure(address)
        raise _incorrect_key(secret)
    if not identity.usable(time.time()):
        if not identity.organization_active:
            raise OpenAIError(
                403,
                "Your organization is suspended; contact your account manager or billing.",
                type_="invalid_request_error",
                code="organization_suspended",
            )
        raise unauthorized(f"The API key {secret[:12]}... has been revoked or has expired.")
    if Scope.INFERENCE not in identity.scopes:
        raise OpenAIError(
            403,
            "This API key does not have the 'inference' scope.",
            type_="invalid_request_error",
            code="insufficient_scope",
        )
    if not model:
        return identity, None
    spec = await _endpoint(model, results[2])
    if spec is None or not spec.visible_to(identity.organization_id):
        raise model_not_found(model)
    if not spec.active:
        raise OpenAIError(
            403,
            f"The endpoint `{model}` is paused; resume it in the console or management API.",
            param="model",
            code="endpoint_paused",
        )
    return identity, spec


async def _identity(digest: str, raw: str | None) -> keys.KeyIdentity | None:
    if raw == _UNKNOWN:
        return None
    if raw is not None:
        return keys.KeyIdentity.from_json(raw)
    identity = await database_read(api_key_identity_load, digest)
    await keys.cache_fill_async(identity, digest)
    return identity


async def _endpoint(model: str, raw: str | None) -> EndpointSpec | None:
    if raw == _UNKNOWN:
        return None
    if raw is not None:
        return EndpointSpec.from_json(raw)
    spec = await database_read(endpoint_spec_load, model)
    await endpoint_cache_fill(model, spec)
    return spec


async def endpoint_cache_fill(model: str, spec: EndpointSpec | None) -> None:
    """Caches what the database said, only where nothing is cached (SET NX).

    The control plane writes through on every change (and leaves a tombstone on delete);
    a fill from a read that raced such a write must not overwrite it.
    """
    if spec is None:
        value, ttl = _UNKNOWN, ENDPOINT_NEGATIVE_TTL_S
    else:
        value, ttl = spec.to_json(), ENDPOINT_TTL_S
    await get_async_redis().set(_endpoint_cache_key(model), value, ex=ttl, nx=True)
