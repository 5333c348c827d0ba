"""RabbitMQ works as the broker as well as Redis: the same request path over AMQP."""

from __future__ import annotations

import os

import pytest

from catalog.models import Endpoint
from catalog.services import endpoint_publish, pool_ensure
from tests.gateway.conftest import CHAT, Served

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.models,
    pytest.mark.rabbitmq,
]

AMQP = os.environ.get("MANTLE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def test_chat_through_a_rabbitmq_broker(served: Served) -> None:
    stack = served.live.stack
    pool = pool_ensure(name="amqp", region="local", providers=["CPUExecutionProvider"])
    endpoint = Endpoint.objects.create(
        organization=served.org,
        name="over-amqp",
        pool=pool,
        model_version=served.endpoints[CHAT].model_version,
    )
    endpoint_publish(endpoint)
    gateway, url = stack.gateway(name="gateway-amqp", CELERY_BROKER_URL=AMQP)
    worker = stack.worker("amqp", concurrency=4, CELERY_BROKER_URL=AMQP)
    try:
        done = served.client(url=url).chat.completions.create(
            model=endpoint.id,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=12,
        )
        assert "Paris" in (done.choices[0].message.content or "")
        assert "amqp://" in worker.tail(200)
    finally:
        stack.stop(worker)
        stack.stop(gateway)
