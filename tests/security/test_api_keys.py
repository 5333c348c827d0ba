"""API keys: guessing slowed and logged per address, constant-time checks, never a key in logs."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

import pytest
from django.test import Client

from accounts import keys
from accounts.models import ApiKey
from core.redis import get_redis
from gateway.resolve import failures_key
from tests.factories import OrganizationFactory, make_api_key

pytestmark = pytest.mark.django_db(transaction=True)

ATTACKER = "203.0.113.7"
CUSTOMER = "198.51.100.20"


def models(secret: str, address: str) -> Any:
    return Client().get(
        "/v1/models", headers={"authorization": f"Bearer {secret}"}, REMOTE_ADDR=address
    )


def guess(n: int) -> str:
    return "sk-" + f"{n:048d}"


@pytest.fixture
def limited(settings: Any) -> Any:
    settings.MANTLE_KEY_FAILURE_LIMIT = 3
    settings.MANTLE_KEY_FAILURE_WINDOW_S = 60
    return settings


def test_wrong_keys_past_the_limit_are_refused_but_a_valid_one_is_served(limited: Any) -> None:
    _, secret = make_api_key(OrganizationFactory())
    for n in range(3):
        response = models(guess(n), ATTACKER)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert get_redis().get(failures_key(ATTACKER)) == "3"
    refused = models(guess(3), ATTACKER)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "too_many_failed_authentications"
    assert error["type"] == "invalid_request_error"
    assert 1 <= int(refused["retry-after"]) <= 60
    # A refused attempt is not even looked up, so it does not extend the count.
    assert get_redis().get(failures_key(ATTACKER)) == "3"
    # A customer behind the same address (a NAT) keeps working with its valid key.
    assert models(secret, ATTACKER).status_code == 200
    assert get_redis().get(failures_key(ATTACKER)) == "3"


def test_a_blocked_address_gets_no_database_lookups_for_keys_the_cache_does_not_know(
    limited: Any, django_assert_num_queries: Any
) -> None:
    for n in range(3):
        models(guess(n), ATTACKER)
    # A well-formed key nobody cached: refused before the database is asked.
    with django_assert_num_queries(0):
        assert models(guess(99), ATTACKER).status_code == 429
    assert get_redis().get(keys.cache_key(keys.secret_digest(guess(99)))) is None


def test_other_addresses_and_valid_keys_are_not_slowed(limited: Any) -> None:
    _, secret = make_api_key(OrganizationFactory())
    for n in range(3):
        models(guess(n), ATTACKER)
    for _ in range(5):
        assert models(secret, CUSTOMER).status_code == 200
    assert get_redis().get(failures_key(CUSTOMER)) is None


def test_malformed_keys_count_as_failures(limited: Any) -> None:
    for value in ("sk-short", "not-a-key-at-all", guess(1)):
        assert models(value, ATTACKER).status_code == 401
    assert models(guess(2), ATTACKER).status_code == 429


def test_the_window_expires(limited: Any) -> None:
    _, secret = make_api_key(OrganizationFactory())
    for n in range(3):
        models(guess(n), ATTACKER)
    ttl = get_redis().ttl(failures_key(ATTACKER))
    assert 0 < ttl <= 60
    get_redis().delete(failures_key(ATTACKER))  # what the expiry does after the window
    assert models(secret, ATTACKER).status_code == 200


def organizations(secret: str, address: str) -> Any:
    return Client().get(
        "/api/v1/organizations", headers={"authorization": f"Bearer {secret}"}, REMOTE_ADDR=address
    )


def test_guessing_through_the_management_api_shares_the_gateways_limit(limited: Any) -> None:
    _, secret = make_api_key(OrganizationFactory(), scopes=["admin", "inference"])
    assert organizations(guess(0), ATTACKER).status_code == 401
    assert models(guess(1), ATTACKER).status_code == 401
    assert organizations("sk-short", ATTACKER).status_code == 401
    assert get_redis().get(failures_key(ATTACKER)) == "3"

    refused = organizations(guess(3), ATTACKER)

    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_failed_authentications"
    assert 1 <= int(refused["retry-after"]) <= 60
    assert models(guess(4), ATTACKER).status_code == 429
    # Valid keys keep working from the blocked address, through both.
    assert organizations(secret, ATTACKER).status_code == 200
    assert models(secret, ATTACKER).status_code == 200
    assert organizations(secret, CUSTOMER).status_code == 200
    assert get_redis().get(failures_key(ATTACKER)) == "3"


def test_guessing_is_logged_with_the_address_and_never_the_key(
    limited: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    guesses = [guess(n) for n in range(4)]
    for value in guesses:
        models(value, ATTACKER)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        r.name == "accounts.keys" and ATTACKER in r.getMessage() and "3 incorrect" in r.getMessage()
        for r in warnings
    )
    text = caplog.text
    for value in guesses:
        assert value not in text
        assert value[3:] not in text


def test_secrets_never_reach_logs_error_messages_or_redis(
    world: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    owner = world.client_for("owner")
    created = owner.post(
        f"/api/v1/organizations/{world.org.id}/projects/{world.org.projects.first().id}/api-keys",
        data=json.dumps({"name": "ci"}),
        content_type="application/json",
    )
    assert created.status_code == 201
    secret = created.json()["secret"]
    key_id = created.json()["id"]
    replies = [
        models(secret, CUSTOMER),
        models(secret[:-1] + ("A" if secret[-1] != "A" else "B"), CUSTOMER),
        owner.get(f"/api/v1/organizations/{world.org.id}/api-keys/{key_id}"),
        owner.get(f"/api/v1/organizations/{world.org.id}/audit-log"),
        Client(headers={"authorization": f"Bearer {secret}"}).get("/api/v1/me"),
    ]
    owner.post(f"/api/v1/organizations/{world.org.id}/api-keys/{key_id}/revoke")
    replies.append(models(secret, CUSTOMER))
    assert [r.status_code for r in replies] == [200, 401, 200, 200, 401, 401]
    logging.getLogger("tests").warning("a client sent Authorization: Bearer %s", secret)
    for reply in replies:
        assert secret not in reply.content.decode()
        assert secret[12:] not in reply.content.decode()
    assert secret not in caplog.text
    assert secret[12:] not in caplog.text
    client = get_redis()
    for name in client.scan_iter("*"):
        assert secret not in name
        if client.type(name) == "string":
            assert secret not in (client.get(name) or "")
    stored = ApiKey.objects.get(id=key_id)
    assert secret not in json.dumps(
        {f.name: str(getattr(stored, f.attname)) for f in ApiKey._meta.fields}
    )


def test_digests_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    _, secret = make_api_key(OrganizationFactory())
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert models(secret, CUSTOMER).status_code == 200
    digest = keys.secret_digest(secret).encode()
    assert (digest, digest) in compared
    assert keys.constant_time_equal("abc", "abd") is False
