"""MFA in a real browser against the real server: enrol from the account page (QR code,
the secret typed into a TOTP computed by django-otp), then sign in with the second step."""

from __future__ import annotations

import re
import time
from base64 import b32decode

import pytest
from django_otp.oath import TOTP
from playwright.sync_api import Page, expect

from accounts.permissions import Role
from tests.factories import OrganizationFactory, UserFactory
from tests.support.browser import AppServer, screenshot

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.browser]

AREA = "console"
PASSWORD = "correct horse battery"


def code(secret: str, steps_ahead: int = 0) -> str:
    otp = TOTP(b32decode(secret.replace(" ", "")))
    otp.time = time.time() + steps_ahead * 30
    return f"{otp.token():06d}"


def password_step(page: Page, email: str) -> None:
    page.goto("/console/login/")
    page.fill("#id_username", email)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")


def test_enrol_then_sign_in_with_a_code(page: Page, app_server: AppServer) -> None:
    owner = UserFactory(email="mfa-journey@example.com")
    org = OrganizationFactory(name="Journey Co", owner=owner)
    assert org.memberships.get(user=owner).role == Role.OWNER
    password_step(page, owner.email)
    page.goto("/console/account/")
    page.get_by_role("link", name="Set up an authenticator").click()
    expect(page.get_by_test_id("qr").locator("svg")).to_be_visible()
    secret = page.get_by_test_id("secret").inner_text()
    screenshot(page, "mfa-enrol", AREA)
    page.fill("#id_code", code(secret))
    page.click("button[type=submit]")
    expect(page.get_by_test_id("recovery-codes").locator("li")).to_have_count(10)
    screenshot(page, "mfa-recovery-codes", AREA)

    page.get_by_role("button", name="Log out").click()
    password_step(page, owner.email)
    expect(page).to_have_url(re.compile(r"/console/login/code/"))
    page.fill("#id_code", code(secret, steps_ahead=1))
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(rf"/console/o/{org.id}/"))
    page.goto(f"/console/o/{org.id}/audit/")
    expect(page.locator("table")).to_contain_text("organization.created")
    screenshot(page, "audit-log", AREA)
