"""Usage drain throughput into PostgreSQL with hourly rollups, beside a per-event ORM baseline.

Uses its own database (created, migrated and dropped here) and its own Redis database.
Run alone on the machine:  .venv/bin/python bench/drain.py [--events 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

BASELINE_STREAM = "mantle:usage:bench-baseline"
MODELS = ("smollm2-135m-instruct", "all-minilm-l6-v2", "mantle-echo")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000, help="events for the drain")
    parser.add_argument("--baseline-events", type=int, default=2_000, help="events, ORM path")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument(
        "--drains",
        type=int,
        default=1,
        help="drain processes at once (`manage.py drain_usage --once`, one consumer each); "
        "1 runs the drain in this process and reports its CPU split",
    )
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--database", default="mantle_bench_drain")
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/2")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    return parser.parse_args()


def recreate_database(args: argparse.Namespace) -> None:
    import psycopg

    with psycopg.connect(f"{args.pg}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{args.database}"')
        conn.execute(f'CREATE DATABASE "{args.database}"')


def drop_database(args: argparse.Namespace) -> None:
    import psycopg

    with psycopg.connect(f"{args.pg}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')


def make_events(count: int, orgs: int, seed: int) -> list[Any]:
    from workers.contract import UsageEvent

    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits
    # In stream order, as workers append them: finished over the last two hours.
    start = time.time() - 7200
    step = 7200 / count
    events = []
    for i in range(count):
        org = rng.randrange(orgs)
        model = rng.randrange(len(MODELS))  # an endpoint serves one model version
        finished = start + i * step
        events.append(
            UsageEvent(
                request_id="req_" + "".join(rng.choices(alphabet, k=24)),
                organization_id=f"org_{org:020d}",
                project_id=f"proj_{org:019d}",
                api_key_id=f"key_{org:016d}{rng.randrange(5):04d}",
                endpoint_id=f"ep-{model:016d}",
                model_version_id=f"mv_{model:020d}",
                model_name=MODELS[model],
                input_tokens=rng.randrange(1, 4000),
                output_tokens=rng.randrange(0, 1000),
                status="stop",
                started_at=finished - rng.uniform(0.05, 20),
                finished_at=finished,
                queue_ms=rng.randrange(0, 50),
                compute_ms=rng.randrange(10, 20000),
                worker=f"cpu-{rng.randrange(8)}",
            )
        )
    return events


def emit(client: Any, stream: str, events: list[Any]) -> None:
    for start in range(0, len(events), 10_000):
        pipe = client.pipeline(transaction=False)
        for event in events[start : start + 10_000]:
            pipe.xadd(stream, event.to_fields())
        pipe.execute()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a local process (Linux), to tell who the time went to."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_drain(client: Any, batch: int) -> tuple[float, dict[str, float]]:
    """Seconds for the drain, and the CPU seconds of the drain, its PostgreSQL backend and
    Redis: their sum over the machine's cores bounds the throughput on a quiet machine."""
    from django.db import connection

    from billing.metering.drain import Drain, tune_gc_for_draining

    tune_gc_for_draining()  # as `manage.py drain_usage` does
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = int(cursor.fetchone()[0])
    redis_pid = int(client.info("server")["process_id"])
    pids = {"drain": os.getpid(), "postgres": backend, "redis": redis_pid}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    drain = Drain(consumer="bench", client=client, batch_size=batch)  # the registered hooks
    started = time.perf_counter()
    drain.run(stop=threading.Event(), once=True)
    elapsed = time.perf_counter() - started
    return elapsed, {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}


def run_drain_processes(count: int, batch: int) -> float:
    """Seconds until `count` real drain processes, started together, emptied the stream.

    Wall time from their start, so each one's Django start-up (about a second) is
    counted against the throughput.
    """
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}"}
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "drain_usage",
                "--once",
                "--batch",
                str(batch),
                "--consumer",
                f"bench-{i}",
            ],
            cwd=ROOT,
            env=env,
        )
        for i in range(count)
    ]
    codes = [proc.wait() for proc in procs]
    elapsed = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"a drain process failed: exit codes {codes}")
    return elapsed


def run_baseline(client: Any, count: int) -> float:
    """The naive way: read, then per event one ORM insert and one F() rollup update."""
    from datetime import UTC, datetime

    from django.db import transaction
    from django.db.models import F

    from billing.models import UsageEvent, UsageRollup
    from workers.contract import UsageEvent as Contract

    client.xgroup_create(BASELINE_STREAM, "baseline", id="0", mkstream=True)
    started = time.perf_counter()
    done = 0
    while done < count:
        reply = client.xreadgroup("baseline", "orm", {BASELINE_STREAM: ">"}, count=100)
        if not reply:
            break
        entries = reply[BASELINE_STREAM] if isinstance(reply, dict) else reply[0][1]
        for entry_id, fields in entries:
            event = Contract.from_fields(fields)
            occurred = datetime.fromtimestamp(event.finished_at, UTC)
            hour = occurred.replace(minute=0, second=0, microsecond=0)
            with transaction.atomic():
                UsageEvent.objects.create(
                    request_id=event.request_id,
                    occurred_at=occurred,
                    organization_id=event.organization_id,
                    project_id=event.project_id,
                    api_key_id=event.api_key_id,
                    endpoint_id=event.endpoint_id,
                    model_version_id=event.model_version_id,
                    model_name=event.model_name,
                    input_tokens=event.input_tokens,
                    output_tokens=event.output_tokens,
                    status=event.status,
                    started_at=datetime.fromtimestamp(event.started_at, UTC),
                    queue_ms=event.queue_ms,
                    compute_ms=event.compute_ms,
                    worker=event.worker,
                )
                dims = {
                    "organization_id": event.organization_id,
                    "project_id": event.project_id,
                    "api_key_id": event.api_key_id,
                    "endpoint_id": event.endpoint_id,
                    "model_name": event.model_name,
                    "hour": hour,
                }
                updated = UsageRollup.objects.filter(**dims).update(
                    requests=F("requests") + 1,
                    input_tokens=F("input_tokens") + event.input_tokens,
                    output_tokens=F("output_tokens") + event.output_tokens,
                    compute_ms=F("compute_ms") + event.compute_ms,
                )
                if not updated:
                    UsageRollup.objects.create(
                        **dims,
                        requests=1,
                        input_tokens=event.input_tokens,
                        output_tokens=event.output_tokens,
                        compute_ms=event.compute_ms,
                    )
            client.xack(BASELINE_STREAM, "baseline", entry_id)
            done += 1
    return time.perf_counter() - started


def price_models() -> None:
    """List prices for the events' models, as every model the gateway admits has: the drain
    processes run the wallet's hook, which rates each batch (an unpriced model would send
    it to the database for every batch and log an error per organization)."""
    from datetime import UTC, datetime, timedelta

    from billing.models import Price

    since = datetime.now(UTC) - timedelta(days=1)
    for model in MODELS:
        for kind, price in (("input", "0.10"), ("output", "0.40")):
            Price.objects.create(
                model_name=model, token_kind=kind, unit_price=price, effective_from=since
            )


def check_exact(events: list[Any]) -> bool:
    from billing.metering.store import rollup_totals
    from billing.models import UsageEvent

    expected = {
        "requests": len(events),
        "input_tokens": sum(e.input_tokens for e in events),
        "output_tokens": sum(e.output_tokens for e in events),
        "compute_ms": sum(e.compute_ms for e in events),
    }
    return rollup_totals() == expected and UsageEvent.objects.count() == len(events)


def main() -> None:
    args = parse_args()
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DJANGO_SECRET_KEY": "bench-only-secret",
        "MANTLE_API_KEY_PEPPER": "bench-only-pepper",
        "MANTLE_IDENTITY_KEY": "bench-only-identity-key",
        "DATABASE_URL": f"{args.pg}/{args.database}",
        "REDIS_URL": args.redis,
        "CELERY_BROKER_URL": args.redis,
        "MANTLE_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    recreate_database(args)
    try:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v", "0"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}"},
            check=True,
        )
        import django

        django.setup()
        import redis
        import redis.utils
        from django.db import connection

        from billing.models import UsageEvent, UsageRollup

        client = redis.Redis.from_url(args.redis, decode_responses=True)
        client.flushdb()

        price_models()
        drain_events = make_events(args.events, args.orgs, seed=1)
        emit(client, "mantle:usage", drain_events)
        if args.drains > 1:
            drain_s, cpu = run_drain_processes(args.drains, args.batch), {}
        else:
            drain_s, cpu = run_drain(client, args.batch)
        drain_exact = check_exact(drain_events)

        UsageEvent.objects.all().delete()
        UsageRollup.objects.all().delete()
        baseline_events = make_events(args.baseline_events, args.orgs, seed=2)
        emit(client, BASELINE_STREAM, baseline_events)
        baseline_s = run_baseline(client, len(baseline_events))
        baseline_exact = check_exact(baseline_events)

        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            pg_version = cursor.fetchone()[0]
        client.flushdb()
        drain_rate = args.events / drain_s
        baseline_rate = args.baseline_events / baseline_s
        print(
            json.dumps(
                {
                    "drain": {
                        "events": args.events,
                        "batch": args.batch,
                        "processes": args.drains,
                        "seconds": round(drain_s, 2),
                        "events_per_s": round(drain_rate),
                        "exact": drain_exact,
                        "cpu_us_per_event": {
                            name: round(seconds / args.events * 1e6, 2)
                            for name, seconds in cpu.items()
                        },
                    },
                    "orm_baseline": {
                        "events": args.baseline_events,
                        "seconds": round(baseline_s, 2),
                        "events_per_s": round(baseline_rate),
                        "exact": baseline_exact,
                    },
                    "speedup": round(drain_rate / baseline_rate, 1),
                    "organizations": args.orgs,
                    "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
                    "postgresql": pg_version,
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
        )
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            drop_database(args)


if __name__ == "__main__":
    main()
