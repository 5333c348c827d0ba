"""Platform overhead with the zero-compute echo model: requests/s and latency percentiles.

Auth, rate limits, dispatch through Celery and the worker's usage metering are all on.
Run alone on the machine:  .venv/bin/python bench/overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from httpload import run_load  # noqa: E402
from platform_stack import BenchStack  # noqa: E402

BODY = {"model": "mantle-echo", "prompt": "Hello there, how are you?", "max_tokens": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--gateway-procs", type=int, default=2)
    parser.add_argument("--worker-procs", type=int, default=2)
    parser.add_argument("--worker-threads", type=int, default=32)
    args = parser.parse_args()
    stack = BenchStack()
    stack.bootstrap()
    out: dict[str, dict[str, object]] = {}
    try:
        stack.start(
            8890,
            gateway_procs=args.gateway_procs,
            worker_procs=args.worker_procs,
            worker_threads=args.worker_threads,
        )
        asyncio.run(
            run_load(stack.url, "/v1/completions", BODY, stack.secret, concurrency=4, requests=200)
        )
        # Baseline in the same run: the gateway with authentication and the endpoint
        # lookup but no dispatch (GET /v1/models/mantle-echo): the ASGI server, Django
        # and one Redis round trip, without the trip through Celery and a worker.
        for concurrency in (1, 32):
            r = asyncio.run(
                run_load(
                    stack.url,
                    "/v1/models/mantle-echo",
                    None,
                    stack.secret,
                    concurrency=concurrency,
                    seconds=args.seconds / 2,
                )
            )
            out[f"baseline_models_c{concurrency}"] = {
                "rps": round(len(r.latencies) / r.elapsed, 1),
                "p50_ms": round(r.pct(50), 2),
                "p99_ms": round(r.pct(99), 2),
            }
        for concurrency in (1, 32):
            r = asyncio.run(
                run_load(
                    stack.url,
                    "/v1/completions",
                    BODY,
                    stack.secret,
                    concurrency=concurrency,
                    seconds=args.seconds,
                )
            )
            out[f"echo_c{concurrency}"] = {
                "requests": len(r.latencies),
                "rps": round(len(r.latencies) / r.elapsed, 1),
                "p50_ms": round(r.pct(50), 2),
                "p99_ms": round(r.pct(99), 2),
                "statuses": r.statuses,
            }
    finally:
        stack.stop()
    out["config"] = {
        "gateway_procs": args.gateway_procs,
        "worker_procs": args.worker_procs,
        "worker_threads": args.worker_threads,
        "seconds": args.seconds,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
