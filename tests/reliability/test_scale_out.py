"""Several gateways and pools on one machine: a worker killed, and traffic carries on elsewhere."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from core.redis import get_redis
from tests.reliability.conftest import Tenant, tenant_on
from tests.reliability.support import Load, Outcome, call, check_usage_exactly_once, wait_until
from tests.support.stack import Process, Stack, builtin_manifests
from workers.contract import worker_info_key
from workers.serving import CRASH_AFTER_ANSWER, CRASH_ENV, CRASH_POINTS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(300),
    pytest.mark.models,
]

STORY = "Write a long story about a lighthouse keeper and the sea, with many details."


@dataclass
class TwoGateways:
    stack: Stack
    urls: list[str]
    manifests: list[dict[str, Any]]


@pytest.fixture(scope="module")
def gateways(django_db_setup: None, django_db_blocker: Any) -> Iterator[TwoGateways]:
    manifests = builtin_manifests()
    stack = Stack.for_tests()
    try:
        _, first = stack.gateway(name="rel-scale-gateway-1")
        _, second = stack.gateway(name="rel-scale-gateway-2")
        yield TwoGateways(stack=stack, urls=[first, second], manifests=manifests)
    finally:
        stack.stop_all()


def free_slots(proc: Process) -> int:
    info = json.loads(get_redis().get(worker_info_key(proc.node)) or "{}")
    return int(info.get("free_slots", -1))


def workers_of(outcomes: list[Outcome]) -> dict[str, str]:
    from tests.reliability.support import await_usage_events, usage_by_request

    await_usage_events(outcomes, get_redis())
    events = usage_by_request(get_redis())
    return {
        o.request_id: events[o.request_id][0]["worker"] for o in outcomes if o.request_id in events
    }


def test_worker_killed_mid_stream_while_its_pool_mate_keeps_serving(
    gateways: TwoGateways, transactional_db: None
) -> None:
    # Two organizations, two streams each: one organization alone holds at most
    # MANTLE_FAIR_POOL_ORG_SHARE (0.75) of the pool's four slots, and the four streams
    # must fill both workers.
    tenants: list[Tenant] = [tenant_on("relalpha", gateways.manifests) for _ in range(2)]
    tenant = tenants[0]
    stack = gateways.stack
    doomed = stack.worker("relalpha", name="rel-alpha-1", concurrency=2)
    survivor = stack.worker("relalpha", name="rel-alpha-2", concurrency=2)
    try:
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def stream(url: str, owner: Tenant) -> None:
            outcome = call(
                url,
                owner.secret,
                owner.chat.id,
                stream=True,
                content=STORY,
                # Long enough that no stream can end before the kill (the 4-bit model
                # decoded 400 tokens before both workers were full), end of sequence
                # biased away (SmolLM2's id 2).
                max_tokens=1000,
                timeout=120,
                extra={"logit_bias": {"2": -100}},
            )
            with lock:
                outcomes.append(outcome)

        threads = [
            threading.Thread(target=stream, args=(gateways.urls[i % 2], tenants[i // 2]))
            for i in range(4)
        ]
        for thread in threads:
            thread.start()
        # Both workers full (two streams each, their whole concurrency): kill one.
        assert wait_until(lambda: free_slots(doomed) == 0 and free_slots(survivor) == 0, 90)
        time.sleep(1.0)
        stack.kill(doomed)
        for thread in threads:
            thread.join(timeout=150)
        assert not any(t.is_alive() for t in threads), "a stream hung"
        lost = [o for o in outcomes if o.error_code is not None]
        finished = [o for o in outcomes if o.done]
        assert all(not o.transport_error and o.status == 200 for o in outcomes), outcomes
        assert [o.error_code for o in lost] == ["worker_lost", "worker_lost"], outcomes
        assert len(finished) == 2 and all(o.usage for o in finished), outcomes
        assert set(workers_of(finished).values()) == {survivor.node}
        # The pool keeps serving on its remaining worker, through both gateways.
        after = [
            call(url, tenant.secret, tenant.echo.id, stream=False, timeout=60)
            for url in gateways.urls * 3
        ]
        assert [o.status for o in after] == [200] * 6
        assert set(workers_of(after).values()) == {survivor.node}
        check_usage_exactly_once(outcomes + after, get_redis())
        # The dead worker left no usage event for what it was streaming.
        assert not (set(workers_of(lost).values()) & {doomed.node})
    finally:
        stack.stop(survivor)
        stack.kill(doomed)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_worker_dying_with_a_request_it_had_not_started_loses_nothing(
    gateways: TwoGateways, transactional_db: None, point: str
) -> None:
    """A worker that took a request from the broker and died before writing anything
    (before or after claiming it): the client still gets its answer, from the pool mate.

    The doomed worker exits (os._exit) at `point` of the first request it takes; requests
    go one at a time until it has taken one. Without the gateway sending such a request
    again, its client waited for the deadline (a Redis broker gives the message back only
    after its visibility timeout)."""
    pool = f"relhold{CRASH_POINTS.index(point)}"
    tenant = tenant_on(pool, gateways.manifests)
    stack = gateways.stack
    doomed = stack.worker(pool, name=f"rel-hold-{point}", concurrency=2, **{CRASH_ENV: point})
    mate = stack.worker(pool, name=f"rel-hold-mate-{point}", concurrency=2)
    try:
        outcomes: list[Outcome] = []
        for i in range(24):
            url = gateways.urls[i % 2]
            outcomes.append(call(url, tenant.secret, tenant.echo.id, stream=i % 2 == 0, timeout=60))
            if not doomed.alive():
                break
        assert not doomed.alive(), "the doomed worker never took a request"
        for outcome in outcomes:
            assert not outcome.transport_error and outcome.status == 200, outcome
            assert outcome.error_code is None and outcome.usage, outcome
        assert set(workers_of(outcomes).values()) == {mate.node}
        check_usage_exactly_once(outcomes, get_redis())
    finally:
        stack.stop(mate)
        stack.kill(doomed)


@pytest.mark.parametrize("model,stream", [("echo", False), ("chat", True)])
def test_a_worker_dying_right_after_it_answered_has_billed_the_answer(
    gateways: TwoGateways, transactional_db: None, model: str, stream: bool
) -> None:
    """The worker exits (os._exit) the moment its engine has answered its first request:
    the final event is in Redis, the broker message is not acknowledged, and nothing of the
    task after the answer runs. The client has its answer, so it is billed, exactly once:
    its usage event went in one transaction with the final event. (When the task appended
    it afterwards, a kill in between left an answered request unbilled, and a redelivered
    copy found the final event and took the request as finished.)"""
    pool = f"relanswered{int(stream)}"
    tenant = tenant_on(pool, gateways.manifests)
    stack = gateways.stack
    doomed = stack.worker(
        pool, name=f"rel-answered-{model}", concurrency=2, **{CRASH_ENV: CRASH_AFTER_ANSWER}
    )
    try:
        endpoint = tenant.echo if model == "echo" else tenant.chat
        outcome = call(
            gateways.urls[0], tenant.secret, endpoint.id, stream=stream, max_tokens=8, timeout=90
        )
        assert wait_until(lambda: not doomed.alive(), 30), "the worker did not exit"
        assert not outcome.transport_error and outcome.status == 200, outcome
        assert outcome.error_code is None and outcome.usage, outcome
        assert workers_of([outcome]) == {outcome.request_id: doomed.node}
        check_usage_exactly_once([outcome], get_redis())
    finally:
        stack.kill(doomed)


def test_two_gateways_two_pools_one_worker_killed_traffic_continues(
    gateways: TwoGateways, transactional_db: None
) -> None:
    stack = gateways.stack
    east = tenant_on("releast", gateways.manifests)
    west = tenant_on("relwest", gateways.manifests)
    victim = stack.worker("releast", name="rel-east-1", concurrency=4)
    east_mate = stack.worker("releast", name="rel-east-2", concurrency=4)
    west_worker = stack.worker("relwest", name="rel-west-1", concurrency=4)
    try:
        loads = {
            "east": Load(gateways.urls, east.secret, east.echo.id, threads=2).start(),
            "west": Load(gateways.urls, west.secret, west.echo.id, threads=2).start(),
        }
        assert wait_until(lambda: all(load.count() >= 20 for load in loads.values()), 90)
        stack.kill(victim)
        killed_at = {name: load.count() for name, load in loads.items()}
        assert wait_until(
            lambda: all(load.count() >= killed_at[n] + 30 for n, load in loads.items()), 120
        )
        results = {name: load.stop() for name, load in loads.items()}
        for name, outcomes in results.items():
            for outcome in outcomes:
                assert not outcome.transport_error, outcome
                assert outcome.status in (200,), outcome
                assert outcome.error_code in (None, "worker_lost"), outcome
            # Both gateways carried traffic, and the last requests all succeeded.
            assert {o.url for o in outcomes} == set(gateways.urls)
            assert all(o.error_code is None and o.usage for o in outcomes[-10:]), name
        # West never noticed; east continued on the surviving worker.
        assert all(o.error_code is None for o in results["west"])
        late_east = results["east"][killed_at["east"] + 10 :]
        assert set(workers_of(late_east).values()) == {east_mate.node}
        assert set(workers_of(results["west"]).values()) == {west_worker.node}
        check_usage_exactly_once(results["east"] + results["west"], get_redis())
    finally:
        for proc in (victim, east_mate, west_worker):
            stack.stop(proc)
    # This process is still on the suite's own Redis (the URL bin/test set), and it answers:
    # the kill took down a worker, nothing this test process depends on.
    suite_url = os.environ["REDIS_URL"]
    assert suite_url == settings.REDIS_URL
    shared = get_redis().connection_pool.connection_kwargs
    suite = urlsplit(suite_url)
    assert (shared["port"], shared["db"]) == (suite.port or 6379, int(suite.path[1:] or 0))
    assert get_redis().ping()
