"""Single sign-on in a real browser against the real server and the local OpenID provider
(tests/support/oidc_provider.py, a real HTTP server on loopback): the owner configures the
identity provider and a domain on the settings page, an operator verifies the domain, and a
new person of that domain signs in through the provider's page and lands in the console of
the organization as a just-in-time member."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from accounts import sso
from accounts.models import Membership, SsoConnection, SsoDomain, User
from accounts.permissions import Role
from accounts.principal import Principal
from tests.factories import OrganizationFactory, UserFactory
from tests.support.browser import AppServer, login_as, screenshot
from tests.support.oidc_provider import LocalOidcProvider
from tests.support.stack import Stack, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.browser]

AREA = "console"
DOMAIN = "sso-journey.test"


@pytest.fixture(scope="module")
def idp() -> Iterator[LocalOidcProvider]:
    with LocalOidcProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def app_server(
    idp: LocalOidcProvider,
    django_db_setup: None,
    django_db_blocker: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AppServer]:
    """This module's own server, whose identity-provider allow-lists name the local
    provider's loopback host and port (as an operator would list an internal one)."""
    stack = Stack.for_tests()
    stack.env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    email_dir = tmp_path_factory.mktemp("sso-app-emails")
    port = free_port()
    env = {name: ",".join(value) for name, value in idp.settings().items()}
    try:
        process = stack.start_gateway(
            "sso-app-server", port=port, env={"MANTLE_TEST_EMAIL_DIR": str(email_dir), **env}
        )
        stack.wait_serving(process)
        yield AppServer(
            stack=stack, process=process, url=f"http://127.0.0.1:{port}", email_dir=email_dir
        )
    finally:
        stack.stop_all()


def test_configure_then_sign_in_through_the_identity_provider(
    page: Page, app_server: AppServer, idp: LocalOidcProvider
) -> None:
    owner = UserFactory(email=f"owner@{DOMAIN}")
    org = OrganizationFactory(name="Journey SSO Co", owner=owner)
    idp.add_user(f"new.hire@{DOMAIN}", name="New Hire")

    # The owner configures the provider; the secret never comes back into the page.
    login_as(page, owner, app_server)
    page.goto(f"/console/o/{org.id}/")
    page.get_by_role("link", name="Single sign-on").click()
    callback = page.get_by_test_id("callback-url").inner_text()
    assert callback == f"{app_server.url}/console/login/sso/callback/"
    page.fill("#id_issuer", idp.issuer)
    page.fill("#id_client_id", idp.client_id)
    page.fill("#id_client_secret", idp.client_secret)
    page.select_option("#id_default_role", "developer")
    page.check("#id_enabled")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".messages")).to_contain_text("Single sign-on saved")
    expect(page.get_by_test_id("secret-state")).to_contain_text("A client secret is stored")
    assert idp.client_secret not in page.content()
    page.fill("#id_domain", DOMAIN)
    page.get_by_role("button", name="Add domain").click()
    expect(page.locator("#sso-domains")).to_contain_text(f"_mantle-verification.{DOMAIN}")
    screenshot(page, "sso-settings", AREA)
    connection = SsoConnection.objects.get(organization=org)
    assert connection.enabled and connection.default_role == Role.DEVELOPER

    # An operator verifies the domain (tests cannot publish DNS records).
    staff = Principal(user=UserFactory(is_staff=True), ip_address=None)
    sso.sso_domain_mark_verified(principal=staff, domain=SsoDomain.objects.get(domain=DOMAIN))
    page.reload()
    expect(page.locator("#sso-domains")).to_contain_text("verified (operator)")
    page.get_by_role("button", name="Log out").click()

    # A new person of the domain signs in through the provider's own page.
    page.goto("/console/login/")
    page.fill("#id_sso-email", f"new.hire@{DOMAIN}")
    page.get_by_role("button", name="Sign in with SSO").click()
    expect(page).to_have_url(re.compile(rf"^{re.escape(idp.issuer)}/authorize\?"))
    screenshot(page, "sso-identity-provider", AREA)
    page.get_by_role("button", name=f"Sign in as new.hire@{DOMAIN}").click()
    expect(page).to_have_url(re.compile(rf"/console/o/{org.id}/$"))
    expect(page.locator(".messages")).to_contain_text(
        "You joined Journey SSO Co as developer through single sign-on"
    )
    screenshot(page, "sso-signed-in", AREA)
    hire = User.objects.get(email=f"new.hire@{DOMAIN}")
    assert Membership.objects.get(organization=org, user=hire).role == Role.DEVELOPER
    # Signed in for real: another page of the organization opens.
    page.goto(f"/console/o/{org.id}/keys/")
    expect(page.locator("h1")).to_contain_text("API keys")
