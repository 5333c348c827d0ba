"""The back office's password step is throttled by the console's policy (same backend)."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client, override_settings

from accounts.models import User
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery"
STAFF = "operator@mantle.example"
ATTACKER = "203.0.113.66"


def admin_login(email: str, password: str, address: str, client: Client | None = None) -> Any:
    return (client or Client()).post(
        "/admin/login/?next=/admin/",
        {"username": email, "password": password},
        REMOTE_ADDR=address,
    )


@pytest.fixture
def staff() -> User:
    user: User = UserFactory(email=STAFF, is_staff=True)
    return user


@override_settings(MANTLE_LOGIN_MAX_FAILURES_PER_PAIR=3, MANTLE_LOGIN_FAILURE_WINDOW_S=600)
def test_admin_password_guessing_is_refused_without_locking_the_operator_out(
    staff: User,
) -> None:
    for n in range(3):
        wrong = admin_login(STAFF, f"guess {n}", ATTACKER)
        assert wrong.status_code == 200
        assert "_auth_user_id" not in wrong.wsgi_request.session
    client = Client()
    refused = admin_login(STAFF, PASSWORD, ATTACKER, client)
    assert refused.status_code == 429
    assert (
        "Too many failed log-ins for this email address from your network address"
        in refused.content.decode()
    )
    assert "_auth_user_id" not in client.session
    # The operator, from their own address, passes the password step at once.
    operator = Client()
    assert admin_login(STAFF, PASSWORD, "198.51.100.7", operator).status_code == 302
    assert operator.session["_auth_user_id"] == str(staff.pk)


@override_settings(MANTLE_LOGIN_MAX_FAILURES_PER_PAIR=100, MANTLE_LOGIN_MAX_FAILURES_PER_ADDRESS=4)
def test_admin_logins_per_address_are_capped(staff: User) -> None:
    for n in range(4):
        assert admin_login(f"staff{n}@mantle.example", "nope", ATTACKER).status_code == 200
    refused = admin_login(STAFF, PASSWORD, ATTACKER)
    assert refused.status_code == 429
    assert "Too many failed log-ins for your network address" in refused.content.decode()


@override_settings(MANTLE_LOGIN_MAX_FAILURES_PER_PAIR=3)
def test_console_and_back_office_failures_count_together(staff: User) -> None:
    """One policy: guesses cannot be spread over the two log-in pages."""
    for _ in range(2):
        response = Client().post(
            "/console/login/", {"username": STAFF, "password": "nope"}, REMOTE_ADDR=ATTACKER
        )
        assert response.status_code == 400
    assert admin_login(STAFF, "nope", ATTACKER).status_code == 200
    assert admin_login(STAFF, PASSWORD, ATTACKER).status_code == 429
