"""Authentication for the management API: the console session, or an admin-scoped API key
(any key for the usage and cost reads, which check the `read-usage` scope themselves)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest
from ninja.security import HttpBearer, SessionAuth

from accounts import keys, selectors, two_factor
from accounts.models import ApiKey
from accounts.permissions import Scope
from accounts.principal import Principal
from core.errors import TooManyFailedKeys
from core.redis import get_redis


def client_ip(request: HttpRequest) -> str | None:
    # REMOTE_ADDR is the peer; behind a load balancer the ASGI server's
    # --proxy-headers (trusted hosts only) rewrites it from X-Forwarded-For.
    return request.META.get("REMOTE_ADDR") or None


class ConsoleSession(SessionAuth):
    """The console's login session (CSRF-checked on unsafe methods)."""

    def _get_key(self, request: HttpRequest) -> str | None:
        # CSRF protects the session only: a request that no session authenticates (an
        # API key's, from a server) carries nothing a forged form could ride on, so it
        # goes on to the next authenticator instead of failing the CSRF check.
        user: Any = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        key: str | None = super()._get_key(request)
        return key

    def authenticate(self, request: HttpRequest, key: str | None) -> Principal | None:
        user: Any = request.user
        if not user.is_authenticated:
            return None
        # A person with an authenticator is signed in only once a code was given in this
        # session (a session that passed only a password, e.g. the back office's first
        # step, carries no power here).
        if not two_factor.session_verified(user) and selectors.mfa_enrolled(user):
            return None
        return Principal(user=user, ip_address=client_ip(request))


class ApiKeyBearer(HttpBearer):
    """`Authorization: Bearer sk-...`: any usable key of an active organization.

    For the routes that judge the key's scopes themselves (the usage and cost reads take
    `read-usage` or `admin`, `accounts.selectors.organization_for_usage`), so that a key
    without the scope hears which scope it lacks rather than "authentication required".

    Incorrect keys count against the caller's address in the same Redis window as the
    gateway's (`keys.failures_key`), so guessing through the management API is slowed
    to the same limit; past it the address gets 429 before the database is asked,
    unless the gateway's cache vouches for its key (as the gateway does: a valid key
    keeps working from an address someone else guesses from).
    """

    def authenticate(self, request: HttpRequest, token: str) -> Principal | None:
        address = client_ip(request) or "unknown"
        redis = get_redis()
        digest = keys.secret_digest(token) if keys.looks_like_secret(token) else ""
        failures, cached = redis.mget(
            keys.failures_key(address), keys.cache_key(digest) if digest else keys.cache_key("-")
        )
        if int(failures or 0) >= settings.MANTLE_KEY_FAILURE_LIMIT and (
            not digest
            or cached in (None, keys.UNKNOWN)
            or keys.identity_from_cache(digest, str(cached)) is None
        ):
            raise TooManyFailedKeys(max(1, int(redis.ttl(keys.failures_key(address)))))
        if not keys.looks_like_secret(token):
            keys.record_failure(redis, address)
            return None
        digest = keys.secret_digest(token)
        key = ApiKey.objects.select_related("organization").filter(digest=digest).first()
        if key is None or not keys.constant_time_equal(key.digest, digest):
            keys.record_failure(redis, address)
            return None
        if not key.is_usable() or key.organization.status != key.organization.Status.ACTIVE:
            return None
        return self.accept(Principal(api_key=key, ip_address=client_ip(request)))

    def accept(self, principal: Principal) -> Principal | None:
        """The principal of a correct, usable key, or None where this route refuses it."""
        return principal


class AdminApiKey(ApiKeyBearer):
    """`Authorization: Bearer sk-...` with the admin scope."""

    def accept(self, principal: Principal) -> Principal | None:
        key = principal.api_key
        assert key is not None
        if Scope.ADMIN not in key.scopes:
            return None
        # A key whose creator no longer holds a role it could act with (removed, or now
        # billing) carries no power: unauthenticated, like a revoked key.
        if selectors.role_in(principal, key.organization_id) is None:
            return None
        return principal


management_auth = [ConsoleSession(), AdminApiKey()]
# The usage and cost reads: the session, or a key of any scope (the route checks it).
usage_auth = [ConsoleSession(), ApiKeyBearer()]
