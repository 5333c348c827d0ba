"""Bounded load (about 25 s): two gateways, two workers, zero errors, usage recorded as returned."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from bench.load import compare, drive_and_sample
from billing.models import UsageEvent
from tests.reliability.conftest import tenant_on
from tests.support.stack import ROOT, Stack, builtin_manifests

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(300),
    pytest.mark.models,
]

SECONDS = 25.0
CLIENTS = {"stream": 6, "plain": 6}  # requests held in flight, streamed and not
POOL = "relload"


def test_steady_mixed_load_has_no_errors_bounded_memory_and_exact_usage() -> None:
    manifests = builtin_manifests()
    tenant = tenant_on(POOL, manifests)
    stack = Stack.for_tests()
    try:
        processes = {}
        urls = []
        for i in range(2):
            proc, url = stack.gateway(name=f"rel-load-gateway-{i}")
            processes[proc.name] = proc.popen.pid
            urls.append(url)
        for i in range(2):
            proc = stack.worker(POOL, name=f"rel-load-worker-{i}", concurrency=32)
            processes[proc.name] = proc.popen.pid
        result, sampler = asyncio.run(
            drive_and_sample(
                urls,
                tenant.secret,
                tenant.echo.id,
                processes,
                streaming=CLIENTS["stream"],
                plain=CLIENTS["plain"],
                seconds=SECONDS,
            )
        )
    finally:
        stack.stop_all()
    assert result.errors == []
    # The load was real, whatever this machine's speed (requests per second are bench/'s):
    # all twelve clients kept a request in flight for the whole run, back to back, and
    # every answer carried usage.
    for kind, count in CLIENTS.items():
        assert sum(result.latencies[kind]) >= 0.9 * count * SECONDS, (kind, result.summary())
    assert len(result.usage) == sum(len(v) for v in result.latencies.values()) > 0
    # The metering drain, as a real process, turns the usage stream into billed rows.
    drained = subprocess.run(
        [sys.executable, "manage.py", "drain_usage", "--once", "--consumer", "rel-load"],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert drained.returncode == 0, drained.stderr[-2000:]
    recorded = {
        rid: (i, o)
        for rid, i, o in UsageEvent.objects.filter(organization_id=tenant.org.id).values_list(
            "request_id", "input_tokens", "output_tokens"
        )
    }
    report = compare(result.usage, recorded)
    assert report["equal"], report
    # Memory after warm-up stays flat: no per-request leak in gateways or workers.
    growth = sampler.growth_kib()
    assert set(growth) == set(processes)
    assert all(kib < 48 * 1024 for kib in growth.values()), sampler.summary()
