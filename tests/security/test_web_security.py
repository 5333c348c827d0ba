"""Console, admin and API over the web: security headers, cookies, CSRF; the gateway stays lean."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from accounts.models import Organization

pytestmark = pytest.mark.django_db

HTTPS = {"HTTP_X_FORWARDED_PROTO": "https"}


@pytest.fixture
def behind_tls(settings: Any) -> Any:
    """What MANTLE_BEHIND_TLS_PROXY=1 sets: the proxy's X-Forwarded-Proto is trusted."""
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    return settings


@pytest.mark.parametrize("path", ["/console/login/", "/admin/login/"])
def test_pages_deny_framing_and_sniffing_and_carry_a_policy(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 200
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"
    policy = response["Content-Security-Policy"]
    for directive in (
        "default-src 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
    ):
        assert directive in policy
    assert "Strict-Transport-Security" not in response  # plain HTTP: no HSTS


def test_console_scripts_need_the_requests_nonce() -> None:
    first = Client().get("/console/login/")["Content-Security-Policy"]
    second = Client().get("/console/login/")["Content-Security-Policy"]
    script_src = next(d for d in first.split("; ") if d.startswith("script-src"))
    assert script_src.startswith("script-src 'self' 'nonce-")
    assert "unsafe-inline" not in script_src and "unsafe-eval" not in script_src
    assert first != second  # a fresh nonce per response


def test_hsts_and_secure_cookies_behind_tls(behind_tls: Any) -> None:
    response = Client().get("/console/login/", **HTTPS)
    assert response["Strict-Transport-Security"] == "max-age=31536000"
    assert response.cookies, "the login form sets the CSRF cookie"
    for morsel in response.cookies.values():
        assert morsel["secure"] is True
        assert morsel["samesite"] == "Lax"


def test_a_spoofed_forwarded_proto_is_ignored_without_a_tls_proxy() -> None:
    response = Client().get("/console/login/", **HTTPS)
    assert "Strict-Transport-Security" not in response
    assert all(not m["secure"] for m in response.cookies.values())


def test_session_cookie_is_httponly_lax_and_secure_over_tls(behind_tls: Any, world: Any) -> None:
    client = Client()
    client.force_login(world.users["owner"])
    response = client.get("/api/v1/me", **HTTPS)
    assert response.status_code == 200
    session = Client()
    # A real log-in through the console form, over HTTPS.
    page = session.get("/console/login/", **HTTPS)
    token = page.cookies["csrftoken"].value
    done = session.post(
        "/console/login/",
        {
            "username": world.users["owner"].email,
            "password": "correct horse battery",
            "email": world.users["owner"].email,
            "csrfmiddlewaretoken": token,
        },
        **HTTPS,
    )
    assert done.status_code == 302, done.content[:500]
    cookie = done.cookies["sessionid"]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"
    assert cookie["secure"] is True


def test_console_login_without_csrf_token_is_refused(world: Any) -> None:
    client = Client(enforce_csrf_checks=True)
    response = client.post(
        "/console/login/",
        {
            "username": world.users["owner"].email,
            "email": world.users["owner"].email,
            "password": "correct horse battery",
        },
    )
    assert response.status_code == 403
    assert "sessionid" not in response.cookies


def test_api_writes_with_a_session_need_the_csrf_token(world: Any) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.users["owner"])
    before = Organization.objects.count()
    refused = client.post(
        "/api/v1/organizations",
        data=json.dumps({"name": "Forged"}),
        content_type="application/json",
    )
    assert refused.status_code == 403
    assert Organization.objects.count() == before
    token = Client().get("/console/login/").cookies["csrftoken"].value
    client.cookies["csrftoken"] = token
    accepted = client.post(
        "/api/v1/organizations",
        data=json.dumps({"name": "Real"}),
        content_type="application/json",
        headers={"x-csrftoken": token},
    )
    assert accepted.status_code == 201
    assert Organization.objects.count() == before + 1


def test_api_writes_with_an_admin_key_need_no_csrf_token(world: Any) -> None:
    # A server calling the management API with its key has no session to forge.
    client = Client(enforce_csrf_checks=True)
    before = world.org.projects.count()
    created = client.post(
        f"/api/v1/organizations/{world.org.id}/projects",
        data=json.dumps({"name": "From a script"}),
        content_type="application/json",
        headers={"authorization": f"Bearer {world.admin_secret}"},
    )
    assert created.status_code == 201, created.content
    assert world.org.projects.count() == before + 1


@pytest.mark.django_db(transaction=True)
def test_gateway_replies_are_lean_but_not_sniffable() -> None:
    response = Client().get("/v1/models", headers={"authorization": "Bearer sk-nope"})
    assert response.status_code == 401
    assert response["X-Content-Type-Options"] == "nosniff"
    for console_only in ("Content-Security-Policy", "X-Frame-Options", "Set-Cookie", "Vary"):
        assert console_only not in response


def test_console_login_is_throttled_even_for_the_right_password(world: Any, settings: Any) -> None:
    settings.MANTLE_LOGIN_MAX_FAILURES_PER_PAIR = 3
    email = world.users["owner"].email
    client = Client()
    for _ in range(3):
        wrong = client.post("/console/login/", {"username": email, "password": "nope"})
        assert wrong.status_code == 400
    right = client.post("/console/login/", {"username": email, "password": "correct horse battery"})
    assert right.status_code == 429
    assert "sessionid" not in right.cookies
    assert "_auth_user_id" not in client.session
