"""The drain as real processes: killed at each step, run twice at once, stopped by SIGTERM."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

import pytest

from billing.metering import drain
from core.redis import get_redis
from tests.billing.metering_support import (
    UsageEventFactory,
    cached_spend,
    emit,
    expected_totals,
    outbox_count,
    pending_count,
    raw_totals,
    rollup_totals,
    spend,
)
from tests.support.stack import ROOT, Stack
from workers.contract import UsageEvent as ContractEvent

pytestmark = [
    pytest.mark.drain_process,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(180),
]

ORGS = ("org_acme", "org_globex", "org_initech")
COUNTED = re.compile(r"batches, (\d+) counted")


def make_events(count: int, seed: int = 7) -> list[ContractEvent]:
    rng = random.Random(seed)
    return [
        UsageEventFactory(
            organization_id=rng.choice(ORGS),
            api_key_id=f"key_{rng.randrange(4)}",
            input_tokens=rng.randrange(1, 5000),
            output_tokens=rng.randrange(0, 2000),
        )
        for _ in range(count)
    ]


def drain_command(*args: str) -> list[str]:
    return [sys.executable, "manage.py", "drain_usage", *args]


def drain_env(crash_at: str = "", crash_after: int = 0) -> dict[str, str]:
    env = Stack.for_tests().env
    env.pop(drain.CRASH_ENV, None)
    if crash_at:
        env[drain.CRASH_ENV] = crash_at
        env[drain.CRASH_AFTER_ENV] = str(crash_after)
    return env


def run_drain(
    *args: str, crash_at: str = "", crash_after: int = 0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        drain_command("--once", *args),
        cwd=ROOT,
        env=drain_env(crash_at, crash_after),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_counted_exactly(events: Sequence[ContractEvent]) -> None:
    client = get_redis()
    assert raw_totals() == expected_totals(events)
    assert rollup_totals() == expected_totals(events)
    per_org: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for event in events:
        per_org[event.organization_id][0] += event.input_tokens
        per_org[event.organization_id][1] += event.output_tokens
        per_org[event.organization_id][2] += event.cached_input_tokens
    for org, (tokens_in, tokens_out, tokens_cached) in per_org.items():
        assert spend(client, org) == (tokens_in, tokens_out)
        assert cached_spend(client, org) == tokens_cached
    assert pending_count(client) == 0
    assert outbox_count() == 0


@pytest.mark.parametrize("point", drain.CRASH_POINTS)
def test_drain_killed_at_each_step_loses_nothing_and_counts_nothing_twice(point: str) -> None:
    client = get_redis()
    events = make_events(3000)
    emit(client, events)

    crashed = run_drain("--batch", "1000", "--consumer", "d1", crash_at=point, crash_after=1)

    assert crashed.returncode == 1, crashed.stderr[-3000:]
    committed = 2000 if point in ("before_spend", "after_commit_before_ack") else 1000
    assert raw_totals().requests == committed
    assert pending_count(client) >= 1000  # the batch it died in was never acknowledged
    assert outbox_count() == (1 if point == "before_spend" else 0)

    restarted = run_drain("--batch", "1000", "--consumer", "d1")

    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert_counted_exactly(events)


def test_entries_of_a_killed_drain_are_claimed_by_another() -> None:
    client = get_redis()
    events = make_events(2000, seed=11)
    emit(client, events)
    crashed = run_drain(
        "--batch", "500", "--consumer", "dead", crash_at="after_commit_before_ack", crash_after=1
    )
    assert crashed.returncode == 1, crashed.stderr[-3000:]

    other = run_drain("--batch", "500", "--consumer", "alive", "--claim-idle", "0")

    assert other.returncode == 0, other.stderr[-3000:]
    assert_counted_exactly(events)


def test_two_drains_at_once_count_20k_events_exactly() -> None:
    client = get_redis()
    events = make_events(20_000, seed=3)
    emit(client, events)
    env = drain_env()

    drains = [
        subprocess.Popen(
            drain_command("--once", "--batch", "2000", "--consumer", name),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("left", "right")
    ]
    outputs = [proc.communicate(timeout=120)[1] for proc in drains]

    assert [proc.returncode for proc in drains] == [0, 0], outputs
    assert_counted_exactly(events)
    counted = [int(m[1]) for out in outputs for m in COUNTED.finditer(out)]
    assert sum(counted) == len(events)  # each event counted by exactly one of them


def test_sigterm_stops_the_drain_after_its_batch() -> None:
    client = get_redis()
    events = make_events(500, seed=5)
    emit(client, events)
    proc = subprocess.Popen(
        drain_command("--batch", "100", "--consumer", "svc"),
        cwd=ROOT,
        env=drain_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while raw_totals().requests < len(events) and time.monotonic() < deadline:
            time.sleep(0.2)
        later = make_events(50, seed=6)
        emit(client, later)
        while raw_totals().requests < len(events) + len(later) and time.monotonic() < deadline:
            time.sleep(0.2)

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped after" in stderr
    assert_counted_exactly([*events, *later])
