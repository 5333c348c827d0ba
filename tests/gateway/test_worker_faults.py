"""A worker killed in the middle of a request: the client gets a clean error, never a hang."""

from __future__ import annotations

import time

import httpx
import pytest

from catalog.models import Endpoint
from catalog.services import endpoint_publish, pool_ensure
from tests.gateway.conftest import CHAT, Served
from tests.gateway.test_openai_e2e import wait_usage

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_worker_killed_mid_stream_gives_clean_error(served: Served) -> None:
    stack = served.live.stack
    pool = pool_ensure(name="fragile", region="local", providers=["CPUExecutionProvider"])
    endpoint = Endpoint.objects.create(
        organization=served.org,
        name="fragile-chat",
        pool=pool,
        model_version=served.endpoints[CHAT].model_version,
    )
    endpoint_publish(endpoint)
    worker = stack.worker("fragile", concurrency=4)
    body = {
        "model": endpoint.id,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 1500,
        "stream": True,
    }
    lines: list[str] = []
    started = time.perf_counter()
    with httpx.stream(
        "POST",
        f"{served.live.url}/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"authorization": f"Bearer {served.secret}"},
    ) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 5:
                stack.kill(worker)  # SIGKILL, mid-generation
    elapsed = time.perf_counter() - started
    errors = [line for line in lines if '"error"' in line]
    assert len(errors) == 1, lines[-3:]
    assert '"worker_lost"' in errors[0]
    assert lines[-1] != "data: [DONE]"
    assert elapsed < 45  # well within the request deadline, not a hang
    # The dead worker wrote no usage event: at most one per request.
    assert len(wait_usage(request_id, timeout=2)) == 0
