"""The webhook delivery log in a real browser against the real server: add an endpoint (the
secret shown once), send a test event that the server delivers, signed, to a receiver on
loopback, and read the delivery log (a failing answer first, shown as pending, then a
delivered one)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from accounts.permissions import Role
from billing.models import WebhookEndpoint
from tests.conftest import OrgWorld
from tests.support.browser import AppServer, login_as, screenshot
from tests.support.stack import Stack
from tests.support.webhook_receiver import Receiver, verify_as_documented, webhook_receiver

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.browser]

AREA = "console"


@pytest.fixture(scope="module")
def app_server(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AppServer]:
    """This module's own server: its webhook allow-lists (never the providers') let it send
    webhooks over plain http to loopback (the receiver below), which the shared one may
    not."""
    stack = Stack.for_tests()
    stack.env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    email_dir = tmp_path_factory.mktemp("webhooks-app-emails")
    try:
        process, url = stack.gateway(
            name="webhooks-app-server",
            MANTLE_TEST_EMAIL_DIR=str(email_dir),
            MANTLE_WEBHOOK_ALLOWED_HTTP="127.0.0.1",
            MANTLE_WEBHOOK_ALLOWED_PRIVATE="127.0.0.1",
        )
        yield AppServer(stack=stack, process=process, url=url, email_dir=email_dir)
    finally:
        stack.stop_all()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as found:
        yield found


def test_add_an_endpoint_send_a_test_event_and_read_the_delivery_log(
    page: Page, app_server: AppServer, world: OrgWorld, receiver: Receiver
) -> None:
    login_as(page, world.users[Role.BILLING], app_server)
    page.goto(f"/console/o/{world.org.id}/billing/")
    page.get_by_role("link", name="Alerts and webhooks").click()
    page.fill("#id_url", "https://169.254.169.254/latest/meta-data/")
    page.get_by_role("button", name="Add endpoint").click()
    expect(page.locator("#webhook-form")).to_contain_text("metadata")
    screenshot(page, "webhook-refused", AREA)

    page.fill("#id_url", receiver.url)
    page.get_by_role("button", name="Add endpoint").click()
    secret = page.get_by_test_id("secret").inner_text()
    assert secret.startswith("whsec_")
    screenshot(page, "webhook-created", AREA)
    page.get_by_role("link", name="Done").click()
    expect(page.locator("#webhooks")).to_contain_text(receiver.url)
    expect(page.locator("#webhooks")).not_to_contain_text(secret)

    receiver.statuses = [500]  # the first test event fails: retried later
    page.get_by_role("button", name="Send test event").first.click()
    expect(page.locator("#deliveries")).to_contain_text("pending")
    expect(page.locator("#deliveries")).to_contain_text("HTTP 500")
    page.get_by_role("button", name="Send test event").click()
    expect(page.locator("#deliveries")).to_contain_text("delivered")
    screenshot(page, "webhook-delivery-log", AREA)

    sent = receiver.wait_for(2)
    assert len(sent) == 2
    for request in sent:
        assert verify_as_documented(secret, request.headers["mantle-signature"], request.body)
        assert json.loads(request.body)["type"] == "test"
        assert json.loads(request.body)["organization"] == world.org.id
    endpoint = WebhookEndpoint.objects.get(organization=world.org)
    assert sorted(endpoint.deliveries.values_list("status", flat=True)) == ["delivered", "pending"]
