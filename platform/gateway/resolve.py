"""Resolving the caller's key and the endpoint named by `model`, from Redis (one round trip)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Set

from django.conf import settings
from django.http import HttpRequest

from accounts import keys
from accounts.permissions import Scope
from accounts.services import api_key_identity_load
from catalog import specs
from catalog.selectors import endpoint_spec_load
from catalog.specs import EndpointSpec
from core import turns
from core.redis import delete_if_unchanged, get_async_redis
from gateway.backends import database_read
from gateway.errors import (
    OpenAIError,
    invalid,
    model_not_found,
    too_many_failed_keys,
    unauthorized,
)
from gateway.protocol import MODEL_MAX_LENGTH

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
    turns.give_up()  # refused: nothing of its own work is left to order
    async with get_async_redis().pipeline(transaction=False) as pipe:
        keys.queue_failure(pipe, address)
        count = int((await pipe.execute())[0])
    keys.log_failure(address, count)


async def _refuse_blocked(address: str) -> OpenAIError:
    turns.give_up()  # refused: nothing of its own work is left to order
    ttl = await get_async_redis().ttl(failures_key(address))
    return too_many_failed_keys(max(1, int(ttl)))


async def resolve(
    request: HttpRequest, model: str | None
) -> tuple[keys.KeyIdentity, EndpointSpec | None]:
    """The key's identity and (if `model` is given) the endpoint it may call.

    Both come from Redis in one pipelined round trip, with the count of wrong keys
    recently sent from the caller's address. An address past the limit still has its
    key checked against that cache: a key the cache vouches for is served (customers
    behind a NAT that someone guesses from keep working), anything else is refused
    before the database is asked, so guessing is slowed to the limit. The database is
    read only on a cache miss, and the result is written back for every gateway.
    """
    # A batch line runs under the key that created its batch, known by its digest: the
    # batch runner sets it on the request it builds (no HTTP request can carry it).
    internal: str = getattr(request, "batch_key_digest", "")
    secret = "" if internal else bearer_secret(request)
    address = client_address(request)
    if model is not None and len(model) > MODEL_MAX_LENGTH:
        raise invalid(f"The model name may be at most {MODEL_MAX_LENGTH} characters.", "model")
    digest = internal or (keys.secret_digest(secret) if keys.looks_like_secret(secret) else "")
    client = get_async_redis()
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(failures_key(address))
        if digest:
            pipe.get(keys.cache_key(digest))
            if model:
                pipe.get(_endpoint_cache_key(model))
        async with turns.away(turns.REDIS_HOLD_S):
            results = await pipe.execute()
    blocked = int(results[0] or 0) >= settings.MANTLE_KEY_FAILURE_LIMIT
    if not digest or (blocked and results[1] in (None, _UNKNOWN)):
        # The unknown-key path: counted, and past the limit refused without a look at
        # the database. A refused attempt does not extend the count.
        if blocked:
            raise await _refuse_blocked(address)
        await _record_failure(address)
        raise _incorrect_key(secret)
    identity = await _identity(digest, results[1])
    if internal and identity is None:
        raise unauthorized("The API key that created this batch has been deleted.")
    if identity is None or not keys.constant_time_equal(identity.digest, digest):
        if blocked:
            raise await _refuse_blocked(address)
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
        shown = f"{secret[:12]}..." if secret else "that created this batch"
        raise unauthorized(f"The API key {shown} has been revoked or has expired.")
    if Scope.INFERENCE not in identity.scopes:
        raise OpenAIError(
            403,
            "This API key does not have the 'inference' scope.",
            type_="invalid_request_error",
            code="insufficient_scope",
        )
    if not model:
        return identity, None
    spec = await endpoint_for(model, results[2])
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


def require_kind(spec: EndpointSpec, kinds: Set[str], path: str) -> None:
    """Refuses an endpoint whose model is not of a kind that `path` serves, as OpenAI does."""
    if spec.kind not in kinds:
        raise OpenAIError(
            404,
            f"This is a {spec.kind} model and thus not supported in the {path} endpoint.",
            param="model",
            code="model_not_supported",
        )


async def _identity(digest: str, raw: str | None) -> keys.KeyIdentity | None:
    if raw == _UNKNOWN:
        return None
    if raw is not None:
        cached = keys.identity_from_cache(digest, raw)
        if cached is not None:
            return cached
        # Not sealed by a holder of MANTLE_IDENTITY_KEY: planted or corrupt. Removed (if
        # still there) so the fill below replaces it with what the database says.
        await keys.cache_discard_async(digest, raw)
    identity = await database_read(api_key_identity_load, digest)
    await keys.cache_fill_async(identity, digest)
    return identity


# Names no endpoint answers to, remembered by this process only, briefly and boundedly:
# a flood of made-up names neither fills Redis nor reaches the database each time. Redis
# keeps only what the control plane wrote (endpoints, and tombstones of deleted ones), so
# an endpoint created a moment ago is served at once despite an entry here.
UNKNOWN_MODELS_MAX = 4096
_unknown_models: OrderedDict[str, float] = OrderedDict()


def _known_unknown(model: str) -> bool:
    expires = _unknown_models.get(model)
    if expires is None:
        return False
    if expires < time.monotonic():
        del _unknown_models[model]
        return False
    return True


def _remember_unknown(model: str) -> None:
    _unknown_models[model] = time.monotonic() + ENDPOINT_NEGATIVE_TTL_S
    _unknown_models.move_to_end(model)
    while len(_unknown_models) > UNKNOWN_MODELS_MAX:
        _unknown_models.popitem(last=False)


async def endpoint_for(model: str, raw: str | None) -> EndpointSpec | None:
    """The endpoint `model` names, from `raw` (its Redis record, None on a miss) or else the
    database (then cached for every gateway); None when there is none."""
    if raw == _UNKNOWN:
        return None
    if raw is None and _known_unknown(model):
        return None
    if raw is not None:
        cached = specs.spec_from_cache(_endpoint_cache_key(model), raw)
        if cached is not None:
            return cached
        await delete_if_unchanged(_endpoint_cache_key(model), raw)
    spec = await database_read(endpoint_spec_load, model)
    await endpoint_cache_fill(model, spec)
    return spec


async def endpoint_cache_fill(model: str, spec: EndpointSpec | None) -> None:
    """Caches an endpoint the database found, only where nothing is cached (SET NX).

    An unknown name is remembered in this process only (`_remember_unknown`). The control
    plane writes through on every change (and leaves a tombstone on delete); a fill from
    a read that raced such a write must not overwrite it.
    """
    if spec is None:
        _remember_unknown(model)  # in this process: Redis holds no entry per made-up name
        return
    value = specs.spec_record(_endpoint_cache_key(model), spec, ttl_s=ENDPOINT_TTL_S)
    await get_async_redis().set(_endpoint_cache_key(model), value, ex=ENDPOINT_TTL_S, nx=True)
