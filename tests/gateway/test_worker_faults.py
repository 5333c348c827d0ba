"""A worker killed in the middle of a request: the client gets a clean error, never a hang."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from catalog.models import Endpoint
from catalog.services import endpoint_publish, pool_ensure
from tests.gateway.conftest import CHAT, Served
from tests.gateway.test_openai_e2e import wait_usage

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]


def endpoint_on(served: Served, pool_name: str) -> Endpoint:
    pool = pool_ensure(name=pool_name, region="local", providers=["CPUExecutionProvider"])
    endpoint = Endpoint.objects.create(
        organization=served.org,
        name=f"{pool_name}-chat",
        pool=pool,
        model_version=served.endpoints[CHAT].model_version,
    )
    endpoint_publish(endpoint)
    return endpoint


def stream_and(served: Served, endpoint: Endpoint, after_5_lines: Callable[[], None]) -> list[str]:
    """Streams a long story and calls `after_5_lines` mid-generation; the lines it read."""
    body = {
        "model": endpoint.id,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 1500,
        "stream": True,
    }
    lines: list[str] = []
    with httpx.stream(
        "POST",
        f"{served.live.url}/v1/chat/completions",
        json=body,
        timeout=60,
        headers={"authorization": f"Bearer {served.secret}"},
    ) as response:
        lines.append(response.headers["x-request-id"])
        for line in response.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 6:
                after_5_lines()
    return lines


def test_worker_killed_mid_stream_gives_clean_error(served: Served) -> None:
    stack = served.live.stack
    endpoint = endpoint_on(served, "fragile")
    worker = stack.worker("fragile", concurrency=4)
    started = time.perf_counter()
    request_id, *lines = stream_and(served, endpoint, lambda: stack.kill(worker))  # SIGKILL
    elapsed = time.perf_counter() - started
    errors = [line for line in lines if '"error"' in line]
    assert len(errors) == 1, lines[-3:]
    assert '"worker_lost"' in errors[0]
    assert lines[-1] != "data: [DONE]"
    assert elapsed < 45  # well within the request deadline, not a hang
    # The dead worker wrote no usage event: at most one per request.
    assert len(wait_usage(request_id, timeout=2)) == 0


def test_worker_killed_and_restarted_under_its_name_still_ends_the_stream(
    served: Served,
) -> None:
    """A container restarted in its pod keeps its node name: back within the heartbeat
    TTL, it would look alive throughout and the stream would wait for its deadline."""
    stack = served.live.stack
    endpoint = endpoint_on(served, "phoenix")
    worker = stack.worker("phoenix", name="phoenix", concurrency=4)
    reborn: list[str] = []

    def kill_and_restart() -> None:
        stack.kill(worker)
        # Back and beating (stack.worker waits for its first beat) before the stream ends.
        reborn.append(stack.worker("phoenix", name="phoenix", concurrency=4).node)

    _, *lines = stream_and(served, endpoint, kill_and_restart)
    assert reborn == [worker.node]
    errors = [line for line in lines if '"error"' in line]
    assert len(errors) == 1 and '"worker_lost"' in errors[0], lines[-3:]
    # The node serves again under its name.
    reply = served.client().chat.completions.create(
        model=endpoint.id, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
