"""Sign-up by email link, log-in with throttling, log-out, password reset (emails in the outbox)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.test import Client, override_settings
from django.utils import timezone

from accounts import throttle
from accounts.models import Membership, Organization, PendingSignup, Project, User
from accounts.permissions import Role
from core.redis import get_redis
from tests.console.support import org_url
from tests.factories import UserFactory

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

CONFIRM_LINK = re.compile(r"https?://[^/\s]+(/console/signup/confirm/[^/\s]+/)")


def _signup(client: Client, capture: Any, address: str = "10.2.2.2", **change: str) -> Any:
    with capture(execute=True):
        return client.post("/console/signup/", {**SIGNUP, **change}, REMOTE_ADDR=address)


def _confirm_link(message: mail.EmailMessage) -> str:
    found = CONFIRM_LINK.search(str(message.body))
    assert found is not None, message.body
    return found.group(1)


def test_signup_mails_a_link_and_creates_the_account_only_when_it_is_followed(
    django_capture_on_commit_callbacks: Any,
) -> None:
    client = Client()
    response = _signup(client, django_capture_on_commit_callbacks)
    assert response.status_code == 302
    assert response["Location"] == "/console/signup/sent/"
    assert "Check your email" in client.get("/console/signup/sent/").content.decode()
    # Nothing exists yet, and nobody is signed in.
    assert (User.objects.count(), Organization.objects.count()) == (0, 0)
    assert "_auth_user_id" not in client.session
    assert _login(Client(), "ada@example.com", SIGNUP["password"]) == 400
    assert [m.to for m in mail.outbox] == [["ada@example.com"]]
    assert mail.outbox[0].subject == "Confirm your email address for Mantle"
    link = _confirm_link(mail.outbox[0])
    # Opening the link (as a mail scanner would) uses nothing up; the button does.
    assert client.get(link).status_code == 200
    assert User.objects.count() == 0
    response = client.post(link)
    user = User.objects.get(email="ada@example.com")
    org = Organization.objects.get(memberships__user=user)
    assert response.status_code == 302
    assert response["Location"] == org_url("console-quickstart", org.id)
    assert (user.full_name, user.check_password(SIGNUP["password"])) == ("Ada Lovelace", True)
    assert user.email_verified
    assert org.name == "Analytical Engines"
    assert Membership.objects.get(organization=org).role == Role.OWNER
    assert list(Project.objects.filter(organization=org).values_list("name", "is_default")) == [
        ("Default project", True)
    ]
    assert client.get(org_url("console-quickstart", org.id)).status_code == 200
    assert PendingSignup.objects.count() == 0


def test_a_signup_link_works_once(django_capture_on_commit_callbacks: Any) -> None:
    _signup(Client(), django_capture_on_commit_callbacks)
    link = _confirm_link(mail.outbox[0])
    assert Client().post(link).status_code == 302
    again = Client().post(link)
    assert again.status_code == 404
    assert "it was used or it expired" in again.content.decode()
    assert (User.objects.count(), Organization.objects.count()) == (1, 1)


@pytest.mark.parametrize("spoil", ["expired", "tampered"])
def test_an_expired_or_tampered_signup_link_creates_nothing(
    django_capture_on_commit_callbacks: Any, spoil: str
) -> None:
    _signup(Client(), django_capture_on_commit_callbacks)
    link = _confirm_link(mail.outbox[0])
    if spoil == "expired":
        PendingSignup.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    else:
        token = link.rstrip("/").rsplit("/", 1)[1]
        link = link.replace(token, token[:-1] + ("A" if token[-1] != "A" else "B"))
    response = Client().post(link)
    assert response.status_code == 404
    assert (User.objects.count(), Organization.objects.count()) == (0, 0)


def test_signup_answers_the_same_for_a_registered_address(
    django_capture_on_commit_callbacks: Any,
) -> None:
    """The enumeration attack: the page must not tell a taken address from a free one."""
    UserFactory(email="ada@example.com")
    taken = _signup(Client(), django_capture_on_commit_callbacks, address="10.3.3.3")
    free = _signup(
        Client(), django_capture_on_commit_callbacks, address="10.3.3.4", email="bob@example.com"
    )
    assert (taken.status_code, taken["Location"]) == (free.status_code, free["Location"])
    assert taken.content == free.content
    # The registered address is told someone tried; no second account, no link.
    existing, new = mail.outbox
    assert existing.to == ["ada@example.com"]
    assert existing.subject == "Someone tried to sign up for Mantle with your address"
    assert "/console/signup/confirm/" not in str(existing.body)
    assert User.objects.filter(email="ada@example.com").get().check_password(PASSWORD)
    assert list(PendingSignup.objects.values_list("email", flat=True)) == ["bob@example.com"]
    assert new.to == ["bob@example.com"]


def test_someone_elses_pending_signup_does_not_keep_the_address(
    django_capture_on_commit_callbacks: Any,
) -> None:
    """An attacker signing up first with someone's address gets nothing: the account is
    the one whose link is followed, with that sign-up's password."""
    _signup(
        Client(),
        django_capture_on_commit_callbacks,
        password="attacker pass 1234",
        password_again="attacker pass 1234",
        organization_name="Evil",
    )
    _signup(Client(), django_capture_on_commit_callbacks, address="10.2.2.3")
    attackers_link, owners_link = (_confirm_link(m) for m in mail.outbox)
    assert Client().post(owners_link).status_code == 302
    user = User.objects.get(email="ada@example.com")
    assert user.check_password(SIGNUP["password"])
    assert not user.check_password("attacker pass 1234")
    assert Client().post(attackers_link).status_code == 404
    assert list(Organization.objects.values_list("name", flat=True)) == ["Analytical Engines"]


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
    assert PendingSignup.objects.count() == 0
    assert mail.outbox == []


@override_settings(MANTLE_SIGNUP_MAX_PER_EMAIL=2, MANTLE_SIGNUP_WINDOW_S=600)
@pytest.mark.parametrize("registered", [False, True])
def test_signups_per_email_are_throttled_alike_for_taken_and_free_addresses(
    django_capture_on_commit_callbacks: Any, registered: bool
) -> None:
    if registered:
        UserFactory(email="ada@example.com")
    for n in range(2):
        assert (
            _signup(Client(), django_capture_on_commit_callbacks, f"10.4.4.{n}").status_code == 302
        )
    response = _signup(Client(), django_capture_on_commit_callbacks, "10.4.4.9")
    assert response.status_code == 429
    assert "Too many sign-ups for this email address. Try again in 10 minutes" in (
        response.content.decode()
    )
    assert len(mail.outbox) == 2


@override_settings(MANTLE_SIGNUP_MAX_PER_ADDRESS=2)
def test_signups_per_client_address_are_throttled(django_capture_on_commit_callbacks: Any) -> None:
    for n in range(2):
        response = _signup(
            Client(), django_capture_on_commit_callbacks, "10.5.5.5", email=f"p{n}@example.com"
        )
        assert response.status_code == 302
    response = _signup(
        Client(), django_capture_on_commit_callbacks, "10.5.5.5", email="p9@example.com"
    )
    assert response.status_code == 429
    assert "Too many sign-ups for your network address" in response.content.decode()
    assert PendingSignup.objects.count() == 2


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


@override_settings(MANTLE_LOGIN_MAX_FAILURES_PER_PAIR=3, MANTLE_LOGIN_FAILURE_WINDOW_S=600)
def test_a_stranger_failing_logins_cannot_lock_the_owner_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lock-out attack: wrong passwords for someone else's email from the attacker's
    address refuse that address for that email, never the owner elsewhere."""
    user = UserFactory(email="grace@example.com")
    attacker = "203.0.113.66"
    for attempt in range(3):
        assert _login(Client(), "grace@example.com", f"guess {attempt}", attacker) == 400
    # From the attacker's address even the right password is refused, without a check.
    client = Client()
    response = client.post(
        "/console/login/",
        {"username": "GRACE@example.com", "password": PASSWORD},
        REMOTE_ADDR=attacker,
    )
    assert response.status_code == 429
    assert (
        "Too many failed log-ins for this email address from your network address. "
        "Try again in 10 minutes" in response.content.decode()
    )
    assert "_auth_user_id" not in client.session
    # The owner, from anywhere else, signs in at once.
    owner = Client()
    assert _login(owner, "grace@example.com", PASSWORD, "198.51.100.7") == 302
    assert owner.session["_auth_user_id"] == str(user.pk)
    assert "guess 0" not in caplog.text and PASSWORD not in caplog.text
    assert "failed log-in for grace@example.com from 203.0.113.66" in caplog.text
    # Another account from the attacker's address is unaffected by the pair's count.
    UserFactory(email="alan@example.com")
    assert _login(Client(), "alan@example.com", PASSWORD, attacker) == 302


@override_settings(MANTLE_LOGIN_MAX_FAILURES_PER_PAIR=100, MANTLE_LOGIN_MAX_FAILURES_PER_ADDRESS=4)
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


@override_settings(MANTLE_LOGIN_MAX_FAILURES_PER_PAIR=3)
def test_a_successful_login_clears_the_pairs_count() -> None:
    UserFactory(email="grace@example.com")
    client = Client()
    assert _login(client, "grace@example.com", "wrong") == 400
    assert _login(client, "grace@example.com", "wrong") == 400
    assert _login(client, "grace@example.com", PASSWORD) == 302
    assert get_redis().get(throttle.pair_key("grace@example.com", "10.1.1.1")) is None
    assert get_redis().get(throttle.address_key("10.1.1.1")) == "2"


@override_settings(MANTLE_LOGIN_ACCOUNT_WARNING=3)
def test_guessing_one_account_from_many_addresses_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    UserFactory(email="grace@example.com")
    for n in range(3):
        assert _login(Client(), "grace@example.com", "nope", f"192.0.2.{n}") == 400
    assert "3 failed log-ins for grace@example.com from many addresses" in caplog.text
    assert _login(Client(), "grace@example.com", PASSWORD, "192.0.2.200") == 302


@override_settings(MANTLE_LOGIN_FAILURE_WINDOW_S=600)
def test_the_window_starts_at_the_first_failure() -> None:
    key = throttle.pair_key("a@example.com", "10.0.0.1")
    throttle.login_failure_record(email="a@example.com", address="10.0.0.1")
    get_redis().expire(key, 30)
    throttle.login_failure_record(email="a@example.com", address="10.0.0.1")
    assert 0 < get_redis().ttl(key) <= 30


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


def test_password_reset_reaches_an_account_without_a_password_and_confirms_it() -> None:
    # Invitations once created such accounts (no usable password, address unconfirmed).
    invited = User.objects.create_user(email="new@example.com", password=None)
    assert not invited.has_usable_password() and not invited.email_verified
    client = Client()
    client.post("/console/password-reset/", {"email": "new@example.com"})
    form_url = client.get(_reset_link())["Location"]
    chosen = "first passphrase 9"
    client.post(form_url, {"new_password1": chosen, "new_password2": chosen})
    invited.refresh_from_db()
    assert invited.check_password("first passphrase 9")
    assert invited.email_verified  # the link was read in the mailbox


def test_password_reset_for_an_unknown_email_sends_nothing_and_says_the_same() -> None:
    response = Client().post("/console/password-reset/", {"email": "nobody@example.com"})
    assert response["Location"] == "/console/password-reset/sent/"
    assert mail.outbox == []
