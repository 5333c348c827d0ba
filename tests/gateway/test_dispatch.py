"""A request that a dead node took but never started is sent again, not left to hang.

A worker takes a message from the broker, claims the request and only then writes its
first event. If it dies in between, the gateway knows no node to watch, the pool still
has live workers, and a Redis broker would hand the message back only after its
visibility timeout (an hour): the client used to wait for the request's deadline. Now
the gateway sends it again (once per dead node) and a live worker takes the claim over.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

from core.redis import get_redis
from gateway import dispatch
from gateway.errors import OpenAIError
from tests.gateway.test_openai_e2e import wait_usage
from tests.support.stack import Stack
from workers import contract

GHOST = "ghost-node"
MATE = "mate-node"


@pytest.fixture
def pool() -> Iterator[str]:
    name = f"dispatch-{uuid.uuid4().hex[:8]}"
    yield name
    broker().delete(f"inference.{name}")
    get_redis().delete(contract.pool_live_key(name))


def broker() -> redis.Redis:
    return redis.Redis.from_url(settings.CELERY_BROKER_URL, decode_responses=True)


def sent_ids(pool: str) -> list[str]:
    return [json.loads(m)["headers"]["id"] for m in broker().lrange(f"inference.{pool}", 0, -1)]


def list_nodes(pool: str, **scores: float) -> None:
    get_redis().zadd(contract.pool_live_key(pool), scores)


def ticket(pool: str, *, deadline_s: float = 20.0, payload: Any = None) -> dispatch.Ticket:
    """A request handed to the broker and taken by some node (never published here)."""
    now = time.time()
    return dispatch.Ticket(
        task=contract.TaskName.GENERATE,
        payload=payload or {"request_id": "x"},
        queue=f"inference.{pool}",
        pool=pool,
        request_id=f"req_{uuid.uuid4().hex}",
        deadline=now + deadline_s,
        submitted_at=now,
    )


def answer(request_id: str, worker: str) -> None:
    key = contract.response_stream_key(request_id)
    client = get_redis()
    client.xadd(key, {"type": "started", "worker": worker, "pool": "p"})
    client.xadd(key, {"type": "delta", "text": "hi", "tokens": "1"})
    client.xadd(
        key,
        {"type": "done", "finish_reason": "stop", "prompt_tokens": "2", "completion_tokens": "1"},
    )


async def collect(t: dispatch.Ticket) -> list[dict[str, str]]:
    return [event async for event in dispatch.events(t)]


async def wait_sent(pool: str, count: int, within_s: float) -> list[str]:
    give_up = time.monotonic() + within_s
    while time.monotonic() < give_up:
        ids = sent_ids(pool)
        if len(ids) >= count:
            return ids
        await asyncio.sleep(0.1)
    return sent_ids(pool)


def test_a_request_taken_by_a_node_that_died_unclaimed_is_sent_again_once(pool: str) -> None:
    # The ghost beat last just now and dies half a second later; its mate lives on.
    now = time.time()
    list_nodes(pool, **{MATE: now + 3600, GHOST: now - contract.HEARTBEAT_TTL_S + 0.5})
    t = ticket(pool)

    async def scenario() -> list[dict[str, str]]:
        reading = asyncio.create_task(collect(t))
        assert await wait_sent(pool, 1, within_s=5) == [t.request_id]
        await asyncio.sleep(2.5)  # more idle polls: the same dead node, no second copy
        assert sent_ids(pool) == [t.request_id]
        answer(t.request_id, MATE)
        return await asyncio.wait_for(reading, 5)

    with asyncio.Runner() as runner:
        events = runner.run(scenario())
    assert [e["type"] for e in events] == ["started", "delta", "done"]
    assert t.resent_for == {GHOST}


def test_a_request_claimed_by_a_node_that_died_is_sent_again(pool: str) -> None:
    # The owner's listing is already pruned; only its claim is left.
    list_nodes(pool, **{MATE: time.time() + 3600})
    t = ticket(pool)
    get_redis().set(contract.task_claim_key(t.request_id), GHOST, ex=60)

    async def scenario() -> list[str]:
        reading = asyncio.create_task(collect(t))
        ids = await wait_sent(pool, 1, within_s=5)
        await asyncio.sleep(2.5)
        answer(t.request_id, MATE)
        await asyncio.wait_for(reading, 5)
        return ids

    with asyncio.Runner() as runner:
        assert runner.run(scenario()) == [t.request_id]
    assert sent_ids(pool) == [t.request_id]


@pytest.mark.parametrize("claimed_by", [None, MATE])
def test_a_request_queued_or_claimed_by_a_live_node_is_not_sent_again(
    pool: str, claimed_by: str | None
) -> None:
    list_nodes(pool, **{MATE: time.time() + 3600})
    t = ticket(pool, deadline_s=3.0)
    if claimed_by:
        get_redis().set(contract.task_claim_key(t.request_id), claimed_by, ex=60)
    with asyncio.Runner() as runner, pytest.raises(OpenAIError) as caught:
        runner.run(collect(t))
    assert caught.value.code == "timeout"
    assert sent_ids(pool) == []


def test_a_pool_without_live_workers_is_no_capacity(pool: str) -> None:
    list_nodes(pool, **{GHOST: time.time() - contract.HEARTBEAT_TTL_S - 1})
    t = ticket(pool)
    with asyncio.Runner() as runner, pytest.raises(OpenAIError) as caught:
        runner.run(collect(t))
    assert caught.value.status == 503
    assert sent_ids(pool) == []


def test_a_second_node_starting_the_same_request_ends_it_cleanly(pool: str) -> None:
    list_nodes(pool, **{MATE: time.time() + 3600})
    t = ticket(pool)
    key = contract.response_stream_key(t.request_id)
    get_redis().xadd(key, {"type": "started", "worker": GHOST, "pool": pool})
    get_redis().xadd(key, {"type": "delta", "text": "a", "tokens": "1"})
    get_redis().xadd(key, {"type": "started", "worker": MATE, "pool": pool})
    seen: list[str] = []

    async def read() -> None:
        async for event in dispatch.events(t):
            seen.append(event["type"])

    with asyncio.Runner() as runner, pytest.raises(OpenAIError) as caught:
        runner.run(read())
    assert caught.value.code == "worker_lost"
    assert seen == ["started", "delta"]


@pytest.mark.e2e
def test_a_live_worker_runs_what_a_dead_node_held(pool: str) -> None:
    """Through a real Celery worker: the resent copy runs, and a dead owner's claim is
    taken over (nothing had been written or billed for it)."""
    stack = Stack.for_tests()
    try:
        node = stack.worker(pool, name="handover", concurrency=2).node
        now = time.time()
        list_nodes(pool, **{GHOST: now - contract.HEARTBEAT_TTL_S + 0.5})
        unclaimed = ticket(pool, payload=None)
        claimed = ticket(pool, payload=None)
        for t in (unclaimed, claimed):
            t.payload = contract.to_payload(echo(t.request_id, t.deadline))
        get_redis().set(contract.task_claim_key(claimed.request_id), GHOST, ex=60)

        async def both() -> list[list[dict[str, str]]]:
            return list(
                await asyncio.wait_for(asyncio.gather(collect(unclaimed), collect(claimed)), 30)
            )

        with asyncio.Runner() as runner:
            answers = runner.run(both())
        for events in answers:
            assert [e["type"] for e in events] == ["started", "delta", "done"], events
            assert events[0]["worker"] == node
        assert get_redis().get(contract.task_claim_key(claimed.request_id)) == node
        # Once each: the usage event follows the answer's last event.
        for t in (unclaimed, claimed):
            assert [u["worker"] for u in wait_usage(t.request_id)] == [node]
    finally:
        stack.stop_all()


def echo(request_id: str, deadline: float) -> contract.GenerateRequest:
    return contract.GenerateRequest(
        request_id=request_id,
        model=contract.ModelRef("echo-dispatch", "echo", "e" * 64, ""),
        identity=contract.BillingIdentity("org", "proj", "key", "ep", "mv", "echo"),
        prompt_token_ids=(5, 6, 7),
        sampling=contract.SamplingParams(max_tokens=2, temperature=0.0),
        deadline=deadline,
        enqueued_at=time.time(),
    )
