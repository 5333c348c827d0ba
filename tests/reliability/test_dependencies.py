"""Redis restarted under load, the broker and PostgreSQL cut: clean 503s, readiness, recovery."""

from __future__ import annotations

import time

import httpx
import pytest

from accounts import keys
from tests.reliability.conftest import FaultyPlatform, Tenant
from tests.reliability.support import (
    Load,
    call,
    check_usage_exactly_once,
    usage_by_request,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.timeout(240)]

# What a client may see while a dependency is away; never a 500, never a hang.
OUTAGE_CODES = {"redis_unavailable", "broker_unavailable", "worker_lost", "no_available_worker"}


def ready(url: str) -> tuple[int, list[str]]:
    response = httpx.get(f"{url}/readyz", timeout=30)
    return response.status_code, response.json()["down"]


def serves(faulty: FaultyPlatform, tenant: Tenant, model: str) -> bool:
    return call(faulty.url, tenant.secret, model, stream=False, timeout=30).status == 200


def check_clean(outcomes: list) -> None:  # type: ignore[type-arg]
    for outcome in outcomes:
        assert not outcome.transport_error, outcome
        assert outcome.status != 500, outcome
        if outcome.status == 200 and outcome.stream:
            # A stream either finishes or carries one in-band error, never just stops.
            assert outcome.done != (outcome.error_code is not None), outcome
        if outcome.error_code is not None:
            assert outcome.error_code in OUTAGE_CODES, outcome
            assert outcome.error_message, outcome


def test_redis_restarted_under_load(faulty: FaultyPlatform, tenant: Tenant) -> None:
    assert serves(faulty, tenant, tenant.echo.id)
    load = Load(faulty.url, tenant.secret, tenant.echo.id, threads=6).start()
    assert wait_until(lambda: load.count() >= 20, timeout=60)
    faulty.redis.kill()
    during = load.count()
    time.sleep(2)
    status, down = ready(faulty.url)
    assert (status, down) == (503, ["redis"])
    faulty.redis.start()
    # Service resumes by itself: no process was restarted.
    assert wait_until(lambda: serves(faulty, tenant, tenant.echo.id), timeout=60)
    after = load.count()
    assert wait_until(lambda: load.count() >= after + 20, timeout=60)
    outcomes = load.stop()
    check_clean(outcomes)
    refused = [o for o in outcomes if o.error_code == "redis_unavailable"]
    assert refused, "the outage was seen by clients"
    assert [o.status for o in outcomes[-10:]] == [200] * 10
    assert during < len(outcomes)
    # The usage stream survived the restart (AOF); each answer is counted exactly once.
    check_usage_exactly_once(outcomes, faulty.client())
    assert ready(faulty.url) == (200, [])


def test_redis_down_is_a_clean_503_naming_it(faulty: FaultyPlatform, tenant: Tenant) -> None:
    assert serves(faulty, tenant, tenant.echo.id)
    faulty.redis.kill()
    try:
        for stream in (False, True):
            outcome = call(faulty.url, tenant.secret, tenant.echo.id, stream=stream)
            assert (outcome.status, outcome.error_code) == (503, "redis_unavailable")
            assert "Redis" in outcome.error_message or "redis" in outcome.error_message
        models = httpx.get(
            f"{faulty.url}/v1/models", headers={"authorization": f"Bearer {tenant.secret}"}
        )
        assert models.status_code == 503
        assert models.headers["retry-after"] == "2"
        assert models.json()["error"]["type"] == "server_error"
        assert ready(faulty.url) == (503, ["redis"])
    finally:
        faulty.redis.start()
    assert wait_until(lambda: serves(faulty, tenant, tenant.echo.id), timeout=60)


def test_broker_unreachable_for_a_while(faulty: FaultyPlatform, tenant: Tenant) -> None:
    assert serves(faulty, tenant, tenant.echo.id)
    faulty.broker.cut()
    try:
        outcomes = [
            call(faulty.url, tenant.secret, tenant.echo.id, stream=stream)
            for stream in (False, True)
        ]
        for outcome in outcomes:
            assert (outcome.status, outcome.error_code) == (503, "broker_unavailable")
            assert "broker" in outcome.error_message
        assert ready(faulty.url) == (503, ["broker"])
    finally:
        faulty.broker.restore()
    # Nothing ran for the refused requests, so nothing is billed.
    events = usage_by_request(faulty.client())
    assert all(o.request_id not in events for o in outcomes)
    # The gateway and the worker both reconnect on their own.
    assert wait_until(lambda: serves(faulty, tenant, tenant.echo.id), timeout=90)
    assert ready(faulty.url) == (200, [])


def test_postgres_unreachable(faulty: FaultyPlatform, tenant: Tenant) -> None:
    assert serves(faulty, tenant, tenant.echo.id)  # the key and endpoint are now cached
    from tests.factories import make_api_key

    _, fresh = make_api_key(tenant.org, scopes=["inference"])
    # Not yet seen by the gateway: only the database knows it.
    faulty.client().delete(keys.cache_key(keys.secret_digest(fresh)))
    faulty.database.cut()
    try:
        # The hot path does not touch PostgreSQL: a known key keeps working.
        assert serves(faulty, tenant, tenant.echo.id)
        outcome = call(faulty.url, fresh, tenant.echo.id, stream=False)
        assert (outcome.status, outcome.error_code) == (503, "database_unavailable")
        assert "database" in outcome.error_message
        models = httpx.get(
            f"{faulty.url}/v1/models", headers={"authorization": f"Bearer {tenant.secret}"}
        )
        assert (models.status_code, models.json()["error"]["code"]) == (
            503,
            "database_unavailable",
        )
        assert ready(faulty.url) == (503, ["database"])
    finally:
        faulty.database.restore()
    # The broken connections are replaced without a restart.
    assert wait_until(
        lambda: call(faulty.url, fresh, tenant.echo.id, stream=False).status == 200, 30
    )
    models = httpx.get(
        f"{faulty.url}/v1/models", headers={"authorization": f"Bearer {tenant.secret}"}
    )
    assert models.status_code == 200
    assert ready(faulty.url) == (200, [])


def test_no_traceback_reached_a_client_or_a_key_a_log(
    faulty: FaultyPlatform, tenant: Tenant
) -> None:
    assert serves(faulty, tenant, tenant.echo.id)
    for proc in faulty.stack.processes:
        text = proc.log.read_text(errors="replace")
        assert tenant.secret not in text
        assert tenant.secret[12:] not in text
