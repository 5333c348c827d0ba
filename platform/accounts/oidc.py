"""OpenID Connect, the protocol side of single sign-on: discovery, the authorization
request, the code exchange and the ID token's checks. No database here (accounts/sso.py).

An organization's issuer is tenant input, and so is every URL its discovery document names:
discovery, the JWKS and the token request go through `core.outbound` under `POLICY`, an
identity provider's policy of its own (public https addresses only, port 443 or 1024-65535,
the address pinned, no redirect, bounded in time and bytes). Its allow-lists,
MANTLE_SSO_ALLOWED_HTTP and MANTLE_SSO_ALLOWED_PRIVATE, are empty by default; the operator's
provider lists never apply. A deployment whose identity provider sits inside its network
lists it there, and the tests list their provider on loopback.

The OAuth 2.0 pieces are Authlib's (the authorization request, the token request's body,
PKCE S256); the ID token is verified with joserfc: the signature against the issuer's keys
(asymmetric algorithms only), then `iss`, `aud`, `azp`, `exp`, `iat` and `nonce`.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import (
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from core import outbound
from core.errors import InvalidInput

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
# Discovery documents, key sets and token answers are small; a provider that sends more is
# refused rather than read.
MAX_RESPONSE_BYTES = 256 * 1024
MAX_ID_TOKEN_CHARS = 16 * 1024
MAX_ISSUER_CHARS = 500
# Clock skew tolerated on exp and iat, and how far in the future an iat may be.
LEEWAY_S = 60
SCOPE = "openid email profile"
# Asymmetric only: an HS256 token would be keyed by the client secret, which the platform
# holds, so it proves nothing about the provider; "none" proves nothing at all.
SIGNING_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
TOKEN_AUTH_METHODS = ("client_secret_basic", "client_secret_post")


class SignInRefused(InvalidInput):
    """An answer of the identity provider that does not sign anyone in; the message says
    which check failed."""


@dataclass(frozen=True, slots=True)
class Provider:
    """What discovery found, stored with the connection."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    token_auth_method: str
    algorithms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Request:
    """One authorization request: the URL to send the browser to, and what the callback
    must find again (kept in the browser's session, used once)."""

    url: str
    state: str
    nonce: str
    code_verifier: str


# An identity provider an organization names: its own allow-lists, empty by default.
POLICY = outbound.Policy(
    "identity provider",
    "MANTLE_SSO_ALLOWED_HTTP",
    "MANTLE_SSO_ALLOWED_PRIVATE",
    low_ports=False,
    noun="the identity provider's URL",
)


def clean_issuer(value: str) -> str:
    """The issuer as given (it must equal the `iss` of the provider's tokens), checked
    for shape and by the outbound policy's syntax rules."""
    issuer = (value or "").strip()
    if not issuer:
        raise InvalidInput("the issuer URL is required", param="issuer")
    if len(issuer) > MAX_ISSUER_CHARS:
        raise InvalidInput(
            f"the issuer URL is longer than {MAX_ISSUER_CHARS} characters", param="issuer"
        )
    parts = urlsplit(issuer)
    if parts.query or parts.fragment or "?" in issuer or "#" in issuer:
        raise InvalidInput(
            "the issuer URL must not have a query or a fragment (OpenID Connect issuers are "
            "https URLs with a host and an optional path)",
            param="issuer",
        )
    _check_destination(issuer, what="the issuer URL", param="issuer")
    return issuer


def _check_destination(url: str, *, what: str, param: str) -> None:
    try:
        outbound.check_url(url, policy=POLICY)
    except outbound.DestinationRefused as exc:
        raise InvalidInput(
            f"{what} is refused by the outbound policy: {exc}", param=param
        ) from None


def _lookup_owner(url: str) -> str:
    """Whose name lookups these are (`outbound.resolve`'s `owner`): the identity provider's
    domain (its host's last two labels), so that an organization's issuer under ever new
    subdomains of a slow domain holds at most outbound.DNS_PER_OWNER resolver threads."""
    host = (urlsplit(url).hostname or "").rstrip(".")
    return "idp:" + ".".join(host.split(".")[-2:])


async def _get_json(url: str, *, what: str, param: str, **kwargs: Any) -> Any:
    """GET (or POST, with `method` and `content`) a JSON document under the outbound
    policy, bounded; InvalidInput naming `what` on any failure."""
    method = kwargs.pop("method", "GET")
    try:
        response = await outbound.send(
            method,
            url,
            headers={"accept": "application/json", **kwargs.pop("headers", {})},
            content=kwargs.pop("content", b""),
            connect_timeout_s=CONNECT_TIMEOUT_S,
            read_timeout_s=READ_TIMEOUT_S,
            policy=POLICY,
            owner=_lookup_owner(url),
        )
    except outbound.DestinationRefused as exc:
        raise InvalidInput(
            f"{what}: the destination is refused by the outbound policy: {exc}",
            param=param,
        ) from None
    except httpx.HTTPError as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise InvalidInput(f"{what}: the request failed ({detail[:200]})", param=param) from None
    try:
        body = await outbound.read_bounded(response, MAX_RESPONSE_BYTES)
    except outbound.ResponseTooLarge:
        raise InvalidInput(
            f"{what}: the answer is over {MAX_RESPONSE_BYTES} bytes", param=param
        ) from None
    except httpx.HTTPError as exc:
        raise InvalidInput(
            f"{what}: reading the answer failed ({type(exc).__name__})", param=param
        ) from None
    finally:
        await response.aclose()
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if response.status_code != 200:
        error = ""
        if isinstance(document, dict) and isinstance(document.get("error"), str):
            error = f" ({_printable(document['error'])})"
        raise InvalidInput(
            f"{what}: the provider answered HTTP {response.status_code}{error}", param=param
        )
    if not isinstance(document, dict):
        raise InvalidInput(f"{what}: the answer is not a JSON object", param=param)
    return document


def _printable(text: str, limit: int = 120) -> str:
    return "".join(c for c in text[:limit] if c.isprintable())


async def discover(issuer: str) -> Provider:
    """The provider's discovery document (`<issuer>/.well-known/openid-configuration`),
    checked: it names the same issuer, https endpoints the outbound policy allows, the
    authorization code flow, an asymmetric signing algorithm and a client authentication
    method the platform speaks. InvalidInput (param `issuer`) naming what is wrong."""
    issuer = clean_issuer(issuer)
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    what = "discovery failed"
    document = await _get_json(url, what=what, param="issuer")
    named = document.get("issuer")
    if named != issuer:
        shown = _printable(named) if isinstance(named, str) else repr(type(named).__name__)
        raise InvalidInput(
            f"{what}: the discovery document names the issuer {shown!r}, not {issuer!r}; "
            "the issuer must be exactly the one in the provider's tokens",
            param="issuer",
        )
    endpoints: dict[str, str] = {}
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = document.get(name)
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"{what}: the discovery document has no {name}", param="issuer")
        _check_destination(value, what=f"the provider's {name}", param="issuer")
        endpoints[name] = value
    response_types = document.get("response_types_supported", ["code"])
    if not isinstance(response_types, list) or "code" not in response_types:
        raise InvalidInput(
            f"{what}: the provider does not support the authorization code flow "
            "(response_types_supported lacks 'code')",
            param="issuer",
        )
    offered = document.get("id_token_signing_alg_values_supported", ["RS256"])
    algorithms = tuple(a for a in SIGNING_ALGORITHMS if isinstance(offered, list) and a in offered)
    if not algorithms:
        raise InvalidInput(
            f"{what}: the provider signs ID tokens with none of {', '.join(SIGNING_ALGORITHMS)}",
            param="issuer",
        )
    methods = document.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
    method = next((m for m in TOKEN_AUTH_METHODS if isinstance(methods, list) and m in methods), "")
    if not method:
        raise InvalidInput(
            f"{what}: the provider accepts neither client_secret_basic nor client_secret_post "
            "at its token endpoint",
            param="issuer",
        )
    return Provider(
        issuer=issuer,
        authorization_endpoint=endpoints["authorization_endpoint"],
        token_endpoint=endpoints["token_endpoint"],
        jwks_uri=endpoints["jwks_uri"],
        token_auth_method=method,
        algorithms=algorithms,
    )


def authorization_request(
    provider: Provider, *, client_id: str, redirect_uri: str, login_hint: str = ""
) -> Request:
    """A new authorization request: random state, nonce and PKCE verifier (S256)."""
    state = generate_token(43)
    nonce = generate_token(43)
    verifier = generate_token(64)
    extra: dict[str, str] = {
        "nonce": nonce,
        "code_challenge": create_s256_code_challenge(verifier),
        "code_challenge_method": "S256",
    }
    if login_hint:
        extra["login_hint"] = login_hint
    url = prepare_grant_uri(
        provider.authorization_endpoint,
        client_id,
        "code",
        redirect_uri=redirect_uri,
        scope=SCOPE,
        state=state,
        **extra,
    )
    return Request(url=url, state=state, nonce=nonce, code_verifier=verifier)


async def exchange_code(
    provider: Provider,
    *,
    client_id: str,
    client_secret: str,
    code: str,
    redirect_uri: str,
    code_verifier: str,
) -> str:
    """The ID token the token endpoint gives for `code` (with the PKCE verifier and the
    client's credentials, as discovery said the provider takes them)."""
    params: dict[str, str] = {"code": code, "code_verifier": code_verifier}
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if provider.token_auth_method == "client_secret_post":  # noqa: S105 (a method's name)
        params |= {"client_id": client_id, "client_secret": client_secret}
    else:
        # RFC 6749 2.3.1: each part form-encoded before the Basic encoding.
        pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
        headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    body = prepare_token_request("authorization_code", redirect_uri=redirect_uri, **params)
    answer = await _get_json(
        provider.token_endpoint,
        what="the token request failed",
        param="code",
        method="POST",
        content=body.encode(),
        headers=headers,
    )
    token = answer.get("id_token")
    if not isinstance(token, str) or not token:
        raise SignInRefused("the token endpoint answered without an ID token", param="code")
    return token


async def fetch_keys(provider: Provider) -> KeySet:
    """The provider's signing keys (its JWKS), fetched for every sign-in so a rotation is
    seen at once."""
    document = await _get_json(
        provider.jwks_uri, what="fetching the provider's keys failed", param="code"
    )
    try:
        return KeySet.import_key_set(document)
    except (JoseError, ValueError, TypeError, KeyError):
        raise SignInRefused(
            "the provider's key set (jwks_uri) is not a valid JWK set", param="code"
        ) from None


def validate_id_token(
    token: str,
    keys: KeySet,
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    algorithms: Sequence[str],
    now: int | None = None,
) -> dict[str, Any]:
    """The ID token's claims, once its signature verifies with one of `keys` under one of
    `algorithms` and `iss`, `aud`, `azp`, `exp`, `iat` and `nonce` are right. SignInRefused
    naming the first check that failed."""
    if not isinstance(token, str) or len(token) > MAX_ID_TOKEN_CHARS:
        raise SignInRefused("the ID token is missing or too long")
    allowed = [a for a in algorithms if a in SIGNING_ALGORITHMS]
    if not allowed:  # never the library's defaults
        raise SignInRefused("the connection allows no signing algorithm: save it again")
    try:
        decoded = jwt.decode(token, keys, algorithms=allowed)
    except JoseError as exc:
        raise SignInRefused(
            "the ID token's signature does not verify with the provider's keys "
            f"({type(exc).__name__})"
        ) from None
    except (ValueError, TypeError, KeyError):
        raise SignInRefused("the ID token is not a valid JWT") from None
    claims: dict[str, Any] = dict(decoded.claims)
    at = int(time.time()) if now is None else now
    registry = JWTClaimsRegistry(
        now=at,
        leeway=LEEWAY_S,
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": client_id},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
        nonce={"essential": True, "value": nonce},
    )
    try:
        registry.validate(claims)
    except ExpiredTokenError:
        raise SignInRefused("the ID token has expired") from None
    except MissingClaimError as exc:
        raise SignInRefused(f"the ID token lacks a claim it must have ({exc})") from None
    except InvalidClaimError as exc:
        name = getattr(exc, "claim", "") or str(exc)
        raise SignInRefused(_claim_message(str(name), claims)) from None
    except JoseError as exc:
        raise SignInRefused(f"the ID token's claims are not valid ({exc})") from None
    iat = claims.get("iat")
    if not isinstance(iat, int | float) or iat > at + LEEWAY_S:
        raise SignInRefused("the ID token is issued in the future (iat)")
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise SignInRefused("the ID token was issued to another client (azp)")
    return claims


def _claim_message(name: str, claims: Mapping[str, Any]) -> str:
    if "iss" in name:
        return "the ID token comes from another issuer (iss)"
    if "aud" in name:
        return "the ID token is for another client (aud)"
    if "nonce" in name:
        return "the ID token's nonce is not the one of this sign-in (a replayed token?)"
    if "iat" in name:
        return "the ID token is issued in the future (iat)"
    return f"the ID token's claim {name} is not valid"


async def complete(
    provider: Provider,
    *,
    client_id: str,
    client_secret: str,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    nonce: str,
) -> dict[str, Any]:
    """The callback's protocol part: the code exchanged, the ID token verified; its claims.
    Closes this event loop's outbound client at the end (the console calls it under
    `asyncio.run`)."""
    try:
        token = await exchange_code(
            provider,
            client_id=client_id,
            client_secret=client_secret,
            code=code,
            redirect_uri=redirect_uri,
            code_verifier=code_verifier,
        )
        keys = await fetch_keys(provider)
    finally:
        await outbound.aclose()
    return validate_id_token(
        token,
        keys,
        issuer=provider.issuer,
        client_id=client_id,
        nonce=nonce,
        algorithms=provider.algorithms,
    )


async def discover_once(issuer: str) -> Provider:
    """`discover` under `asyncio.run`: closes the loop's outbound client at the end."""
    try:
        return await discover(issuer)
    finally:
        await outbound.aclose()
