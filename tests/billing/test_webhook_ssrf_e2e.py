"""Webhook URLs are a tenant's: their deliveries, run by a real billing Celery worker process,
go only where the webhook policy allows (core/outbound.py's WEBHOOK), never where the
operator's provider allow-lists would. The worker is started with provider lists that allow
loopback, ::1, the metadata address and plain http, and a webhook list that names only one
loopback server, which answers with a redirect to another loopback server; each delivery of
endpoints pointing at internal addresses is refused before a connection is made, with its
reason in the delivery log, and the redirect is not followed.

The endpoints are written to the database directly, as rows saved before their name moved
to an internal address (DNS rebinding) or under an earlier policy would be; the save path
refuses each of them (checked here under the worker's settings), the delivery checks again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.test import override_settings

from accounts.models import Organization
from billing import jobs
from billing.alerts import webhooks
from billing.models import AlertEvent, WebhookDelivery, WebhookEndpoint
from core import secretbox
from core.celery_app import app
from core.errors import InvalidInput
from tests.factories import OrganizationFactory
from tests.support.stack import Process, Stack
from tests.support.webhook_receiver import Receiver, verify_as_documented, webhook_receiver

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SECRET = "whsec_e2e_secret_for_the_ssrf_test"


@dataclass
class Scene:
    worker: Process
    receiver: Receiver  # on 127.0.0.1: what an attacker wants to reach
    receiver6: Receiver  # on [::1]
    redirector: Receiver  # on 127.0.0.1 too, but the one host the webhook list allows
    settings: dict[str, list[str]]  # the worker's allow-lists, for the save-path check


@pytest.fixture(scope="module")
def scene(django_db_setup: None) -> Iterator[Scene]:
    with (
        webhook_receiver() as receiver,
        webhook_receiver("::1") as receiver6,
        webhook_receiver() as redirector,
    ):
        redirector.statuses = [307] * 10
        redirector.location = receiver.url
        allowed = f"127.0.0.1:{redirector.port}"
        lists = {
            # What the operator allows its own providers: never read for a webhook.
            "MANTLE_PROVIDER_ALLOWED_HTTP": ["127.0.0.1", "localhost", "hooks.example.com"],
            "MANTLE_PROVIDER_ALLOWED_PRIVATE": [
                "127.0.0.0/8",
                "::1",
                "169.254.169.254",
                "localhost",
            ],
            "MANTLE_PROVIDER_BYOK_ALLOWED_HTTP": ["127.0.0.1"],
            "MANTLE_PROVIDER_BYOK_ALLOWED_PRIVATE": ["127.0.0.0/8", "::1"],
            # The one webhook destination this deployment allows on loopback.
            "MANTLE_WEBHOOK_ALLOWED_HTTP": [allowed],
            "MANTLE_WEBHOOK_ALLOWED_PRIVATE": [allowed],
        }
        stack = Stack.for_tests()
        worker = stack.spawn(
            "billing-worker-webhooks",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config.celery",
                "worker",
                "-Q",
                jobs.QUEUE,
                "-P",
                "solo",
                "-n",
                "billing-webhooks-e2e@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "INFO",
            ],
            {name: ",".join(values) for name, values in lists.items()},
        )
        try:
            yield Scene(worker, receiver, receiver6, redirector, lists)
        finally:
            stack.stop_all()


def endpoint(org: Organization, url: str) -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(
        organization=org, url=url, event_types=[], secret_sealed=secretbox.seal(SECRET)
    )


def wait_attempted(event: AlertEvent, count: int, worker: Process) -> list[WebhookDelivery]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rows = list(WebhookDelivery.objects.filter(event=event, attempts__gte=1))
        if len(rows) >= count:
            return rows
        assert worker.alive(), worker.tail()
        time.sleep(0.2)
    raise AssertionError(f"deliveries not attempted:\n{worker.tail()}")


# This process runs tasks eagerly; send_task goes to the broker all the same (the point).
@pytest.mark.filterwarnings("ignore::celery.exceptions.AlwaysEagerIgnored")
def test_webhooks_to_internal_addresses_are_refused_at_each_delivery_with_a_reason(
    scene: Scene,
) -> None:
    p, q, r = scene.receiver.port, scene.receiver6.port, scene.redirector.port
    refused = {
        f"https://127.0.0.1:{p}/hooks/mantle": "127.0.0.1 is a loopback address",
        f"http://127.0.0.1:{p}/hooks/mantle": "the webhook URL must use https",
        "https://169.254.169.254/latest/meta-data/": "169.254.169.254 is a cloud metadata address",
        f"https://localhost:{p}/hooks/mantle": "localhost resolves to",
        f"https://[::1]:{q}/hooks/mantle": "::1 is a loopback address",
        f"https://2130706433:{p}/hooks/mantle": "2130706433 means 127.0.0.1 (a loopback address)",
        f"https://0177.0.0.1:{p}/hooks/mantle": "0177.0.0.1 means 127.0.0.1 (a loopback address)",
        f"http://2130706433:{p}/hooks/mantle": "the webhook URL must use https",
        "http://hooks.example.com:8080/hooks/mantle": "the webhook URL must use https",
    }
    redirecting = f"http://127.0.0.1:{r}/hooks/mantle"
    # The save path refuses every one of them under the worker's lists, and takes the
    # allowed one.
    with override_settings(**scene.settings):
        for url in refused:
            with pytest.raises(InvalidInput):
                webhooks.check_webhook_url(url)
        assert webhooks.check_webhook_url(redirecting) == redirecting

    org = OrganizationFactory()
    rows = {url: endpoint(org, url) for url in [*refused, redirecting]}
    event = AlertEvent.objects.create(
        organization=org,
        kind=AlertEvent.Kind.INVOICE_FINALIZED,
        dedupe_key="invoice_finalized:ssrf-e2e",
        payload={"number": "INV-1"},
    )
    # The fan-out and every attempt run in the worker process.
    app.send_task(jobs.ALERT_DISPATCH, args=(event.id,), queue=jobs.QUEUE)

    deliveries = {d.endpoint_id: d for d in wait_attempted(event, len(rows), scene.worker)}
    for url, reason in refused.items():
        d = deliveries[rows[url].id]
        assert (d.status, d.attempts, d.response_code) == ("pending", 1, None), url
        assert d.last_error.startswith("refused: "), (url, d.last_error)
        assert reason in d.last_error, (url, d.last_error)
        assert "provider" not in d.last_error
    d = deliveries[rows[redirecting].id]
    assert (d.status, d.attempts, d.response_code) == ("pending", 1, 307)
    assert (
        d.last_error == "HTTP 307: redirects are not followed; the endpoint must answer 2xx itself"
    )
    # The allowed server got the one delivery, signed; nothing reached the others, neither
    # directly nor through the redirect.
    [sent] = scene.redirector.requests
    assert sent.headers["mantle-event-id"] == event.id
    assert verify_as_documented(SECRET, sent.headers["mantle-signature"], sent.body)
    assert scene.receiver.requests == []
    assert scene.receiver6.requests == []
