"""Staff's second factor: no admin page without a TOTP or recovery code, each code used once."""

from __future__ import annotations

import re
from base64 import b32decode
from io import StringIO
from typing import Any

import pytest
from django.contrib import admin
from django.core.management import call_command
from django.test import Client
from django.urls import NoReverseMatch, URLPattern, URLResolver, reverse
from django_otp import DEVICE_ID_SESSION_KEY
from django_otp.oath import TOTP
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import AuditLog, User
from billing import staff_roles as roles
from tests.backoffice.support import (
    Staff,
    authenticator,
    client_for,
    staff_user,
    totp_code,
    wrong_code,
)
from tests.backoffice.test_admin_permissions import (  # noqa: F401
    World,
    actions,
    is_login_redirect,
    pages,
    state,
    world,
)

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery"  # tests.factories.UserFactory's
VERIFY = "admin:backoffice-two-factor-verify"
ENROL = "admin:backoffice-two-factor-enrol"
ROLES = ["billing_admin", "support", "superuser", "no_role"]


def password_only(user: User) -> Client:
    """A client that passed the password step (through the real form) and nothing more."""
    client = Client()
    response = client.post(
        f"{reverse('admin:login')}?next=/admin/", {"username": user.email, "password": PASSWORD}
    )
    assert response.status_code == 302, response.content.decode()[:500]
    return client


def is_verified(client: Client) -> bool:
    return client.get(reverse("admin:index")).status_code == 200


def every_admin_url(w: World) -> list[str]:
    """Every named URL of the admin site, with sample arguments; the sign-in pages aside."""
    samples: dict[str, Any] = {
        "object_id": str(w.org.pk),
        "org_id": w.org.id,
        "invoice_id": w.finalized.id,
        "action": "finalize",
        "override_id": w.override.id,
        "content_type_id": 1,
        "app_label": "billing",
    }
    open_names = {"login", "backoffice-two-factor-verify", "backoffice-two-factor-enrol"}
    open_names |= {"backoffice-two-factor-cancel"}
    names: list[tuple[str, list[str]]] = []

    def walk(patterns: list[Any]) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns)
            elif isinstance(p, URLPattern) and p.name and p.name not in open_names:
                names.append((p.name, list(p.pattern.regex.groupindex)))

    walk(admin.site.get_urls())
    urls = []
    for name, params in names:
        try:
            urls.append(reverse(f"admin:{name}", kwargs={k: samples[k] for k in params}))
        except (KeyError, NoReverseMatch):
            continue
    return urls


# --- The gate ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_a_staff_session_without_the_second_factor_reaches_no_admin_page(
    staff: Staff,
    world: World,  # noqa: F811
    role: str,
) -> None:
    user = getattr(staff, role)
    authenticator(user)
    client = client_for(user, verified=False)
    urls = every_admin_url(world)
    assert len(urls) > 60  # every model's list, add, change, delete, history; own pages
    assert set(pages(world)) <= set(urls)

    for url in urls:
        response = client.get(url)
        assert response.status_code == 302, url
        # admin_view sends every page to the log-in (the log-out page to the index).
        assert is_login_redirect(response, url) or response["Location"] == "/admin/", url

    before = state(world)
    for url, data in actions(world):
        assert is_login_redirect(client.post(url, data), url)
    assert state(world) == before

    # The log-in page knows the password was given, and asks for the code.
    login = client.get(f"{reverse('admin:login')}?next=/admin/billing/invoice/")
    assert login.status_code == 302
    assert login["Location"] == f"{reverse(VERIFY)}?next=%2Fadmin%2Fbilling%2Finvoice%2F"


@pytest.mark.parametrize("who", ["customer", "anonymous"])
def test_the_second_step_is_only_for_staff_who_gave_their_password(staff: Staff, who: str) -> None:
    client = client_for(staff.customer if who == "customer" else None)
    for name in (VERIFY, ENROL):
        response = client.get(reverse(name))
        assert response.status_code == 302
        assert response["Location"].startswith(f"{reverse('admin:login')}?next=")
        assert client.post(reverse(name), {"code": "123456"}).status_code == 302
    assert not TOTPDevice.objects.exists()


def test_the_password_form_leads_to_the_code_then_the_admin(staff: Staff) -> None:
    device = authenticator(staff.billing_admin)
    client = password_only(staff.billing_admin)
    assert DEVICE_ID_SESSION_KEY not in client.session
    session_before = client.session.session_key

    page = client.get("/admin/", follow=True)
    assert page.redirect_chain[-1][0] == f"{reverse(VERIFY)}?next=%2Fadmin%2F"
    assert "authenticator app" in page.content.decode()

    response = client.post(
        reverse(VERIFY), {"code": totp_code(device), "next": "/admin/billing/invoice/"}
    )

    assert response.status_code == 302
    assert response["Location"] == "/admin/billing/invoice/"
    assert client.session.session_key != session_before  # a new session key with the power
    assert client.get("/admin/billing/invoice/").status_code == 200


def test_after_the_code_only_admin_pages_of_this_site_are_a_destination(staff: Staff) -> None:
    device = authenticator(staff.support)
    client = password_only(staff.support)
    response = client.post(
        reverse(VERIFY), {"code": totp_code(device), "next": "https://evil.example/admin/"}
    )
    assert response["Location"] == reverse("admin:index")


# --- Codes -----------------------------------------------------------------------------------


def test_a_wrong_code_is_refused_and_backs_off(staff: Staff) -> None:
    device = authenticator(staff.billing_admin)
    client = password_only(staff.billing_admin)

    wrong = client.post(reverse(VERIFY), {"code": wrong_code(device)})
    malformed = client.post(reverse(VERIFY), {"code": "12ab56"})

    assert wrong.status_code == 400
    assert "not valid" in wrong.content.decode()
    assert malformed.status_code == 400
    assert not is_verified(client)
    device.refresh_from_db()
    assert device.throttling_failure_count == 1
    # While it backs off, even the right code is refused (guessing gets slower each time).
    backing_off = client.post(reverse(VERIFY), {"code": totp_code(device)})
    assert backing_off.status_code == 429
    assert "Too many wrong codes" in backing_off.content.decode()
    assert not is_verified(client)


def test_a_totp_code_works_once(staff: Staff) -> None:
    device = authenticator(staff.billing_admin)
    code = totp_code(device)
    first = password_only(staff.billing_admin)
    assert first.post(reverse(VERIFY), {"code": code}).status_code == 302
    assert is_verified(first)

    # The same code, replayed from another session (seen over a shoulder, in a log).
    second = password_only(staff.billing_admin)
    replay = second.post(reverse(VERIFY), {"code": code})

    assert replay.status_code == 400
    assert not is_verified(second)


def enrol(client: Client) -> tuple[TOTPDevice, list[str]]:
    """Goes through the enrolment page as a person would; returns the device and codes."""
    page = client.get(reverse(ENROL))
    assert page.status_code == 200
    secret = page.context["secret"].replace(" ", "")
    assert page.context["uri"].startswith("otpauth://totp/Mantle%20back%20office%3A")
    assert f"secret={secret}" in page.context["uri"]
    assert "<svg" in page.content.decode()
    code = f"{TOTP(b32decode(secret)).token():06d}"
    done = client.post(reverse(ENROL), {"code": code})
    assert done.status_code == 200, done.content.decode()[:2000]
    assert done["Cache-Control"].startswith("max-age=0")
    device = TOTPDevice.objects.get(confirmed=True, key=b32decode(secret).hex())
    return device, list(done.context["codes"])


def test_staff_without_an_authenticator_enrol_before_any_page(staff: Staff) -> None:
    client = password_only(staff.support)
    page = client.get("/admin/", follow=True)
    assert page.redirect_chain[-1][0] == f"{reverse(ENROL)}?next=%2Fadmin%2F"

    device, codes = enrol(client)

    assert device.user_id == staff.support.id
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(re.fullmatch(r"[a-z2-7]{5}-[a-z2-7]{5}", c) for c in codes)
    assert is_verified(client)
    entry = AuditLog.objects.get(action="staff.two_factor_enrolled")
    assert (entry.actor_user_id, entry.target_id) == (staff.support.id, str(staff.support.id))
    # Enrolled: the page now sends to the code, and never shows a secret again.
    assert client.get(reverse(ENROL))["Location"].startswith(reverse(VERIFY))
    assert TOTPDevice.objects.filter(user=staff.support).count() == 1


def test_each_visit_of_the_enrolment_page_shows_a_new_secret(staff: Staff) -> None:
    client = password_only(staff.support)
    first = client.get(reverse(ENROL)).context["secret"].replace(" ", "")
    second = client.get(reverse(ENROL)).context["secret"].replace(" ", "")
    assert first != second
    stale = client.post(reverse(ENROL), {"code": f"{TOTP(b32decode(first)).token():06d}"})
    assert stale.status_code == 400
    assert not TOTPDevice.objects.filter(user=staff.support, confirmed=True).exists()
    assert TOTPDevice.objects.filter(user=staff.support).count() == 1


def test_a_recovery_code_works_once(staff: Staff) -> None:
    _, codes = enrol(password_only(staff.billing_admin))

    with_code = password_only(staff.billing_admin)
    assert with_code.post(reverse(VERIFY), {"code": codes[0]}).status_code == 302
    assert is_verified(with_code)
    # Typed by hand: upper case, spaces instead of the dash.
    other = password_only(staff.billing_admin)
    typed = codes[1].upper().replace("-", " ")
    assert other.post(reverse(VERIFY), {"code": typed}).status_code == 302
    assert is_verified(other)

    again = password_only(staff.billing_admin)
    assert again.post(reverse(VERIFY), {"code": codes[0]}).status_code == 400
    assert not is_verified(again)
    assert StaticToken.objects.filter(device__user=staff.billing_admin).count() == 8
    used = AuditLog.objects.filter(action="staff.recovery_code_used").order_by("id")
    assert [e.metadata["recovery_codes_left"] for e in used] == [9, 8]


# --- Reset -----------------------------------------------------------------------------------


def test_the_reset_command_ends_verified_sessions_and_asks_to_enrol_again(
    staff: Staff,
) -> None:
    client = client_for(staff.billing_admin)
    StaticDevice.objects.create(user=staff.billing_admin, name="recovery codes")
    assert is_verified(client)

    out = StringIO()
    call_command("backoffice_two_factor_reset", staff.billing_admin.email, stdout=out)

    assert "2 two-factor device(s) removed" in out.getvalue()
    assert not TOTPDevice.objects.filter(user=staff.billing_admin).exists()
    assert not StaticDevice.objects.filter(user=staff.billing_admin).exists()
    response = client.get("/admin/", follow=True)
    assert response.redirect_chain[-1][0] == f"{reverse(ENROL)}?next=%2Fadmin%2F"
    assert AuditLog.objects.filter(action="staff.two_factor_reset").count() == 1


def test_only_superusers_reset_someone_elses_devices_from_the_admin(staff: Staff) -> None:
    target = staff_user(roles.SUPPORT)
    authenticator(target)
    data = {"action": "reset_two_factor", "_selected_action": [str(target.pk)]}
    url = reverse("admin:accounts_user_changelist")

    client_for(staff.billing_admin).post(url, data)
    assert TOTPDevice.objects.filter(user=target).exists()

    response = client_for(staff.superuser).post(url, data)

    assert response.status_code == 302
    assert not TOTPDevice.objects.filter(user=target).exists()
    entry = AuditLog.objects.get(action="staff.two_factor_reset")
    assert (entry.actor_user_id, entry.target_id) == (staff.superuser.id, str(target.id))


def test_signing_out_from_the_second_step(staff: Staff) -> None:
    authenticator(staff.support)
    client = password_only(staff.support)
    response = client.post(reverse("admin:backoffice-two-factor-cancel"))
    assert response["Location"] == reverse("admin:login")
    assert "_auth_user_id" not in client.session
