"""Console journeys in a real browser (Debian's Chromium) against the real server and worker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from playwright.sync_api import Page, expect

from accounts import services as account_services
from accounts import throttle
from accounts.models import ApiKey, Organization, User
from accounts.permissions import Role
from accounts.principal import SYSTEM
from billing.models import Budget, UsageRollup
from billing.periods import hour_start
from catalog import services as catalog_services
from catalog.models import CompileJob, Endpoint
from catalog.services import builtin_models_register
from core.redis import get_redis
from tests.billing.factories import GrantFactory, PriceFactory
from tests.billing.stripe_support import make_invoice
from tests.factories import (
    OrganizationFactory,
    UserFactory,
    add_member,
    make_api_key,
    price_builtin_models,
)
from tests.support.browser import AppServer, login_as, screenshot
from tests.support.stack import ROOT, Stack, builtin_manifests

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.browser,
    pytest.mark.models,
]

AREA = "console"
CHAT = "smollm2-135m-instruct"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return builtin_manifests()


@pytest.fixture(scope="module")
def worker(app_server: AppServer) -> Iterator[None]:
    """One inference worker on the cpu pool, for the playground journey."""
    stack = Stack.for_tests()
    try:
        stack.worker("cpu", name="console-worker", concurrency=4)
        yield
    finally:
        stack.stop_all()


@pytest.fixture
def builtin(manifests: list[dict[str, Any]]) -> dict[str, Endpoint]:
    registered = {e.name: e for e in builtin_models_register(manifests)}
    price_builtin_models()  # as bin/run's seed_prices: admission refuses unpriced models
    return registered


def drain_usage(server: AppServer) -> None:
    """The real metering drain, once, as operations run it."""
    done = subprocess.run(
        [sys.executable, "manage.py", "drain_usage", "--once", "--consumer", "console-e2e"],
        cwd=ROOT,
        env=server.stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_signup_key_playground_stream_and_usage(
    page: Page, app_server: AppServer, worker: None, builtin: dict[str, Endpoint]
) -> None:
    chat = builtin[CHAT]
    # Sign up through the form.
    page.goto("/console/signup/")
    screenshot(page, "signup", AREA)
    page.fill("#id_email", "journey@example.com")
    page.fill("#id_full_name", "Journey Person")
    page.fill("#id_organization_name", "Journey Ltd")
    page.fill("#id_password", "a sturdy passphrase 42")
    page.fill("#id_password_again", "a sturdy passphrase 42")
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Check your email")
    assert not User.objects.filter(email="journey@example.com").exists()
    # Open the link of the email, as the person would, and confirm.
    (message,) = app_server.emails_to("journey@example.com")
    found = re.search(r"https?://[^/\s]+(/console/signup/confirm/[^/\s]+/)", message)
    assert found is not None, message
    page.goto(found.group(1))
    screenshot(page, "signup-confirm", AREA)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Quick start")
    org = Organization.objects.get(memberships__user__email="journey@example.com")
    assert page.url == f"{app_server.url}/console/o/{org.id}/"
    screenshot(page, "quickstart", AREA)

    # Create a key: the secret is shown once, with a copy button.
    page.click("text=Create a key")
    page.fill("#id_name", "ci pipeline")
    page.select_option("#id_expiry", "30")
    page.click("button:has-text('Create key')")
    secret = page.locator("[data-testid=secret]").inner_text().strip()
    key = ApiKey.objects.get(organization=org, name="ci pipeline")
    assert secret.startswith(key.prefix)
    assert key.scopes == ["inference"]
    page.click("button[data-copy='#secret']")
    expect(page.locator("button[data-copy='#secret']")).to_have_attribute("data-copied", "1")
    screenshot(page, "key-created", AREA)
    page.click("text=Done")
    expect(page.locator("#keys")).to_contain_text(f"{key.prefix}…")
    assert secret not in page.content()

    # Chat in the playground: tokens arrive one after another, not all at once.
    page.goto(f"/console/o/{org.id}/playground/?endpoint={chat.id}")
    expect(page.locator("#snippet-python")).to_contain_text(f'model="{chat.id}"')
    expect(page.locator("#snippet-curl")).to_contain_text(f'"model":"{chat.id}"')
    page.eval_on_selector(
        "#temperature",
        "el => { el.value = '0'; el.dispatchEvent(new Event('input', {bubbles: true})); }",
    )
    expect(page.locator("#snippet-python")).to_contain_text("temperature=0,")
    page.fill("#max_tokens", "40")
    page.fill("#message", "Write two sentences about the sea.")
    page.click("#send")
    reply = page.locator(".msg.assistant .text").last
    seen: list[int] = []
    deadline = time.time() + 120
    while time.time() < deadline:
        length = len(reply.inner_text())
        if length and (not seen or length != seen[-1]):
            seen.append(length)
        if page.locator(".msg.assistant[data-done='1']").count():
            break
        time.sleep(0.05)
    final = reply.inner_text()
    assert page.locator(".msg.assistant[data-done='1']").count() == 1, page.inner_text(
        "#run-status"
    )
    assert len(seen) >= 3, f"the reply did not stream: lengths seen {seen}"
    assert seen == sorted(seen) and seen[-1] == len(final)
    status = page.inner_text("#run-status")
    assert "completion tokens" in status
    request_id = status.rsplit("request ", 1)[1].strip()
    assert request_id.startswith("req_")
    screenshot(page, "playground", AREA)
    playground_key = ApiKey.objects.get(organization=org, name="Playground · journey@example.com")
    assert playground_key.scopes == ["inference"]

    # The request is metered like any other and shows on the usage page.
    drain_usage(app_server)
    rollup = UsageRollup.objects.get(organization_id=org.id)
    assert (rollup.requests, rollup.api_key_id, rollup.model_name) == (
        1,
        playground_key.id,
        CHAT,
    )
    page.goto(f"/console/o/{org.id}/usage/?group=model")
    row = page.locator("#usage-table tbody tr").first
    expect(row).to_contain_text(CHAT)
    cells = row.locator("td").all_inner_texts()
    assert cells[1] == "1"  # one request
    assert int(cells[4]) == rollup.output_tokens > 0  # after input and cached input
    page.wait_for_function("document.querySelectorAll('canvas[data-drawn]').length === 2")
    screenshot(page, "usage", AREA)
    page.select_option("#id_group", "key")  # htmx swaps the report in place
    expect(page.locator("#usage-table")).to_contain_text("Playground · journey@example.com")
    assert "group=key" in page.url


WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
# Records every value the first tool call's arguments box shows, however the browser batches
# the updates: each textContent write replaces the box's text node (a childList record).
WATCH_ARGUMENTS = """() => {
    window.argumentsSeen = [];
    new MutationObserver((records) => {
        for (const r of records) {
            if (!r.target.classList || !r.target.classList.contains("tool-args")) continue;
            for (const node of r.addedNodes) window.argumentsSeen.push(node.data);
        }
    }).observe(document.getElementById("transcript"), {childList: true, subtree: true});
}"""


def _set_range(page: Page, selector: str, value: str) -> None:
    page.eval_on_selector(
        selector,
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }",
        value,
    )


def _send_and_wait(page: Page, done_before: int) -> None:
    page.click("#send")
    expect(page.locator(".msg.assistant[data-done='1'], .msg.error")).to_have_count(
        done_before + 1, timeout=120_000
    )
    assert page.locator(".msg.error").count() == 0, page.inner_text("#transcript")


def test_playground_tools_and_json_mode(
    page: Page, app_server: AppServer, worker: None, builtin: dict[str, Endpoint]
) -> None:
    chat = builtin[CHAT]
    owner = UserFactory(email="tools@example.com")
    org = OrganizationFactory(name="Tools Ltd", owner=owner)
    login_as(page, owner, app_server)
    page.goto(f"/console/o/{org.id}/playground/?endpoint={chat.id}")
    _set_range(page, "#temperature", "0")
    page.fill("#max_tokens", "80")

    # A function whose parameters are not JSON: refused in the page, next to the field,
    # before a key is minted or a request sent.
    page.click("#tools-section summary")
    page.click("#add-tool")
    page.fill("#tool-0-name", "get_weather")
    page.fill("#tool-0-description", "The current weather in a city")
    page.fill("#tool-0-parameters", '{"type": "object", "properties": {"city": ')
    page.select_option("#tool_choice", "required")
    page.fill("#message", "What is the weather like in Paris today?")
    page.click("#send")
    expect(page.locator("#tool-0-parameters ~ .field-error")).to_contain_text(
        "Function 1 · Parameters (JSON schema) is not valid JSON"
    )
    assert page.locator("#transcript .msg").count() == 0
    assert not ApiKey.objects.filter(organization=org).exists()

    # Valid JSON the gateway refuses (no such type; a name with a space): its 400 names the
    # param, and the page shows it on that field.
    page.fill("#tool-0-parameters", '{"type": "object", "properties": {"city": {"type": "strin"}}}')
    page.click("#send")
    expect(page.locator(".msg.error")).to_contain_text("(param: tools[0].function.parameters)")
    expect(page.locator("#tool-0-parameters ~ .field-error")).to_contain_text("Invalid schema")
    expect(page.locator("#message")).to_have_value("What is the weather like in Paris today?")
    page.fill("#tool-0-parameters", json.dumps(WEATHER_PARAMETERS, indent=2))
    page.fill("#tool-0-name", "get weather")
    page.select_option("#tool_choice", "required")
    page.click("#send")
    expect(page.locator("#tool-0-name ~ .field-error")).to_contain_text(
        "(param: tools[0].function.name)"
    )
    assert page.locator("#tool-0-parameters ~ .field-error").count() == 0
    screenshot(page, "playground-tool-error", AREA)

    # tool_choice required: the real model calls the function; the call streams in pieces,
    # assembled in place, and ends pretty-printed.
    page.click("#clear")
    page.fill("#tool-0-name", "get_weather")
    page.select_option("#tool_choice", "function:get_weather")
    page.select_option("#tool_choice", "required")
    page.uncheck("#parallel_tool_calls")  # one call
    expect(page.locator("#snippet-python")).to_contain_text('tool_choice="required",')
    expect(page.locator("#snippet-python")).to_contain_text("parallel_tool_calls=False,")
    page.evaluate(WATCH_ARGUMENTS)
    _send_and_wait(page, 0)
    call = page.locator(".msg.assistant[data-done='1'] .tool-call")
    expect(call).to_have_count(1)
    assert call.locator(".tool-name").inner_text() == "get_weather"
    call_id = call.get_attribute("data-call-id")
    assert call_id is not None and call_id.startswith("call_")
    shown = call.locator(".tool-args").inner_text()
    arguments = json.loads(shown)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in {"celsius", "fahrenheit"}
    assert shown == json.dumps(arguments, indent=2, ensure_ascii=False)
    assert call.locator(".tool-args").evaluate("el => el.children.length") == 0  # text, not HTML
    seen: list[str] = [v for v in page.evaluate("window.argumentsSeen") if v]
    raw = seen[-2]  # the last piece's total, before the pretty-printed value
    assert json.loads(raw) == arguments
    pieces = seen[:-1]
    assert len(pieces) >= 3, f"the call did not stream: {pieces}"
    assert all(raw.startswith(p) for p in pieces) and pieces == sorted(pieces, key=len)
    assert "finish: tool_calls" in page.inner_text("#run-status")
    assert page.locator(".msg.assistant .text").first.is_hidden()
    screenshot(page, "playground-tool-call", AREA)

    # The call's result goes back as a tool message; with tool_choice none the model answers.
    page.fill("#tool-result-0", '{"temperature": 18, "sky": "clear"}')
    page.select_option("#tool_choice", "none")
    _send_and_wait(page, 1)
    expect(page.locator(".msg.tool .text")).to_have_text('{"temperature": 18, "sky": "clear"}')
    last = page.locator(".msg.assistant").last
    assert last.locator(".text").inner_text().strip()
    assert last.locator(".tool-call").count() == 0
    assert page.locator("[data-tool-result]").count() == 0

    # JSON mode: the answer parses and is shown indented.
    page.click("#clear")
    page.click("[data-remove-tool]")
    expect(page.locator("#tool_choice")).to_be_disabled()
    page.click("#format-section summary")
    page.select_option("#response_format", "json_object")
    expect(page.locator("#snippet-python")).to_contain_text(
        'response_format={\n        "type": "json_object",\n    },'
    )
    expect(page.locator("#snippet-curl")).to_contain_text(
        '"response_format":{"type":"json_object"}'
    )
    assert "tools" not in page.inner_text("#snippet-curl")
    page.fill("#max_tokens", "200")
    page.fill("#message", "Invent a person who lives in Paris and describe them as JSON.")
    _send_and_wait(page, 0)
    answer = page.locator(".msg.assistant[data-json='1'] .text.json")
    expect(answer).to_have_count(1)
    value = json.loads(answer.inner_text())
    assert isinstance(value, dict) and value
    assert answer.inner_text() == json.dumps(value, indent=2, ensure_ascii=False)
    assert "not valid JSON" not in page.inner_text("#run-status")
    screenshot(page, "playground-json-mode", AREA)

    # A JSON schema, answered whole (not streamed): an object of exactly that shape.
    page.click("#clear")
    page.select_option("#response_format", "json_schema")
    page.fill("#schema_name", "person")
    page.fill("#schema", json.dumps(PERSON_SCHEMA, indent=2))
    page.uncheck("#stream")
    page.fill("#max_tokens", "120")
    page.fill("#message", "Invent a person who lives in Paris and describe them as JSON.")
    _send_and_wait(page, 0)
    person = json.loads(page.locator(".msg.assistant[data-json='1'] .text.json").inner_text())
    assert set(person) == {"name", "age", "city"} and isinstance(person["age"], int)
    assert "finish: stop" in page.inner_text("#run-status")
    expect(page.locator("#snippet-python")).to_contain_text("completion = client.chat")
    screenshot(page, "playground-json-schema", AREA)


def test_viewer_is_blocked_from_creating_keys(page: Page, app_server: AppServer) -> None:
    org = OrganizationFactory(name="Viewers Inc")
    viewer = add_member(org, Role.VIEWER)
    login_as(page, viewer, app_server)
    page.goto(f"/console/o/{org.id}/keys/")
    expect(page.locator("main")).to_contain_text("Your role (viewer) cannot create keys.")
    assert page.locator("button:has-text('Create key')").count() == 0
    screenshot(page, "keys-viewer", AREA)
    # A forged form post (with a valid CSRF token) is refused by the server too.
    status = page.evaluate(
        """async (url) => {
            const body = new URLSearchParams({name: "x", scopes: "inference", expiry: "never"});
            const token = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch(url, {method: "POST", body, headers: {"X-CSRFToken": token}});
            return r.status;
        }""",
        f"/console/o/{org.id}/keys/",
    )
    assert status == 403
    assert ApiKey.objects.filter(organization=org).count() == 0
    page.goto(f"/console/o/{org.id}/playground/")
    page.goto(f"/console/o/{org.id}/billing/")
    expect(page.locator("main")).to_contain_text("may not do billing.view")


def test_another_organizations_endpoint_id_is_404(
    page: Page, app_server: AppServer, builtin: dict[str, Endpoint]
) -> None:
    mine = OrganizationFactory(name="Mine")
    theirs = OrganizationFactory(name="Theirs")
    chat = builtin[CHAT]
    private = Endpoint.objects.create(
        name="their-private-chat",
        organization=theirs,
        model_version=chat.model_version,
        pool=chat.pool,
    )
    owner = User.objects.get(memberships__organization=mine)
    login_as(page, owner, app_server)
    response = page.goto(f"/console/o/{mine.id}/endpoints/{private.id}/")
    assert response is not None and response.status == 404
    response = page.goto(f"/console/o/{theirs.id}/endpoints/")
    assert response is not None and response.status == 404
    response = page.goto(f"/console/o/{mine.id}/endpoints/{chat.id}/")
    assert response is not None and response.status == 200
    expect(page.locator("main")).to_contain_text(chat.id)


@pytest.fixture
def clean_throttle() -> Iterator[None]:
    # e2e tests keep Redis (live workers use it): clear the counters this test adds.
    keys = [
        throttle.pair_key("locked@example.com", "127.0.0.1"),
        throttle.address_key("127.0.0.1"),
        throttle.account_key("locked@example.com"),
    ]
    get_redis().delete(*keys)
    yield
    get_redis().delete(*keys)


def test_login_throttled_in_the_browser(
    page: Page, app_server: AppServer, clean_throttle: None
) -> None:
    UserFactory(email="locked@example.com")
    page.goto("/console/login/")
    screenshot(page, "login", AREA)
    for _ in range(5):
        page.fill("#id_username", "locked@example.com")
        page.fill("#id_password", "wrong guess")
        page.click("button[type=submit]")
        expect(page.locator(".error")).to_contain_text("Please enter a correct email and password")
    # After five failures from this address even the right password is refused from it,
    # without being checked (elsewhere the owner still signs in: test_console_auth.py).
    page.fill("#id_username", "locked@example.com")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text(
        "Too many failed log-ins for this email address from your network address. "
        "Try again in 15 minutes"
    )
    assert "/login/" in page.url
    screenshot(page, "login-throttled", AREA)


def test_screenshots_of_every_main_page(
    page: Page, app_server: AppServer, builtin: dict[str, Endpoint]
) -> None:
    owner = UserFactory(email="owner@example.com", full_name="Olivia Owner")
    org = OrganizationFactory(name="Screenshot Corp", owner=owner)
    account_services.project_create(principal=SYSTEM, org=org, name="Mobile app")
    for role in (Role.ADMIN, Role.DEVELOPER, Role.BILLING, Role.VIEWER):
        add_member(org, role)
    key, _ = make_api_key(org, scopes=["inference", "read-usage"])
    make_api_key(org, expires_at=timezone.now() + timedelta(days=30))
    for kind, price in (("input", "0.15"), ("output", "0.60")):
        PriceFactory(model_name=CHAT, token_kind=kind, unit_price=price)
    now = hour_start(timezone.now())
    for days in range(6):
        UsageRollup.objects.create(
            organization_id=org.id,
            project_id=key.project_id,
            api_key_id=key.id,
            endpoint_id=builtin[CHAT].id,
            model_name=CHAT,
            hour=now - timedelta(days=days),
            requests=10 + days * 3,
            input_tokens=40_000 + days * 9_000,
            output_tokens=12_000 + days * 4_000,
        )
    Budget.objects.create(organization=org, monthly_amount="50.00", alert_thresholds=[50, 80, 100])
    GrantFactory(organization=org, amount="100.00", reason="welcome credit")
    invoice = make_invoice(org, number="MAN-2026-000007")
    own = catalog_services.endpoint_create(
        principal=SYSTEM,
        org=org,
        name="support-bot",
        model_version_id=builtin[CHAT].model_version_id,
        pool="cpu",
    )
    job = CompileJob.objects.create(
        organization=org,
        model_name="our-encoder",
        kind="embedding",
        source="onnx",
        status="running",
        steps=[
            {"name": "import", "status": "succeeded", "duration_s": 0.8, "log": "1 graph"},
            {"name": "validate", "status": "running", "log": "checker: ok\nsmoke run..."},
        ],
    )
    login_as(page, owner, app_server)
    pages = {
        "quickstart-owner": f"/console/o/{org.id}/",
        "models": f"/console/o/{org.id}/models/",
        "endpoints": f"/console/o/{org.id}/endpoints/",
        "endpoint-public": f"/console/o/{org.id}/endpoints/{builtin[CHAT].id}/",
        "endpoint-own": f"/console/o/{org.id}/endpoints/{own.id}/",
        "compile-job": f"/console/o/{org.id}/compile-jobs/{job.id}/",
        "playground-empty": f"/console/o/{org.id}/playground/",
        "keys": f"/console/o/{org.id}/keys/",
        "usage-by-day": f"/console/o/{org.id}/usage/",
        "billing": f"/console/o/{org.id}/billing/",
        "invoice": f"/console/o/{org.id}/billing/invoices/{invoice.id}/",
        "invoice-print": f"/console/o/{org.id}/billing/invoices/{invoice.id}/print/",
        "projects": f"/console/o/{org.id}/projects/",
        "team": f"/console/o/{org.id}/team/",
        "key-revoke": f"/console/o/{org.id}/keys/{key.id}/revoke/",
        "organization-new": "/console/organizations/new/",
    }
    for name, url in pages.items():
        response = page.goto(url)
        assert response is not None and response.status == 200, f"{name}: {url}"
        if name.startswith("usage"):
            page.wait_for_function("document.querySelectorAll('canvas[data-drawn]').length === 2")
        screenshot(page, name, AREA)
    page.context.clear_cookies()
    page.goto("/console/password-reset/")
    screenshot(page, "password-reset", AREA)
