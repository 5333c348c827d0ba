"""The inference path through a real Celery worker process and a real broker (echo model)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.stack import Process, Stack
from tests.workers.conftest import TEST_REDIS_URL
from workers.contract import (
    USAGE_STREAM,
    BillingIdentity,
    GenerateRequest,
    ModelRef,
    SamplingParams,
    TaskName,
    UsageEvent,
    inference_queue,
    pool_live_key,
    priority_queue,
    response_stream_key,
    to_payload,
    worker_info_key,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
POOL = "testpool"
NODE = "celery-test-node"


@pytest.fixture
def worker(redis_client: Any, tmp_path: Path) -> Iterator[Process]:
    """A real inference worker on this test's Redis (broker and streams), started and
    stopped by the suite's launcher; listed in its pool once it yields."""
    env = {
        **os.environ,
        "CELERY_BROKER_URL": TEST_REDIS_URL,
        "REDIS_URL": TEST_REDIS_URL,
        "PYTHONPATH": str(ROOT),
    }
    stack = Stack(env=env, log_dir=tmp_path)
    try:
        proc = stack.start_worker(POOL, "celery-test-worker", 8, node=NODE)
        stack.wait_registered(proc, POOL)
        yield proc
    finally:
        stack.stop_all()  # warm shutdown: lets the node unlist itself


def read_until_final(client: Any, request_id: str, timeout: float = 30) -> list[dict[str, str]]:
    key = response_stream_key(request_id)
    seen: list[dict[str, str]] = []
    last = "0-0"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        reply = client.xread({key: last}, block=500)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                seen.append(fields)
                if fields["type"] in ("done", "error"):
                    return seen
    pytest.fail(f"no final event for {request_id}; got {seen}")


def test_generate_through_a_real_worker(
    worker: Process, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import Celery

    # Celery prefers CELERY_BROKER_URL from the environment over its argument,
    # and the Django test settings put another database there.
    monkeypatch.setenv("CELERY_BROKER_URL", TEST_REDIS_URL)
    info = json.loads(redis_client.get(worker_info_key(NODE)))
    assert info["pool"] == POOL and info["total_slots"] == 8
    assert info["queues"] == [inference_queue(POOL), priority_queue(POOL)]

    sender = Celery("test-sender", broker=TEST_REDIS_URL)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    identity = BillingIdentity("org-1", "proj-1", "key-1", "ep-1", "mv-echo", "echo")
    requests = [
        GenerateRequest(
            request_id=f"req-celery-{i}",
            model=ModelRef("mv-echo", "echo", "e" * 64, ""),
            identity=identity,
            prompt_token_ids=(10, 20, 30, 40 + i),
            sampling=SamplingParams(max_tokens=3),
            deadline=time.time() + 60,
            enqueued_at=time.time(),
        )
        for i in range(3)
    ]
    for req in requests:
        sender.send_task(
            TaskName.GENERATE.value,
            kwargs={"payload": to_payload(req)},
            queue=inference_queue(POOL),
        )
    # A redelivered copy of the first request (same request id) must be a no-op.
    sender.send_task(
        TaskName.GENERATE.value,
        kwargs={"payload": to_payload(requests[0])},
        queue=inference_queue(POOL),
    )
    for i, req in enumerate(requests):
        events = read_until_final(redis_client, req.request_id)
        assert events == [
            {"type": "started", "worker": NODE, "pool": POOL},
            {"type": "delta", "text": "10 20 30", "tokens": "3"},
            {
                "type": "done",
                "finish_reason": "length",
                "prompt_tokens": "4",
                "completion_tokens": "3",
            },
        ], i
    deadline = time.monotonic() + 10
    while redis_client.xlen(USAGE_STREAM) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # give the duplicate time to (not) do anything
    usages = [UsageEvent.from_fields(f) for _, f in redis_client.xrange(USAGE_STREAM)]
    assert sorted(u.request_id for u in usages) == [r.request_id for r in requests]
    for usage in usages:
        assert (usage.input_tokens, usage.output_tokens, usage.status, usage.worker) == (
            4,
            3,
            "length",
            NODE,
        )
        assert (usage.organization_id, usage.model_version_id) == ("org-1", "mv-echo")
    assert len(read_until_final(redis_client, requests[0].request_id)) == 3
    sender.close()

    # Clean shutdown unlists the node at once.
    worker.popen.send_signal(signal.SIGTERM)
    worker.popen.wait(20)
    assert redis_client.zscore(pool_live_key(POOL), NODE) is None
    assert redis_client.exists(worker_info_key(NODE)) == 0
