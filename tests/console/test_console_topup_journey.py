"""A top-up in a real browser against the real server and the fake Stripe in that server:
sign in, ask for an amount, pay on the fake's hosted Checkout page (a declined card first,
then one that pays), come back, and see the credit and its receipt once Stripe's signed
webhook (POSTed by the fake to the server's own endpoint) has arrived, never before."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from accounts.permissions import Role
from billing.models import BillingAccount, CreditLedgerEntry, StripeEvent, TopUp
from tests.conftest import OrgWorld
from tests.support.browser import AppServer, login_as, screenshot
from tests.support.stack import Stack, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.browser]

AREA = "console"
WEBHOOK_SECRET = "whsec_journey_secret"


@pytest.fixture(scope="module")
def app_server(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AppServer]:
    """This module's own server, with the fake Stripe as its backend: the fake's hosted
    pages are the server's /billing/stripe/fake-checkout/, and it delivers its events to
    the server's webhook, signed, as Stripe would."""
    stack = Stack.for_tests()
    stack.env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    email_dir = tmp_path_factory.mktemp("topup-app-emails")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        process = stack.start_gateway(
            "topup-app-server",
            port=port,
            env={
                "MANTLE_TEST_EMAIL_DIR": str(email_dir),
                "MANTLE_STRIPE_BACKEND": "fake",
                "STRIPE_API_KEY": "",
                "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "MANTLE_STRIPE_FAKE_CHECKOUT_URL": f"{url}/billing/stripe/fake-checkout/",
                "MANTLE_STRIPE_FAKE_WEBHOOK_URL": f"{url}/billing/stripe/webhook",
            },
        )
        stack.wait_serving(process)
        yield AppServer(stack=stack, process=process, url=url, email_dir=email_dir)
    finally:
        stack.stop_all()


def reload_until(page: Page, selector: str, text: str, *, within_s: float = 60) -> None:
    """Reloads until `selector` shows `text`: the webhook arrives a moment after the
    customer is back, as with Stripe (a bound for a loaded machine, not a timing check)."""
    deadline = time.monotonic() + within_s
    while text not in page.locator(selector).inner_text() and time.monotonic() < deadline:
        time.sleep(0.5)
        page.reload()
    expect(page.locator(selector)).to_contain_text(text)


def test_top_up_through_checkout_is_credited_when_the_webhook_arrives(
    page: Page, app_server: AppServer, world: OrgWorld
) -> None:
    BillingAccount.objects.create(organization=world.org, mode=BillingAccount.Mode.PREPAID)
    login_as(page, world.users[Role.BILLING], app_server)
    page.goto(f"/console/o/{world.org.id}/billing/")
    page.get_by_role("link", name="Top up").click()
    expect(page.locator("h1")).to_have_text("Top up")

    page.fill("#id_amount", "2.00")
    page.get_by_role("button", name="Top up").click()
    expect(page.locator("#topup-form")).to_contain_text(
        "amount must be between 5.00 and 10000.00 USD"
    )

    page.fill("#id_amount", "25.00")
    page.get_by_role("button", name="Top up").click()
    # Stripe's hosted page (the fake's, served by the same server).
    expect(page.locator("h1")).to_have_text("Pay 25.00 USD")
    assert "/billing/stripe/fake-checkout/cs_test_" in page.url
    page.select_option("#card", "pm_card_chargeDeclined")
    page.get_by_role("button", name="Pay").click()
    expect(page.locator("#error")).to_contain_text("declined (generic_decline)")
    screenshot(page, "topup-checkout-declined", AREA)
    topup = TopUp.objects.get(organization=world.org)
    assert topup.status == "pending"

    page.select_option("#card", "pm_card_visa")
    page.get_by_role("button", name="Pay").click()
    # Back in the console, on the session's return URL.
    expect(page.locator("h1")).to_have_text("Top up")
    assert f"checkout={topup.stripe_checkout_session_id}" in page.url
    expect(page.locator("#checkout-return")).to_be_visible()

    reload_until(page, "#topups", "paid")
    expect(page.locator("#checkout-return")).to_contain_text(
        "Your payment of 25.00 USD was received and credited"
    )
    expect(page.locator("#credit-balance")).to_contain_text("25.00 USD")
    receipt = page.get_by_role("link", name="Receipt")
    topup.refresh_from_db()
    assert receipt.get_attribute("href") == topup.receipt_url
    assert topup.receipt_url.startswith("https://pay.stripe.com/receipts/")
    screenshot(page, "topup-paid", AREA)

    (entry,) = CreditLedgerEntry.objects.filter(organization=world.org)
    assert (entry.kind, entry.amount, entry.reference) == (
        "prepaid_purchase",
        Decimal("25.00"),
        topup.id,
    )
    completed = StripeEvent.objects.get(type="checkout.session.completed")
    assert completed.processed_at is not None
    assert completed.payload["data"]["object"]["metadata"]["mantle_topup_id"] == topup.id
    page.goto(f"/console/o/{world.org.id}/billing/")
    expect(page.locator("#credit-balance")).to_contain_text("25.00")
