"""Sustained mixed load: two gateways, two workers, steady streaming and plain concurrency.

Checks what a customer relies on: zero errors, bounded memory (RSS of every process
sampled throughout), and usage recorded by billing (after the metering drain) equal,
request by request, to the usage returned to clients. Uses its own PostgreSQL database
(created and dropped here) and its own Redis databases. Run alone on the machine:

    .venv/bin/python bench/load.py --seconds 300 --streaming 16 --plain 16

It prints one JSON object; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from tests.support.stack import PYTHONPATH, Stack, artifact_dir, builtin_manifests  # noqa: E402


@dataclass
class LoadResult:
    """What the clients saw: usage per request id, and every error."""

    usage: dict[str, tuple[int, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"stream": [], "plain": []})
    elapsed: float = 0.0

    def summary(self) -> dict[str, Any]:
        def pct(data: list[float], p: float) -> float:
            data = sorted(data)
            return (
                round(data[min(len(data) - 1, int(p / 100 * len(data)))] * 1000, 1) if data else 0
            )

        return {
            "requests": len(self.usage) + len(self.errors),
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "requests_per_s": round((len(self.usage) + len(self.errors)) / self.elapsed, 1)
            if self.elapsed
            else 0,
            "prompt_tokens": sum(p for p, _ in self.usage.values()),
            "completion_tokens": sum(c for _, c in self.usage.values()),
            **{
                f"{kind}_p{p}_ms": pct(values, p)
                for kind, values in self.latencies.items()
                for p in (50, 99)
            },
        }


class Conn:
    """One HTTP/1.1 keep-alive connection (cheap enough to share 2 cores with the servers)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(
        self, path: str, body: dict[str, Any], secret: str
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode()
        self.writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {secret}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode()
            + payload
        )
        status = int((await self.reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" not in headers.get("transfer-encoding", ""):
            return status, headers, await self.reader.readexactly(int(headers["content-length"]))
        data = bytearray()
        while size := int((await self.reader.readline()).strip(), 16):
            data += await self.reader.readexactly(size)
            await self.reader.readline()
        await self.reader.readline()
        return status, headers, bytes(data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = None


def _stream_usage(body: bytes) -> tuple[int, int] | str:
    """(prompt, completion) from an SSE body with include_usage, or what went wrong."""
    usage: tuple[int, int] | None = None
    done = False
    for line in body.decode().splitlines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            return f"in-band error {chunk['error'].get('code')}: {chunk['error'].get('message')}"
        if chunk.get("usage"):
            usage = (chunk["usage"]["prompt_tokens"], chunk["usage"]["completion_tokens"])
    if not done or usage is None:
        return "stream ended without usage and [DONE]"
    return usage


async def drive(
    urls: Sequence[str],
    secret: str,
    model: str,
    *,
    streaming: int,
    plain: int,
    seconds: float,
    max_tokens: int = 24,
) -> LoadResult:
    """Holds `streaming` + `plain` requests in flight for `seconds`, spread over `urls`."""
    result = LoadResult()
    stop_at = time.perf_counter() + seconds

    async def client(index: int, stream: bool) -> None:
        conn = Conn(urls[index % len(urls)])
        n = 0
        try:
            while time.perf_counter() < stop_at:
                n += 1
                body: dict[str, Any] = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"client {index} request {n}: hi"}],
                    "max_tokens": max_tokens,
                    "stream": stream,
                }
                if stream:
                    body["stream_options"] = {"include_usage": True}
                started = time.perf_counter()
                try:
                    status, headers, data = await conn.post("/v1/chat/completions", body, secret)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    result.errors.append(f"transport: {type(exc).__name__}: {exc}")
                    conn.close()
                    continue
                result.latencies["stream" if stream else "plain"].append(
                    time.perf_counter() - started
                )
                request_id = headers.get("x-request-id", "")
                if status != 200:
                    result.errors.append(f"{status}: {data[:300]!r}")
                    continue
                if stream:
                    got = _stream_usage(data)
                else:
                    usage = json.loads(data)["usage"]
                    got = (usage["prompt_tokens"], usage["completion_tokens"])
                if isinstance(got, str):
                    result.errors.append(f"{request_id}: {got}")
                else:
                    result.usage[request_id] = got
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(
        *(client(i, True) for i in range(streaming)),
        *(client(streaming + i, False) for i in range(plain)),
    )
    result.elapsed = time.perf_counter() - started
    return result


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the resident memory of processes every `interval` seconds, in the event loop."""

    def __init__(self, pids: dict[str, int], interval: float = 1.0) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[int]] = {name: [] for name in pids}

    async def run(self, seconds: float) -> None:
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            for name, pid in self.pids.items():
                self.samples[name].append(rss_kib(pid))
            await asyncio.sleep(self.interval)

    def growth_kib(self) -> dict[str, int]:
        """Peak in the last two thirds of the run minus the peak of its first third (warm-up)."""
        out = {}
        for name, values in self.samples.items():
            third = max(1, len(values) // 3)
            out[name] = max(values[third:] or values) - max(values[:third])
        return out

    def summary(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "start_kib": v[0] if v else 0,
                "peak_kib": max(v, default=0),
                "end_kib": v[-1] if v else 0,
            }
            for name, v in self.samples.items()
        }


async def drive_and_sample(
    urls: Sequence[str], secret: str, model: str, pids: dict[str, int], **options: Any
) -> tuple[LoadResult, RssSampler]:
    sampler = RssSampler(pids)
    result, _ = await asyncio.gather(
        drive(urls, secret, model, **options), sampler.run(float(options["seconds"]))
    )
    return result, sampler


# --- the standalone benchmark: its own database, Redis databases and processes -----------------


class Platform:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.var = Path(tempfile.mkdtemp(prefix="mantle-load-"))
        self.env = {
            **os.environ,
            "PYTHONPATH": PYTHONPATH,
            "DJANGO_SETTINGS_MODULE": "config.settings.base",
            "DJANGO_SECRET_KEY": "load-bench-only-secret",
            "MANTLE_API_KEY_PEPPER": "load-bench-only-pepper",
            "MANTLE_IDENTITY_KEY": "load-bench-only-identity-key",
            "MANTLE_VAR_DIR": str(self.var),
            "DATABASE_URL": f"{args.pg}/{args.database}",
            "REDIS_URL": args.redis,
            "CELERY_BROKER_URL": args.broker,
            "MANTLE_LOG_LEVEL": "WARNING",
        }
        self.stack = Stack(env=self.env, log_dir=self.var, log_level="WARNING")
        self.urls: list[str] = []

    def manage(self, *argv: str) -> str:
        return self.stack.manage(*argv)

    def bootstrap(self) -> tuple[str, str]:
        import psycopg
        import redis

        with psycopg.connect(f"{self.args.pg}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.args.database}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.args.database}"')
        for url in (self.args.redis, self.args.broker):
            redis.Redis.from_url(url).flushdb()
        manifests = self.var / "manifests.json"
        manifests.write_text(json.dumps(builtin_manifests(artifact_dir())))
        self.manage("migrate", "--noinput", "-v", "0")
        self.manage("prepare_models", "--manifests", str(manifests))
        out = self.manage(
            "shell",
            "-c",
            "import json; from tests.factories import OrganizationFactory, make_api_key;"
            "from catalog.models import Endpoint;"
            "from catalog.services import endpoints_publish_all;"
            "Endpoint.objects.update(rpm_limit=10**9, tpm_limit=10**12); endpoints_publish_all();"
            "org = OrganizationFactory(); key, secret = make_api_key(org, rpm_limit=10**9,"
            " tpm_limit=10**12); print(json.dumps([org.id, secret]))",
        )
        org_id, secret = json.loads(out.strip().splitlines()[-1])
        return org_id, secret

    def start(self, gateways: int, workers: int, threads: int) -> None:
        gateway_procs = [self.stack.start_gateway(f"gateway-{i}") for i in range(gateways)]
        self.urls = [proc.url for proc in gateway_procs]
        worker_procs = [
            self.stack.start_worker(
                "cpu", name=f"worker-{i}", concurrency=threads, node=f"load-{i}"
            )
            for i in range(workers)
        ]
        for proc in gateway_procs:
            self.stack.wait_serving(proc, timeout=90)
        for proc in worker_procs:
            self.stack.wait_registered(proc, "cpu", timeout=90)

    @property
    def pids(self) -> dict[str, int]:
        return {proc.name: proc.popen.pid for proc in self.stack.processes}

    def recorded_usage(self, org_id: str) -> dict[str, tuple[int, int]]:
        self.manage("drain_usage", "--once", "--consumer", "load-bench")
        out = self.manage(
            "shell",
            "-c",
            "import json; from billing.models import UsageEvent;"
            f"print(json.dumps(list(UsageEvent.objects.filter(organization_id={org_id!r})"
            ".values_list('request_id', 'input_tokens', 'output_tokens'))))",
        )
        return {rid: (i, o) for rid, i, o in json.loads(out.strip().splitlines()[-1])}

    def stop(self) -> None:
        self.stack.stop_all()

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(f"{self.args.pg}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.args.database}" WITH (FORCE)')


def compare(
    returned: dict[str, tuple[int, int]], recorded: dict[str, tuple[int, int]]
) -> dict[str, Any]:
    missing = sorted(set(returned) - set(recorded))
    mismatched = sorted(
        rid for rid in set(returned) & set(recorded) if returned[rid] != recorded[rid]
    )
    return {
        "returned_requests": len(returned),
        "recorded_requests": len(recorded),
        "missing": missing[:5],
        "mismatched": mismatched[:5],
        "extra": sorted(set(recorded) - set(returned))[:5],
        "equal": returned == recorded,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--streaming", type=int, default=16, help="concurrent streaming requests")
    parser.add_argument("--plain", type=int, default=16, help="concurrent non-streaming requests")
    parser.add_argument("--model", default="mantle-echo", help="a built-in model name")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--worker-threads", type=int, default=64)
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    parser.add_argument("--database", default="mantle_bench_load")
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/7")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    platform = Platform(args)
    try:
        org_id, secret = platform.bootstrap()
        platform.start(gateways=2, workers=2, threads=args.worker_threads)
        pids = platform.pids
        result, sampler = asyncio.run(
            drive_and_sample(
                platform.urls,
                secret,
                args.model,
                pids,
                streaming=args.streaming,
                plain=args.plain,
                seconds=args.seconds,
                max_tokens=args.max_tokens,
            )
        )
        usage = compare(result.usage, platform.recorded_usage(org_id))
    finally:
        platform.stop()
        if not args.keep:
            platform.drop()
    growth = sampler.growth_kib()
    report = {
        "command": " ".join(sys.argv),
        "seconds": args.seconds,
        "concurrency": {"streaming": args.streaming, "plain": args.plain},
        "model": args.model,
        "clients": result.summary(),
        "rss": sampler.summary(),
        "rss_growth_kib": growth,
        "usage": usage,
    }
    ok = (
        not result.errors
        and usage["equal"]
        and all(g <= args.max_rss_growth_mib * 1024 for g in growth.values())
    )
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
