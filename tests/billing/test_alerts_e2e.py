"""Alerts never block the request path, with real processes: the request that raises an
event (here the console's test send) answers once its transaction commits, and the
fan-out and the delivery run in a real billing Celery worker process. The receiver holds
each request until the test lets it go, so a delivery made inside the request would not
have returned (or would have timed out and been retried): the delivery is made once, by
the worker, after the console has answered.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.test import override_settings
from django.urls import reverse

from accounts.models import AuditLog
from accounts.permissions import Role
from accounts.principal import Principal
from billing import jobs
from billing.alerts import webhooks
from billing.models import AlertEvent, WebhookDelivery
from core.celery_app import app
from tests.conftest import OrgWorld
from tests.support.stack import Process, Stack
from tests.support.webhook_receiver import Receiver, verify_as_documented, webhook_receiver

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@dataclass
class Scene:
    worker: Process
    receiver: Receiver


@pytest.fixture(scope="module")
def scene(django_db_setup: None) -> Iterator[Scene]:
    with webhook_receiver() as receiver:
        stack = Stack.for_tests()
        worker = stack.spawn(
            "billing-worker-alerts-e2e",
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
                "billing-alerts-e2e@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "INFO",
            ],
            # The receiver is on loopback: the webhook lists (never the providers') allow it.
            {
                "MANTLE_WEBHOOK_ALLOWED_HTTP": "127.0.0.1",
                "MANTLE_WEBHOOK_ALLOWED_PRIVATE": "127.0.0.1",
            },
        )
        try:
            yield Scene(worker, receiver)
        finally:
            stack.stop_all()


@pytest.fixture
def queued() -> Iterator[None]:
    """This process queues its billing jobs on the broker, as a web process does, instead
    of running them itself (the test settings run tasks eagerly)."""
    app.conf.task_always_eager = False
    try:
        yield
    finally:
        app.conf.task_always_eager = True


def wait_delivered(event: AlertEvent, worker: Process) -> WebhookDelivery:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        found = WebhookDelivery.objects.filter(event=event, status="delivered").first()
        if found is not None:
            return found
        assert worker.alive(), worker.tail()
        time.sleep(0.2)
    raise AssertionError(f"not delivered:\n{worker.tail()}")


def test_the_request_answers_before_the_worker_delivers_its_event(
    scene: Scene, world: OrgWorld, queued: None
) -> None:
    receiver = scene.receiver
    with override_settings(
        MANTLE_WEBHOOK_ALLOWED_HTTP=["127.0.0.1"], MANTLE_WEBHOOK_ALLOWED_PRIVATE=["127.0.0.1"]
    ):
        created = webhooks.endpoint_create(
            principal=Principal(user=world.users[Role.OWNER]),
            org=world.org,
            url=receiver.url,
            event_types=[],
        )
    receiver.gate = threading.Event()
    try:
        owner = world.client_for(Role.OWNER)
        test_url = reverse(
            "console-webhook-test",
            kwargs={"org_id": world.org.id, "endpoint_id": created.endpoint.id},
        )
        answered = owner.post(test_url)

        # The console answered while the receiver holds every request: nothing has been
        # delivered, and no attempt has run out of time (which an attempt made inside the
        # request would have, before the answer).
        assert answered.status_code == 302
        [event] = AlertEvent.objects.filter(organization=world.org, kind="test")
        assert not WebhookDelivery.objects.filter(event=event, status="delivered").exists()
        assert not WebhookDelivery.objects.filter(event=event, attempts__gte=2).exists()
        assert not WebhookDelivery.objects.exclude(last_error="").filter(event=event).exists()
        assert receiver.requests == []
        assert AuditLog.objects.filter(action="billing.webhook_test_sent").count() == 1
    finally:
        receiver.gate.set()
    # The worker's one attempt reaches the receiver once it lets go.
    delivered = wait_delivered(event, scene.worker)
    assert (delivered.attempts, delivered.response_code) == (1, 200)
    [req] = receiver.requests
    assert req.headers["mantle-event-id"] == event.id
    assert verify_as_documented(created.secret, req.headers["mantle-signature"], req.body)
    receiver.gate = None
