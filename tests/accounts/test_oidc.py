"""OpenID Connect's protocol side (accounts/oidc.py): discovery against the local provider
under the outbound policy, and every ID token check failing on its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.test import override_settings
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey

from accounts import oidc
from core.errors import InvalidInput
from tests.support.oidc_provider import LocalOidcProvider

ISSUER = "https://idp.example.com"
CLIENT = "mantle-console"
NONCE = "nonce-of-this-sign-in"


@pytest.fixture(scope="module")
def idp() -> Iterator[LocalOidcProvider]:
    with LocalOidcProvider() as provider:
        yield provider


def discover(issuer: str) -> oidc.Provider:
    return asyncio.run(oidc.discover_once(issuer))


def test_discovery_reads_the_document_of_an_allowed_provider(idp: LocalOidcProvider) -> None:
    with override_settings(**idp.settings()):
        found = discover(idp.issuer)
    assert found == oidc.Provider(
        issuer=idp.issuer,
        authorization_endpoint=f"{idp.issuer}/authorize",
        token_endpoint=f"{idp.issuer}/token",
        jwks_uri=f"{idp.issuer}/jwks",
        token_auth_method="client_secret_basic",
        algorithms=("RS256",),
    )


def test_an_issuer_on_loopback_gets_no_use_of_the_operators_provider_lists(
    idp: LocalOidcProvider,
) -> None:
    """An organization's issuer is judged by the identity providers' lists alone: loopback
    allowed for the operator's own providers (or organizations' providers) does not let an
    issuer reach it."""
    host = f"127.0.0.1:{urlsplit(idp.issuer).port}"
    operators = {
        "MANTLE_PROVIDER_ALLOWED_PRIVATE": [host],
        "MANTLE_PROVIDER_ALLOWED_HTTP": [host],
        "MANTLE_PROVIDER_BYOK_ALLOWED_PRIVATE": [host],
        "MANTLE_PROVIDER_BYOK_ALLOWED_HTTP": [host],
    }
    with override_settings(**operators), pytest.raises(InvalidInput) as refused:
        discover(idp.issuer)
    assert refused.value.param == "issuer"
    assert refused.value.message == (
        "the issuer URL is refused by the outbound policy: the identity provider's URL must "
        "use https (plain http only to hosts the operator allows)"
    )
    # http allowed but not the private address: still refused (two decisions).
    with (
        override_settings(MANTLE_SSO_ALLOWED_HTTP=[host]),
        pytest.raises(InvalidInput) as again,
    ):
        discover(idp.issuer)
    assert "127.0.0.1 is a loopback address, not a public address" in again.value.message


def test_discovery_failures_are_named(idp: LocalOidcProvider) -> None:
    with override_settings(**idp.settings()):
        with pytest.raises(InvalidInput) as missing:
            discover(f"{idp.issuer}/realms/none")
        assert missing.value.message == (
            "discovery failed: the provider answered HTTP 404 (not_found)"
        )
        slash = f"{idp.issuer}/"
        with pytest.raises(InvalidInput) as mismatch:
            discover(slash)
        assert f"names the issuer {idp.issuer!r}, not {slash!r}" in mismatch.value.message


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ("", "the issuer URL is required"),
        ("ftp://idp.example.com", "must use https"),
        ("https://idp.example.com/?tenant=1", "must not have a query or a fragment"),
        ("https://user:pw@idp.example.com", "must not contain a user name or password"),
        ("https://169.254.169.254/", "a cloud metadata address"),
        ("https://10.0.0.1/realms/x", "a private address"),
        ("https://idp.example.com:22/", "port"),
    ],
)
def test_bad_issuer_urls_are_named(issuer: str, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        discover(issuer)
    assert refused.value.param == "issuer"
    assert message in refused.value.message


# --- the ID token ---------------------------------------------------------------------------

KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
KEYS = KeySet.import_key_set({"keys": [KEY.as_dict(private=False)]})


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "248289761001",
        "aud": CLIENT,
        "exp": now + 300,
        "iat": now,
        "nonce": NONCE,
        "email": "alice@acme.test",
        "email_verified": True,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def signed(payload: dict[str, Any], key: Any = KEY, alg: str = "RS256") -> str:
    return jwt.encode({"alg": alg, "kid": "k1"}, payload, key, algorithms=[alg])


def validate(token: str) -> dict[str, Any]:
    return oidc.validate_id_token(
        token, KEYS, issuer=ISSUER, client_id=CLIENT, nonce=NONCE, algorithms=["RS256"]
    )


def test_a_good_id_token_gives_its_claims() -> None:
    assert validate(signed(claims()))["email"] == "alice@acme.test"
    # Several audiences are fine when azp names this client.
    many = claims(aud=[CLIENT, "another-api"], azp=CLIENT)
    assert validate(signed(many))["sub"] == "248289761001"


@pytest.mark.parametrize(
    ("token", "message"),
    [
        pytest.param(
            lambda: signed(claims(), key=OTHER_KEY),
            "the ID token's signature does not verify with the provider's keys",
            id="bad-signature",
        ),
        pytest.param(
            lambda: signed(claims(), key=OctKey.import_key("c" * 32), alg="HS256"),
            "the ID token's signature does not verify with the provider's keys",
            id="symmetric-alg",
        ),
        pytest.param(
            lambda: signed(claims(aud="someone-else")),
            "the ID token is for another client (aud)",
            id="wrong-aud",
        ),
        pytest.param(
            lambda: signed(claims(iss="https://evil.example.com")),
            "the ID token comes from another issuer (iss)",
            id="wrong-iss",
        ),
        pytest.param(
            lambda: signed(claims(exp=int(time.time()) - 3600)),
            "the ID token has expired",
            id="expired",
        ),
        pytest.param(
            lambda: signed(claims(nonce="another-sign-in")),
            "the ID token's nonce is not the one of this sign-in (a replayed token?)",
            id="nonce-mismatch",
        ),
        pytest.param(
            lambda: signed(claims(nonce=None)),
            "the ID token lacks a claim it must have",
            id="no-nonce",
        ),
        pytest.param(
            lambda: signed(claims(iat=int(time.time()) + 3600)),
            "the ID token is issued in the future (iat)",
            id="future-iat",
        ),
        pytest.param(
            lambda: signed(claims(aud=[CLIENT, "another-api"])),
            "the ID token was issued to another client (azp)",
            id="many-aud-without-azp",
        ),
        pytest.param(
            lambda: signed(claims(azp="another-client")),
            "the ID token was issued to another client (azp)",
            id="wrong-azp",
        ),
        pytest.param(lambda: "not.a.jwt", "", id="garbage"),
    ],
)
def test_each_id_token_check_refuses(token: Any, message: str) -> None:
    with pytest.raises(oidc.SignInRefused) as refused:
        validate(token())
    assert message in refused.value.message


def test_no_allowed_algorithm_refuses_rather_than_using_defaults() -> None:
    with pytest.raises(oidc.SignInRefused, match="allows no signing algorithm"):
        oidc.validate_id_token(
            signed(claims()), KEYS, issuer=ISSUER, client_id=CLIENT, nonce=NONCE, algorithms=[]
        )
    with pytest.raises(oidc.SignInRefused, match="allows no signing algorithm"):
        oidc.validate_id_token(
            signed(claims(), key=OctKey.import_key("c" * 32), alg="HS256"),
            KEYS,
            issuer=ISSUER,
            client_id=CLIENT,
            nonce=NONCE,
            algorithms=["HS256", "none"],
        )
