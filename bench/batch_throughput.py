"""A 100,000-line batch on mantle-echo beside online echo requests on the same stack.

    .venv/bin/python bench/batch_throughput.py [--lines 100000] [--online-seconds 20]

Starts a throwaway platform (bench/platform_stack.py: gateway, one worker, a batch runner),
measures online echo completions per second at concurrency 32 (the baseline), then uploads
a batch of `--lines` echo completions with the official `openai` client, runs it to the end
and reports its lines per second, the runner's peak memory (the input is streamed, never
loaded whole: the peak must not grow with the line count), and that every `custom_id` is in
the output exactly once. Run it alone: two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

from bench.httpload import run_load  # noqa: E402
from bench.platform_stack import BenchStack  # noqa: E402

ECHO = "mantle-echo"


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(pid: int) -> int:
    """The process and its children (the runner's template budget processes too)."""
    total = rss_kib(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            total += tree_rss_kib(int(child))
    return total


class Peak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self.peak = max(self.peak, tree_rss_kib(self.pid))


def write_input(path: Path, lines: int) -> int:
    with path.open("wb") as out:
        for i in range(lines):
            line = {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": ECHO, "prompt": f"echo line number {i}", "max_tokens": 4},
            }
            out.write(json.dumps(line).encode() + b"\n")
    return path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--online-seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8931)
    args = parser.parse_args()

    from openai import OpenAI

    bench = BenchStack()
    bench.bootstrap()
    bench.start(args.port)
    runner = bench.stack.batch_runner("batch-runner", MANTLE_BATCH_POLL_S="0.2")
    try:
        body = {"model": ECHO, "prompt": "echo this line", "max_tokens": 4}
        online = asyncio.run(
            run_load(
                bench.url,
                "/v1/completions",
                body,
                bench.secret,
                concurrency=32,
                seconds=args.online_seconds,
            )
        )
        online_rps = sum(online.statuses.values()) / online.elapsed
        client = OpenAI(base_url=f"{bench.url}/v1", api_key=bench.secret, timeout=600)
        work = Path(tempfile.mkdtemp(prefix="mantle-batch-bench-"))
        size = write_input(work / "input.jsonl", args.lines)
        with (work / "input.jsonl").open("rb") as handle:
            uploaded = client.files.create(file=handle, purpose="batch")
        peak = Peak(runner.popen.pid)
        base_rss = tree_rss_kib(runner.popen.pid)
        peak.start()
        started = time.perf_counter()
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
        )
        while batch.status not in {"completed", "failed", "cancelled", "expired"}:
            time.sleep(1)
            batch = client.batches.retrieve(batch.id)
        elapsed = time.perf_counter() - started
        peak.stopped.set()
        assert batch.status == "completed", (batch.status, batch.errors)
        seen: set[str] = set()
        duplicates = 0
        if batch.output_file_id:
            for raw in client.files.content(batch.output_file_id).iter_lines():
                if raw:
                    custom_id = json.loads(raw)["custom_id"]
                    duplicates += custom_id in seen
                    seen.add(custom_id)
        run_s = (batch.completed_at or 0) - (batch.in_progress_at or 0)
        print(f"\n## Batch throughput ({args.lines} echo lines, input {size / 1e6:.1f} MB)\n")
        print("| measure | batch | online (baseline, same stack) |")
        print("| --- | --- | --- |")
        print(
            f"| requests/s | {args.lines / elapsed:.0f} (create to completed, {elapsed:.0f} s; "
            f"in_progress to completed {run_s} s) | {online_rps:.0f} (concurrency 32, "
            f"{online.elapsed:.0f} s) |"
        )
        print(
            f"| runner memory | {base_rss / 1024:.0f} MB at start, peak {peak.peak / 1024:.0f} "
            "MB | - |"
        )
        print(
            f"| output | {len(seen)} distinct custom_ids, {duplicates} duplicates, "
            f"{batch.request_counts.failed if batch.request_counts else '?'} failed | - |"
        )
        print(f"\nrunner pid {runner.popen.pid}; logs in {bench.var}; cores {os.cpu_count()}")
    finally:
        bench.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
