"""Sign-up, log-in with throttling, log-out and password reset (emails in the test outbox)."""

from __future__ import annotations

import re

import pytest
from django.core import mail
from django.test import Client, override_settings

from accounts import services, throttle
from accounts.models import Membership, Organization, Project, User
from accounts.permissions import Role
from accounts.principal import SYSTEM
from config.redis import get_redis
from tests.console.support import org_url
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery"
SIGNUP = {
    "email": "Ada@Example.com",
    "full_name": "Ada Lovelace",
    "organization_name": "Analytical Engines",
    "password": "a sturdy passphrase 42",
    "password_again": "a sturdy passphrase 42",
}


# --- sign-up ---------------------------------------------------------------------------


def test_signup_creates_the_user_their_organization_and_logs_in() -> None:
    client = Client()
    response = client.post("/console/signup/", SIGNUP)
    user = User.objects.get(email="ada@example.com")
    org = Organization.objects.get(memberships__user=user)
    assert response.status_code == 302
    assert response["Location"] == org_url("console-quickstart", org.id)
    assert (user.full_name, user.check_password(SIGNUP["password"])) == ("Ada Lovelace", True)
    assert org.name == "Analytical Engines"
    assert Membership.objects.get(organization=org).role == Role.OWNER
    assert list(Project.objects.filter(organization=org).values_list("name", "is_default")) == [
        ("Default project", True)
    ]
    assert client.get(org_url("console-quickstart", org.id)).status_code == 200


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"password_again": "something else 42"}, "password_again", "the two passwords differ"),
        (
            {"password": "short", "password_again": "short"},
            "password",
            "This password is too short",
        ),
        ({"email": "not-an-email"}, "email", "Enter a valid email address."),
        ({"organization_name": "  "}, "organization_name", "This field is required."),
    ],
)
def test_signup_bad_input_names_the_field_and_creates_nothing(
    change: dict[str, str], field: str, message: str
) -> None:
    response = Client().post("/console/signup/", {**SIGNUP, **change})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert response.context["form"].errors[field]
    assert User.objects.count() == 0
    assert Organization.objects.count() == 0


def test_signup_with_a_taken_email_is_refused_and_creates_nothing() -> None:
    UserFactory(email="ada@example.com")
    response = Client().post("/console/signup/", SIGNUP)
    assert response.status_code == 409
    assert "an account with this email already exists" in response.content.decode()
    assert User.objects.count() == 1
    assert Organization.objects.count() == 0


# --- log-in, log-out ------------------------------------------------------------------------


def _login(client: Client, email: str, password: str, address: str = "10.1.1.1") -> int:
    response = client.post(
        "/console/login/", {"username": email, "password": password}, REMOTE_ADDR=address
    )
    return response.status_code


def test_login_and_logout() -> None:
    user = UserFactory(email="grace@example.com")
    client = Client()
    assert _login(client, "grace@example.com", PASSWORD) == 302
    assert client.session["_auth_user_id"] == str(user.pk)
    assert client.get("/console/logout/").status_code == 405  # log-out is a POST (CSRF)
    response = client.post("/console/logout/")
    assert response.status_code == 302
    assert response["Location"] == "/console/login/"
    assert "_auth_user_id" not in client.session


def test_wrong_password_is_a_400_with_a_clear_message() -> None:
    UserFactory(email="grace@example.com")
    client = Client()
    response = client.post("/console/login/", {"username": "grace@example.com", "password": "x"})
    assert response.status_code == 400
    assert "Please enter a correct email and password" in response.content.decode()
    assert "_auth_user_id" not in client.session


@override_settings(MANTLE_LOGIN_MAX_FAILURES_PER_EMAIL=3, MANTLE_LOGIN_FAILURE_WINDOW_S=600)
def test_failed_logins_per_email_lock_the_email_even_for_the_right_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    UserFactory(email="grace@example.com")
    client = Client()
    for attempt in range(3):
        assert _login(client, "grace@example.com", f"guess {attempt}", f"10.0.0.{attempt}") == 400
    response = client.post(
        "/console/login/",
        {"username": "GRACE@example.com", "password": PASSWORD},
        REMOTE_ADDR="10.9.9.9",
    )
    assert response.status_code == 429
    assert (
        "Too many failed log-ins for this email address. Try again in 10 minutes"
        in response.content.decode()
    )
    assert "_auth_user_id" not in client.session
    assert "guess 0" not in caplog.text and PASSWORD not in caplog.text
    assert "failed log-in for grace@example.com from 10.0.0.0" in caplog.text
    # Another account from the same addresses is unaffected.
    UserFactory(email="alan@example.com")
    assert _login(Client(), "alan@example.com", PASSWORD, "10.0.0.1") == 302


@override_settings(MANTLE_LOGIN_MAX_FAILURES_PER_EMAIL=100, MANTLE_LOGIN_MAX_FAILURES_PER_ADDRESS=4)
def test_failed_logins_per_address_lock_the_address() -> None:
    UserFactory(email="grace@example.com")
    for n in range(4):
        assert _login(Client(), f"user{n}@example.com", "nope", "203.0.113.7") == 400
    client = Client()
    response = client.post(
        "/console/login/",
        {"username": "grace@example.com", "password": PASSWORD},
        REMOTE_ADDR="203.0.113.7",
    )
    assert response.status_code == 429
    assert "Too many failed log-ins for your network address" in response.content.decode()
    assert _login(Client(), "grace@example.com", PASSWORD, "203.0.113.8") == 302


@override_settings(MANTLE_LOGIN_MAX_FAILURES_PER_EMAIL=3)
def test_a_successful_login_clears_the_emails_count() -> None:
    UserFactory(email="grace@example.com")
    client = Client()
    assert _login(client, "grace@example.com", "wrong") == 400
    assert _login(client, "grace@example.com", "wrong") == 400
    assert _login(client, "grace@example.com", PASSWORD) == 302
    assert get_redis().get(throttle.email_key("grace@example.com")) is None
    assert get_redis().get(throttle.address_key("10.1.1.1")) == "2"


@override_settings(MANTLE_LOGIN_FAILURE_WINDOW_S=600)
def test_the_window_starts_at_the_first_failure() -> None:
    throttle.login_failure_record(email="a@example.com", address="10.0.0.1")
    get_redis().expire(throttle.email_key("a@example.com"), 30)
    throttle.login_failure_record(email="a@example.com", address="10.0.0.1")
    assert 0 < get_redis().ttl(throttle.email_key("a@example.com")) <= 30


# --- password reset ---------------------------------------------------------------------------


def _reset_link() -> str:
    assert len(mail.outbox) == 1
    found = re.search(r"http://testserver(/console/reset/\S+/)", mail.outbox[0].body)
    assert found is not None
    return found.group(1)


def test_password_reset_sets_a_new_password() -> None:
    user = UserFactory(email="grace@example.com")
    client = Client()
    response = client.post("/console/password-reset/", {"email": "grace@example.com"})
    assert response["Location"] == "/console/password-reset/sent/"
    assert mail.outbox[0].to == ["grace@example.com"]
    assert mail.outbox[0].subject == "Set your Mantle password"
    form_url = client.get(_reset_link())["Location"]  # Django moves the token to the session
    new = "a brand new passphrase 7"
    response = client.post(form_url, {"new_password1": new, "new_password2": new})
    assert response["Location"] == "/console/reset/done/"
    user.refresh_from_db()
    assert user.check_password(new)


def test_password_reset_reaches_an_invited_person_without_a_password() -> None:
    org = OrganizationFactory()
    services.member_invite(principal=SYSTEM, org=org, email="new@example.com", role=Role.VIEWER)
    invited = User.objects.get(email="new@example.com")
    assert not invited.has_usable_password()
    mail.outbox.clear()
    client = Client()
    client.post("/console/password-reset/", {"email": "new@example.com"})
    form_url = client.get(_reset_link())["Location"]
    chosen = "first passphrase 9"
    client.post(form_url, {"new_password1": chosen, "new_password2": chosen})
    invited.refresh_from_db()
    assert invited.check_password("first passphrase 9")


def test_password_reset_for_an_unknown_email_sends_nothing_and_says_the_same() -> None:
    response = Client().post("/console/password-reset/", {"email": "nobody@example.com"})
    assert response["Location"] == "/console/password-reset/sent/"
    assert mail.outbox == []
