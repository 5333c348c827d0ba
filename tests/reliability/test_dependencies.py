"""Redis restarted under load, the broker and PostgreSQL cut: clean 503s, readiness, recovery."""

from __future__ import annotations

import re

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

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(240),
    pytest.mark.models,
]

# What a client may see while a dependency is away; never a 500, never a hang.
OUTAGE_CODES = {"redis_unavailable", "broker_unavailable", "worker_lost", "no_available_worker"}


# Every key this module's tests handed to the platform, for the log check at the end.
SECRETS: list[str] = []


@pytest.fixture(autouse=True)
def remember_the_key(tenant: Tenant) -> None:
    SECRETS.append(tenant.secret)


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
    # The clients run into the outage (polled, bounded) before readiness is asked.
    assert wait_until(
        lambda: any(o.error_code == "redis_unavailable" for o in list(load.outcomes)), 60
    )
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


def raw_answers(url: str, secret: str, model: str) -> list[str]:
    """The bodies a client gets, exactly as sent: a chat completion plain and streamed, and
    the model list."""
    headers = {"authorization": f"Bearer {secret}"}
    bodies = []
    for stream in (False, True):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={**body, "max_tokens": 4},
            headers=headers,
            timeout=60,
        )
        bodies.append(response.text)
    bodies.append(httpx.get(f"{url}/v1/models", headers=headers, timeout=60).text)
    return bodies


# What a traceback or a raw exception leaves in text: never in what a client reads.
TRACEBACK = re.compile(
    r'Traceback \(most recent call last\)|File "[^"]+", line \d+|\w+(Error|Exception): '
)


def test_no_traceback_reached_a_client_or_a_key_a_log(
    faulty: FaultyPlatform, tenant: Tenant
) -> None:
    from tests.factories import make_api_key

    assert serves(faulty, tenant, tenant.echo.id)
    model = tenant.echo.id
    _, fresh = make_api_key(tenant.org, scopes=["inference"])
    SECRETS.append(fresh)
    faulty.client().delete(keys.cache_key(keys.secret_digest(fresh)))  # only the database knows it
    bodies = raw_answers(faulty.url, tenant.secret, model)
    # Each dependency away in turn, as the tests above have them, the answers kept raw.
    faulty.broker.cut()
    try:
        bodies += raw_answers(faulty.url, tenant.secret, model)
    finally:
        faulty.broker.restore()
    assert wait_until(lambda: serves(faulty, tenant, model), timeout=90)
    faulty.database.cut()
    try:
        bodies += raw_answers(faulty.url, fresh, model)
    finally:
        faulty.database.restore()
    assert wait_until(lambda: call(faulty.url, fresh, model, stream=False).status == 200, 30)
    faulty.redis.kill()
    try:
        bodies += raw_answers(faulty.url, tenant.secret, model)
    finally:
        faulty.redis.start()
    assert wait_until(lambda: serves(faulty, tenant, model), timeout=60)

    # The outages were met (else these bodies would prove nothing), and none leaked.
    codes = set(re.findall(r'"code":\s*"(\w+)"', "\n".join(bodies)))
    assert {"broker_unavailable", "database_unavailable", "redis_unavailable"} <= codes, codes
    for body in bodies:
        assert not TRACEBACK.search(body), body
    # No key reached a log: neither this test's nor any other this module handed out.
    assert tenant.secret in SECRETS
    for proc in faulty.stack.processes:
        text = proc.log.read_text(errors="replace")
        for secret in SECRETS:
            assert secret not in text, proc.name
            assert secret[12:] not in text, proc.name
