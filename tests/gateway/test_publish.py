"""The gateway's direct Redis publish writes exactly the message Celery itself would."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
import redis
from django.conf import settings

from config.celery import app as celery_app
from gateway.publish import celery_message

QUEUE = "inference.publish-test"


@pytest.fixture
def broker() -> redis.Redis:
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL, decode_responses=True)
    client.delete(QUEUE)
    yield client
    client.delete(QUEUE)


def test_message_matches_celerys_own(broker: redis.Redis) -> None:
    now = datetime.now(tz=UTC)
    expires = now + timedelta(seconds=90)
    kwargs = {"payload": {"request_id": "req_1", "tokens": [1, 2, 3]}}
    celery_app.send_task(
        "mantle.inference.generate", kwargs=kwargs, queue=QUEUE, task_id="req_1", expires=expires
    )
    theirs = json.loads(broker.rpop(QUEUE))  # type: ignore[arg-type]
    ours = celery_message(
        task="mantle.inference.generate",
        task_id="req_1",
        kwargs=kwargs,
        queue=QUEUE,
        expires=expires,
        now=now,
    )

    assert set(ours) == set(theirs)
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(
        base64.b64decode(theirs["body"])
    )
    skip_headers = {"origin", "kwargsrepr"}  # informational only
    assert {k: v for k, v in ours["headers"].items() if k not in skip_headers} == {
        k: v for k, v in theirs["headers"].items() if k not in skip_headers
    }
    assert set(ours["headers"]) == set(theirs["headers"])
    varying = {"delivery_tag", "reply_to", "expiration"}
    assert {k: v for k, v in ours["properties"].items() if k not in varying} == {
        k: v for k, v in theirs["properties"].items() if k not in varying
    }
    assert (
        abs(int(ours["properties"]["expiration"]) - int(theirs["properties"]["expiration"])) < 1000
    )
    for key in ("content-type", "content-encoding"):
        assert ours[key] == theirs[key]
