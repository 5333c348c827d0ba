"""Browser tests: the real ASGI server process, Playwright on Debian's Chromium, screenshots.

Import the fixtures in your area's conftest.py (tests/console/conftest.py does):

    from tests.support.browser import app_server, browser, browser_context, page  # noqa: F401

and in a test module:

    from tests.support.browser import AppServer, login_as, screenshot

    pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.browser]

    def test_something(page: Page, app_server: AppServer) -> None:
        login_as(page, user, app_server)
        page.goto("/console/")
        screenshot(page, "home", "console")

Rows written by the test must be committed for the server process to see them, hence
`transaction=True`; the `browser` marker tells bin/test to install Chromium
(tests/support/needs.py). The server is started once per session (like tests/gateway's
`live` stack) with the test database and the test Redis databases.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from accounts.models import User
from tests.support.stack import ROOT, Process, Stack

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT_DIR = ROOT / "test-output" / "screenshots"
VIEWPORT = {"width": 1280, "height": 900}

ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"


@dataclass
class AppServer:
    """The platform's ASGI server (console, admin, /api/v1, /v1) as a real process."""

    stack: Stack
    process: Process
    url: str
    email_dir: Path  # the server's mail, one file per message (Django's file backend)

    def emails_to(self, address: str) -> list[str]:
        """The messages sent to `address` so far, oldest first, as raw text."""
        files = sorted(self.email_dir.glob("*.log"), key=lambda p: p.stat().st_mtime_ns)
        texts = [p.read_text() for p in files]
        return [t for t in texts if f"To: {address}" in t]


@pytest.fixture(scope="session")
def app_server(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AppServer]:
    stack = Stack.for_tests()
    stack.env.pop(ASYNC_UNSAFE, None)
    email_dir = tmp_path_factory.mktemp("app-server-emails")
    try:
        process, url = stack.gateway(name="app-server", MANTLE_TEST_EMAIL_DIR=str(email_dir))
        yield AppServer(stack=stack, process=process, url=url, email_dir=email_dir)
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium for one test module.

    Playwright's sync API keeps an event loop running in this thread while it is
    started, and Django refuses ORM calls from a thread with a running loop. The test's
    own ORM calls are ordinary blocking calls between browser steps, so the guard is
    lifted while (and only while) Playwright runs: module scope keeps the rest of the
    suite under the guard.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: bin/test installs Debian's chromium (apt-get) when a "
            "selected test carries the `browser` marker"
        )
    before = os.environ.get(ASYNC_UNSAFE)
    os.environ[ASYNC_UNSAFE] = "true"
    try:
        with sync_playwright() as p:
            launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                yield launched
            finally:
                launched.close()
    finally:
        if before is None:
            os.environ.pop(ASYNC_UNSAFE, None)
        else:
            os.environ[ASYNC_UNSAFE] = before


@pytest.fixture
def browser_context(browser: Browser, app_server: AppServer) -> Iterator[BrowserContext]:
    context = browser.new_context(base_url=app_server.url, viewport=VIEWPORT)  # type: ignore[arg-type]
    context.set_default_timeout(15_000)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(browser_context: BrowserContext) -> Page:
    return browser_context.new_page()


def login_as(page: Page, user: User, server: AppServer) -> None:
    """Signs `user` in by a session cookie, skipping the log-in form (which has its own test)."""
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "accounts.backends.ThrottledModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    page.context.add_cookies(
        [{"name": settings.SESSION_COOKIE_NAME, "value": session.session_key, "url": server.url}]  # type: ignore[typeddict-item]
    )


def screenshot(page: Page, name: str, area: str) -> Path:
    """A full-page PNG at test-output/screenshots/<area>/<name>.png, for a person to look at."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
    folder = SCREENSHOT_DIR / area
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{safe}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
