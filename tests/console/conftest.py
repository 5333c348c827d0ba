"""The browser fixtures for the console's journeys (tests/browser.py)."""

from __future__ import annotations

from tests.support.browser import app_server, browser, browser_context, page  # noqa: F401
