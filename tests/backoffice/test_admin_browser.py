"""The back office in a real browser on the real ASGI server: main pages, an action, the CSV."""

from __future__ import annotations

import time
from base64 import b32decode
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone
from django_otp.oath import TOTP
from playwright.sync_api import Page, expect

from accounts.models import Organization
from billing import staff_roles as roles
from billing.metering.lag import DRAIN_LAG_SAMPLES
from billing.periods import hour_start
from core.redis import get_redis
from tests.backoffice.support import (
    authenticator,
    invoice_in,
    last_month,
    staff_user,
    totp_code,
    verified_login_as,
    wrong_code,
)
from tests.billing.factories import EMBED, GrantFactory, price_book, usage
from tests.factories import OrganizationFactory, make_api_key
from tests.support.browser import (  # noqa: F401
    AppServer,
    app_server,
    browser,
    browser_context,
    login_as,
    page,
    screenshot,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.browser]

AREA = "backoffice"


def populate() -> tuple[Organization, str]:
    """A month of traffic for three customers, an invoice in each state."""
    invoice = invoice_in("finalized")
    org = invoice.organization
    org.name = "Acme Corp"
    org.save(update_fields=["name"])
    make_api_key(org)
    price_book(EMBED, "0.1", "0")
    now = hour_start(timezone.now())
    others = [OrganizationFactory(name=n) for n in ("Globex", "Initech")]
    for day in range(20):
        at = now - timedelta(days=day)
        usage(org, at, input_tokens=200_000 + 9_000 * day, output_tokens=60_000)
        usage(org, at, model=EMBED, input_tokens=500_000, project_id=None)
        usage(others[0], at, input_tokens=120_000, output_tokens=30_000 + 1_000 * day)
        usage(others[1], at, input_tokens=40_000, output_tokens=5_000)
    GrantFactory(
        organization=org, kind="promotional", amount=Decimal("50.00"), reason="launch promo"
    )
    invoice_in("paid")
    invoice_in("draft")
    # An hour of drain-lag samples as beat would have recorded them.
    get_redis().delete(DRAIN_LAG_SAMPLES)
    base = time.time() - 3600
    for minute in range(60):
        lag = 0.4 + (minute % 17) * 0.05 + (6.0 if 30 <= minute < 34 else 0.0)
        get_redis().lpush(DRAIN_LAG_SAMPLES, f"{base + 60 * minute:.0f}:{lag:.3f}")
    return org, invoice.id


def range_query(org: Organization) -> str:
    """The 25 days that hold every row populate() wrote (this month may be younger)."""
    now = hour_start(timezone.now())
    start = (now - timedelta(days=25)).strftime("%Y-%m-%dT%H:%M")
    end = (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    return f"?org={org.id}&start={start}&end={end}"


def test_main_pages(page: Page, app_server: AppServer) -> None:  # noqa: F811
    org, invoice_id = populate()
    admin = staff_user(roles.BILLING_ADMIN, email="ops@mantle.example", full_name="Olga Ops")
    verified_login_as(page, admin, app_server)

    page.goto(reverse("admin:index"))
    expect(page.locator("#chart-tokens")).to_be_visible()
    # Every chart drawn, with the days and the customers on its axes.
    labels = page.evaluate(
        "() => ['chart-tokens', 'chart-revenue', 'chart-models', 'chart-customers']"
        ".map(id => Chart.getChart(id).data.labels.length)"
    )
    assert labels[0] == labels[1] >= 30
    # Two models; the three customers of populate(), and the two billed ones while their
    # usage (the 4th of last month, invoice_in) is within the dashboard's 30 days, which
    # start at midnight of the day 30 days before the hour after now (early in a month).
    end = timezone.now().replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    in_window = last_month() + timedelta(days=3, hours=5) >= (end - timedelta(days=30)).replace(
        hour=0
    )
    assert labels[2:] == [2, 5 if in_window else 3]
    screenshot(page, "dashboard", AREA)

    page.goto(reverse("admin:backoffice-customer", args=[org.id]))
    expect(page.get_by_text("Acme Corp").first).to_be_visible()
    expect(page.get_by_test_id("org-status")).to_have_text("active")
    screenshot(page, "customer", AREA)

    page.goto(reverse("admin:backoffice-invoice", args=[invoice_id]))
    expect(page.get_by_test_id("invoice-status")).to_have_text("finalized")
    screenshot(page, "invoice", AREA)

    page.goto(reverse("admin:billing_invoice_changelist"))
    screenshot(page, "invoices", AREA)

    page.goto(reverse("admin:billing_price_changelist"))
    screenshot(page, "price-book", AREA)

    page.goto(reverse("admin:backoffice-usage") + range_query(org))
    expect(page.get_by_test_id("total-requests")).to_have_text("40")
    screenshot(page, "usage-explorer", AREA)


def test_an_action_through_the_browser_with_csrf(page: Page, app_server: AppServer) -> None:  # noqa: F811
    org, invoice_id = populate()
    verified_login_as(page, staff_user(roles.BILLING_ADMIN), app_server)

    page.goto(reverse("admin:backoffice-invoice", args=[invoice_id]))
    page.get_by_role("link", name="Mark paid (bank transfer)").click()
    page.get_by_label("Payment reference").fill("BANK-2026-118")
    page.get_by_label("Reason").fill("received on the 3rd")
    screenshot(page, "mark-paid-form", AREA)
    page.get_by_role("button", name="Confirm").click()

    expect(page.get_by_test_id("invoice-status")).to_have_text("paid")
    expect(page.get_by_text("marked paid (BANK-2026-118)")).to_be_visible()
    screenshot(page, "invoice-paid", AREA)

    page.goto(reverse("admin:backoffice-customer", args=[org.id]))
    page.get_by_label("Reason").fill("chargeback under review")
    page.get_by_role("button", name="Suspend Acme Corp").click()
    expect(page.get_by_test_id("org-status")).to_have_text("suspended")
    assert Organization.objects.get(pk=org.pk).status == "suspended"


def test_the_csv_streams_from_the_real_server(page: Page, app_server: AppServer) -> None:  # noqa: F811
    org, _ = populate()
    verified_login_as(page, staff_user(roles.SUPPORT), app_server)

    response = page.request.get(reverse("admin:backoffice-usage-csv") + range_query(org))

    assert response.status == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    lines = response.text().splitlines()
    assert lines[0].startswith("hour,organization_id,")
    assert len(lines) == 1 + 40  # 20 days, two models
    assert all(f",{org.id}," in line for line in lines[1:])


def test_support_sees_no_buttons(page: Page, app_server: AppServer) -> None:  # noqa: F811
    _, invoice_id = populate()
    verified_login_as(page, staff_user(roles.SUPPORT), app_server)

    page.goto(reverse("admin:backoffice-invoice", args=[invoice_id]))
    expect(page.get_by_role("link", name="Void")).to_have_count(0)
    screenshot(page, "invoice-support", AREA)
    forbidden = page.goto(reverse("admin:backoffice-invoice-action", args=[invoice_id, "void"]))
    assert forbidden is not None and forbidden.status == 403


def test_a_customer_is_sent_to_the_login(page: Page, app_server: AppServer) -> None:  # noqa: F811
    org, _ = populate()
    owner = org.memberships.get(role="owner").user
    login_as(page, owner, app_server)

    page.goto(reverse("admin:index"))

    assert page.url.startswith(f"{app_server.url}{reverse('admin:login')}")
    screenshot(page, "login-refused", AREA)


def sign_in_with_password(tab: Page, email: str, password: str) -> None:
    tab.goto(reverse("admin:login"))
    tab.locator("input[name=username]").fill(email)
    tab.locator("input[name=password]").fill(password)
    tab.locator("input[name=password]").press("Enter")


def test_staff_log_in_through_the_form(page: Page, app_server: AppServer) -> None:  # noqa: F811
    """First sign-in: password, then enrolment (QR code, first code), recovery codes."""
    staff_user(roles.SUPPORT, email="help@mantle.example", password="s3cret-enough-pass")

    page.goto(reverse("admin:login"))
    page.locator("input[name=username]").fill("help@mantle.example")
    page.locator("input[name=password]").fill("s3cret-enough-pass")
    screenshot(page, "login", AREA)
    page.locator("input[name=password]").press("Enter")

    expect(page.get_by_test_id("two-factor-qr").locator("svg")).to_be_visible()
    assert page.url.startswith(f"{app_server.url}{reverse('admin:backoffice-two-factor-enrol')}")
    screenshot(page, "two-factor-enrol", AREA)
    secret = page.get_by_test_id("two-factor-secret").inner_text().replace(" ", "")
    page.get_by_label("Code").fill(f"{TOTP(b32decode(secret)).token():06d}")
    page.get_by_role("button", name="Confirm").click()
    expect(page.get_by_test_id("recovery-codes").locator("li")).to_have_count(10)
    screenshot(page, "two-factor-recovery-codes", AREA)
    page.get_by_role("link", name="I have stored them: continue").click()

    expect(page.locator("#chart-tokens")).to_be_visible()
    assert page.url == f"{app_server.url}{reverse('admin:index')}"


def test_enrolled_staff_sign_in_with_a_code(page: Page, app_server: AppServer) -> None:  # noqa: F811
    password = "s3cret-enough-pass"
    user = staff_user(roles.BILLING_ADMIN, email="ops@mantle.example", password=password)
    device = authenticator(user)

    sign_in_with_password(page, "ops@mantle.example", password)
    page.get_by_label("Code").fill(wrong_code(device))
    page.get_by_role("button", name="Verify").click()
    expect(page.get_by_text("That code is not valid")).to_be_visible()
    screenshot(page, "two-factor-wrong-code", AREA)
    # A wrong code backs the device off for a second; the next code is tried after it.
    page.wait_for_timeout(1100)
    page.get_by_label("Code").fill(totp_code(device))
    page.get_by_role("button", name="Verify").click()

    expect(page.locator("#chart-tokens")).to_be_visible()
    assert page.url == f"{app_server.url}{reverse('admin:index')}"
