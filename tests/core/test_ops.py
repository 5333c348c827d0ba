"""Operations endpoints: liveness, readiness naming the missing dependency, metrics, request ids."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db


def test_healthz() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


OPS_TOKEN = "ops-token-for-tests"


@pytest.fixture
def ops_token(settings: Any) -> str:
    settings.MANTLE_OPS_TOKEN = OPS_TOKEN
    settings.MANTLE_OPS_NETWORKS = []
    return OPS_TOKEN


def operator() -> Client:
    return Client(headers={"authorization": f"Bearer {OPS_TOKEN}"})


def test_readyz_all_up(ops_token: str) -> None:
    body = Client().get("/readyz").json()
    assert body == {"status": "ok", "down": []}
    detailed = operator().get("/readyz").json()
    assert (detailed["status"], detailed["down"]) == ("ok", [])
    assert set(detailed["checks"]) == {"database", "redis", "broker"}


@override_settings(CELERY_BROKER_URL="redis://127.0.0.1:1/0")
def test_readyz_names_the_broker_when_down(ops_token: str) -> None:
    response = Client().get("/readyz")
    assert response.status_code == 503
    # The public answer names the component, never the backend's error (host, port).
    assert response.json() == {"status": "unavailable", "down": ["broker"]}
    assert "127.0.0.1" not in response.content.decode()
    detailed = operator().get("/readyz")
    assert detailed.status_code == 503
    assert detailed.json()["checks"]["broker"]["ok"] is False
    assert detailed.json()["checks"]["broker"]["error"]


def test_readyz_names_redis_when_down(monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from core import ops

    monkeypatch.setattr(ops, "get_redis", lambda: redis.Redis(port=1, socket_connect_timeout=1))
    response = Client().get("/readyz")
    assert response.status_code == 503
    assert response.json()["down"] == ["redis"]


@override_settings(ALLOWED_HOSTS=["api.mantle.example.com"])
def test_probes_answer_whatever_host_they_are_reached_by(ops_token: str) -> None:
    # The kubelet probes and Prometheus scrapes by pod IP, compose's healthcheck by
    # 127.0.0.1: neither is an allowed host, and neither may be refused for it.
    for path in ("/healthz", "/readyz", "/metrics"):
        for host in ("10.1.2.3:8000", "127.0.0.1:8000"):
            response = operator().get(path, HTTP_HOST=host)
            assert response.status_code == 200, (path, host)
    # The console still refuses a host it does not serve.
    assert Client().get("/console/login/", HTTP_HOST="10.1.2.3:8000").status_code == 400
    assert Client().get("/console/login/", HTTP_HOST="api.mantle.example.com").status_code == 200


def test_metrics_exposes_request_counters(ops_token: str) -> None:
    Client().get("/healthz")
    text = operator().get("/metrics").content.decode()
    assert 'mantle_http_requests_total{method="GET",route="healthz",status="200"}' in text


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", f"Basic {OPS_TOKEN}", "Bearer "]
)
def test_metrics_are_not_public(ops_token: str, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    response = Client(headers=headers).get("/metrics", REMOTE_ADDR="203.0.113.9")
    assert response.status_code == 404
    assert b"mantle_" not in response.content


def test_the_internal_network_sees_metrics_and_details_without_the_token(settings: Any) -> None:
    settings.MANTLE_OPS_TOKEN = ""
    settings.MANTLE_OPS_NETWORKS = ["10.40.0.0/16", "fd00::/8"]
    for inside in ("10.40.7.9", "fd00::5"):
        assert Client().get("/metrics", REMOTE_ADDR=inside).status_code == 200, inside
        assert "checks" in Client().get("/readyz", REMOTE_ADDR=inside).json()
    for outside in ("10.41.0.1", "203.0.113.9", "fe80::1"):
        assert Client().get("/metrics", REMOTE_ADDR=outside).status_code == 404, outside
        assert "checks" not in Client().get("/readyz", REMOTE_ADDR=outside).json()
    # With no token configured, no Authorization header opens them.
    assert Client(headers={"authorization": "Bearer "}).get("/metrics").status_code == 404


def test_request_id_echoed_and_generated(caplog: pytest.LogCaptureFixture) -> None:
    mine = Client().get("/healthz", headers={"x-request-id": "client-123"})
    assert mine["x-request-id"] == "client-123"
    generated = Client().get("/healthz")
    assert generated["x-request-id"].startswith("req_")
    bogus = Client().get("/healthz", headers={"x-request-id": "bad id\nwith newline"})
    assert bogus["x-request-id"].startswith("req_")


@pytest.mark.django_db(transaction=True)
def test_gateway_never_takes_the_clients_request_id() -> None:
    # The id keys the task, the response stream and the usage event: a reused one
    # would drop the next request as a duplicate and bill many requests once.
    first = Client().get("/v1/models", headers={"x-request-id": "client-123"})
    second = Client().get("/v1/models", headers={"x-request-id": "client-123"})
    assert first["x-request-id"].startswith("req_")
    assert second["x-request-id"].startswith("req_")
    assert first["x-request-id"] != second["x-request-id"]


def test_log_lines_carry_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    Client().get("/api/v1/organizations", headers={"x-request-id": "trace-me-1"})
    records = [r for r in caplog.records if r.name == "django.request"]
    assert records
    assert all(getattr(r, "request_id", None) == "trace-me-1" for r in records)


@pytest.mark.rabbitmq
def test_readyz_with_rabbitmq_as_the_broker(settings: Any, ops_token: str) -> None:
    settings.CELERY_BROKER_URL = os.environ.get(
        "MANTLE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
    )
    body = operator().get("/readyz").json()
    assert body["down"] == []
    assert body["checks"]["broker"]["ok"] is True


def test_no_view_hook_takes_a_gateway_request_off_the_event_loop() -> None:
    # Django runs view hooks for every request; a sync one (CSRF's) would be adapted with a
    # hop to the single shared sync thread. The console-only wrappers give the ASGI chain
    # async hooks that answer gateway paths on the loop.
    from asgiref.sync import SyncToAsync
    from django.core.handlers.asgi import ASGIHandler

    hooks = ASGIHandler()._view_middleware
    assert hooks
    assert [h for h in hooks if isinstance(h, SyncToAsync)] == []
