"""Batches on a real stack, each figure beside its baseline measured in the same run.

    .venv/bin/python bench/batch_throughput.py [--lines 100000] [--online-seconds 20]

Starts a throwaway platform (bench/platform_stack.py: gateway, one worker, a batch runner)
and measures, with the official `openai` client for the batches:

1. **Online latency while a batch runs**: the time to first token of online chat requests
   (SmolLM2, streamed, one at a time), idle and while a chat batch runs on the same pool.
2. **A batch alone fills the pool**: a chat batch's completion tokens per second with no
   online traffic, beside online chat at concurrency 32 (the pool's full use).
3. **A 100,000-line batch on mantle-echo**: lines per second beside online echo requests per
   second at concurrency 32, the runner's peak memory (the input is streamed, never loaded
   whole), and every `custom_id` once in the output.

Run it alone: two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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


CHAT = "smollm2-135m-instruct"


def chat_lines(count: int, max_tokens: int) -> bytes:
    out = []
    for i in range(count):
        line = {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": CHAT,
                "messages": [{"role": "user", "content": f"Tell me a story about item {i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        }
        out.append(json.dumps(line).encode() + b"\n")
    return b"".join(out)


def ttft_ms(client: Any, count: int) -> list[float]:
    """Times to first token of `count` streamed chat requests sent one after another."""
    found = []
    for i in range(count):
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": f"Say hello number {i}."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
        found.append(((first or time.perf_counter()) - started) * 1000)
    return found


def run_batch(client: Any, data: bytes, endpoint: str, name: str) -> Any:
    uploaded = client.files.create(file=(name, io.BytesIO(data)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h"
    )


def wait(client: Any, batch_id: str, statuses: set[str]) -> Any:
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.5)


def output_tokens(client: Any, file_id: str | None) -> int:
    total = 0
    if file_id:
        for raw in client.files.content(file_id).iter_lines():
            if raw:
                total += json.loads(raw)["response"]["body"]["usage"]["completion_tokens"]
    return total


def priority_and_fill(bench: BenchStack, client: Any, seconds: float) -> list[str]:
    rows = []
    ttft_ms(client, 5)  # the engine loaded and warm before anything is timed
    idle = ttft_ms(client, 15)
    batch = run_batch(client, chat_lines(400, 64), "/v1/chat/completions", "busy.jsonl")
    wait(client, batch.id, {"in_progress"})
    time.sleep(5)  # the pool full of batch lines
    busy = ttft_ms(client, 15)
    client.batches.cancel(batch.id)
    wait(client, batch.id, {"cancelled"})
    rows.append(
        f"| online chat time to first token, p50 (15 sequential) | {statistics.median(busy):.0f}"
        f" ms while a chat batch runs | {statistics.median(idle):.0f} ms idle "
        f"(ratio {statistics.median(busy) / statistics.median(idle):.2f}) |"
    )
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 64,
        "temperature": 0,
    }
    online = asyncio.run(
        run_load(
            bench.url, "/v1/chat/completions", body, bench.secret, concurrency=32, seconds=seconds
        )
    )
    alone = run_batch(client, chat_lines(160, 64), "/v1/chat/completions", "alone.jsonl")
    done = wait(client, alone.id, {"completed", "failed"})
    run_s = max(1, (done.completed_at or 0) - (done.in_progress_at or 0))
    batch_tps = output_tokens(client, done.output_file_id) / run_s
    rows.append(
        f"| chat completion tokens/s, no online traffic | {batch_tps:.0f} (batch of 160 lines, "
        f"{run_s} s) | {online.completion_tokens / online.elapsed:.0f} (online, concurrency 32) |"
    )
    return rows


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
    parser.add_argument("--skip-chat", action="store_true", help="only the echo batch")
    args = parser.parse_args()

    from openai import OpenAI

    bench = BenchStack()
    bench.bootstrap()
    bench.start(args.port)
    runner = bench.stack.batch_runner("batch-runner", MANTLE_BATCH_POLL_S="0.2")
    try:
        client = OpenAI(base_url=f"{bench.url}/v1", api_key=bench.secret, timeout=600)
        rows = [] if args.skip_chat else priority_and_fill(bench, client, args.online_seconds)
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
        print(f"\n## Batches ({args.lines} echo lines, input {size / 1e6:.1f} MB)\n")
        print("| measure | batch | online (baseline, same stack) |")
        print("| --- | --- | --- |")
        for row in rows:
            print(row)
        print(
            f"| echo requests/s | {args.lines / elapsed:.0f} (create to completed, "
            f"{elapsed:.0f} s; "
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
