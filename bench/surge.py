"""A surge on a real stack: offered load steps to 10x the pool's capacity for a minute and
back, with the tiers and fair sharing on and, as the baseline in the same run, off.

    .venv/bin/python bench/surge.py [--factor 10] [--seconds 60] [--phases fair,off] \
        [--priority 0.03]

Starts a throwaway platform (bench/platform_stack.py: a gateway, one worker of the built-in
SmolLM2 on this machine's cores) and three organizations, one per tier: priority, default
and flex. Then, on freshly started processes for each phase:

1. **capacity**: default-tier streamed chat requests (16 tokens) at concurrency 32 for 15 s:
   the pool's requests per second, C;
2. **idle**: 10 priority and 10 default requests one after another: times to first token;
3. **surge**: open-loop arrivals at `factor` x C for `seconds` (`--priority` of them priority,
   3% by default, then two thirds of the rest default and a third flex, each tier from its
   own organization; at 10x a priority share of 10% is the pool's whole capacity, which no
   tier order can serve at idle latency): per tier, the answers by status, times to
   first token of the answered (p50, p99), and requests that got no answer at all;
4. **recovery**: a default request every 0.25 s after the step: seconds until its time to
   first token is back within 2x idle;
5. **billing**: every answered request has exactly one usage event on the usage stream, and
   no refused one has any.

Phase `fair`: the defaults (engines' fair admission and tiers, the gateway's pool share and
surge backlog). Phase `off`: MANTLE_FAIR_SHARING=0, MANTLE_FAIR_POOL_ORG_SHARE=1,
MANTLE_POOL_BACKLOG_FACTOR=0 (arrival order everywhere; tiers still ranked in the engine).
Run it alone: two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

import httpx  # noqa: E402

from bench.platform_stack import BenchStack  # noqa: E402

CHAT = "smollm2-135m-instruct"
TIERS = {"priority": 0.1, "default": 0.6, "flex": 0.3}

ORGS = """
from accounts.models import ApiKey, Project, User
from accounts.principal import SYSTEM, Principal
from accounts import services, keys
for tier in ("priority", "default", "flex"):
    user = User.objects.create_user(f"{tier}@bench.invalid", "x" * 20, full_name=tier)
    org = services.organization_create(principal=SYSTEM, name=f"{tier} Inc", owner=user)
    _, secret = services.api_key_create(
        principal=Principal(user=user), project=org.projects.get(is_default=True),
        name=tier, scopes=["inference"],
    )
    print("KEY", tier, secret)
ApiKey.objects.update(rpm_limit=10**9, tpm_limit=10**12)
Project.objects.update(rpm_limit=10**9, tpm_limit=10**12)
[keys.cache_put(services._identity(k, k.organization))
 for k in ApiKey.objects.select_related("organization", "project")]
"""


@dataclass
class Outcome:
    tier: str
    status: int = 0  # 0: no answer at all (a lost request)
    code: str = ""
    ttft_ms: float = 0.0
    request_id: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for tier in TIERS:
            mine = [o for o in self.outcomes if o.tier == tier]
            ok = [o.ttft_ms for o in mine if o.status == 200]
            out[tier] = {
                "sent": len(mine),
                "answered": len(ok),
                "refused": dict(
                    Counter(f"{o.status} {o.code}" for o in mine if o.status not in (0, 200))
                ),
                "lost": sum(1 for o in mine if o.status == 0),
                "ttft_p50_ms": round(statistics.median(ok), 1) if ok else None,
                "ttft_p99_ms": round(pct(ok, 0.99), 1) if ok else None,
            }
        return out


def renice(pid: int, nice: int) -> None:
    """Every thread of process `pid` (the engine's and ONNX Runtime's exist by now) at
    `nice`: the gateway as if on cores of its own, as the deployment runs it."""
    import os

    for task in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


def ttft_buckets(url: str, tier: str) -> dict[float, float]:
    """The gateway's time-to-first-token histogram for `tier`: upper bound -> count."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    prefix = "mantle_gateway_time_to_first_token_seconds_bucket{"
    found: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix) and f'tier="{tier}"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            found[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return found


def bucket_quantile(cumulative: dict[float, float], q: float) -> float | None:
    """The upper bound (ms) of the bucket holding quantile `q` of a cumulative histogram."""
    total = cumulative.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for bound in sorted(cumulative):
        if cumulative[bound] >= q * total:
            return round(bound * 1000, 1)
    return None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(client: httpx.AsyncClient, secret: str, tier: str, max_tokens: int = 16) -> Outcome:
    body: dict[str, Any] = {
        "model": CHAT,
        "messages": [{"role": "user", "content": f"Say something about {random.random():.6f}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "service_tier": tier,
    }
    found = Outcome(tier)
    started = time.perf_counter()
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"}
        ) as response:
            found.request_id = response.headers.get("x-request-id", "")
            if response.status_code != 200:
                found.status = response.status_code
                raw = await response.aread()
                try:
                    found.code = str(json.loads(raw)["error"].get("code"))
                except (ValueError, KeyError, TypeError):
                    found.code = "?"
                return found
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    found.status = 500
                    found.code = str(event["error"].get("code"))
                    return found
                choices = event.get("choices") or [{}]
                if not found.ttft_ms and choices[0].get("delta", {}).get("content"):
                    found.ttft_ms = (time.perf_counter() - started) * 1000
            found.status = 200
    except Exception as exc:  # no answer: counted as lost
        found.code = type(exc).__name__
    return found


async def capacity(url: str, secret: str, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                if (await one(client, secret, "default")).status == 200:
                    done += 1

        await asyncio.gather(*(loop() for _ in range(32)))
    return done / seconds


async def sequential(url: str, secret: str, tier: str, count: int) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return [(await one(client, secret, tier)).ttft_ms for _ in range(count)]


async def surge(url: str, secrets: dict[str, str], rate: float, seconds: float) -> Tally:
    tally = Tally()
    tiers, weights = list(TIERS), list(TIERS.values())
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        sent = 0
        while (now := time.perf_counter() - start) < seconds:
            while sent < now * rate:
                tier = random.choices(tiers, weights)[0]
                tasks.append(asyncio.create_task(one(client, secrets[tier], tier)))
                sent += 1
            await asyncio.sleep(0.005)
        tally.outcomes = list(await asyncio.gather(*tasks))
    return tally


async def recovery(url: str, secret: str, idle_p50: float, seconds: float) -> float | None:
    """Seconds after the step until a default request's first token is within 2x idle."""
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        while time.perf_counter() - start < seconds:
            got = await one(client, secret, "default")
            if got.status == 200 and got.ttft_ms <= 2 * idle_p50:
                return round(time.perf_counter() - start, 1)
            await asyncio.sleep(0.25)
    return None


def billed(
    bench: BenchStack, request_ids: list[str], queued: dict[str, int] | None = None
) -> Counter[str]:
    """Usage events per request id (`queued`, when given, gets each one's `queue_ms`)."""
    import redis

    client = redis.Redis.from_url(bench.env["REDIS_URL"], decode_responses=True)
    wanted = set(request_ids)
    counted: Counter[str] = Counter()
    for _, fields in client.xrange("mantle:usage"):
        rid = fields.get("request_id", "")
        if rid in wanted:
            if queued is not None:
                queued[rid] = int(fields.get("queue_ms") or 0)
            # A request refused before it ran (flex past its wait) has an event of no tokens:
            # metered, never charged. Only events that carry tokens bill anything.
            tokens = int(fields.get("input_tokens") or 0) + int(fields.get("output_tokens") or 0)
            counted[rid if tokens else f"{rid}:empty"] += 1
    return counted


def phase(
    bench: BenchStack, port: int, secrets: dict[str, str], name: str, args: argparse.Namespace
) -> dict[str, Any]:
    off = name == "off"
    gateway_env = (
        {"MANTLE_FAIR_POOL_ORG_SHARE": "1", "MANTLE_POOL_BACKLOG_FACTOR": "0"} if off else {}
    )
    gateway_env["MANTLE_OPS_NETWORKS"] = "127.0.0.1/32"  # its /metrics, for the bench
    worker_env = {"MANTLE_FAIR_SHARING": "0"} if off else {}
    gateway = bench.stack.start_gateway("gateway", port=port, env=gateway_env)
    worker = bench.stack.start_worker(
        "cpu", name="worker-0", concurrency=64, node="bench-0", env=worker_env
    )
    try:
        bench.stack.wait_serving(gateway)
        bench.stack.wait_registered(worker, "cpu")
        url = gateway.url
        asyncio.run(sequential(url, secrets["default"], "default", 3))  # warm-up
        if args.worker_nice:
            renice(worker.popen.pid, args.worker_nice)
        cap = asyncio.run(capacity(url, secrets["default"], 15.0))
        time.sleep(3.0)
        idle_priority = asyncio.run(sequential(url, secrets["priority"], "priority", 10))
        idle_default = asyncio.run(sequential(url, secrets["default"], "default", 10))
        rate = args.factor * cap
        before = ttft_buckets(url, "priority")
        tally = asyncio.run(surge(url, secrets, rate, args.seconds))
        at_gateway = {
            bound: count - before.get(bound, 0)
            for bound, count in ttft_buckets(url, "priority").items()
        }
        back = asyncio.run(recovery(url, secrets["default"], statistics.median(idle_default), 120))
        time.sleep(2.0)  # the last usage events written
        answered = [o.request_id for o in tally.outcomes if o.status == 200 and o.request_id]
        refused = [
            o.request_id for o in tally.outcomes if o.status not in (0, 200) and o.request_id
        ]
        queued: dict[str, int] = {}
        counts = billed(bench, answered + refused, queued)
        summary = tally.summary()
        # Where the priority tier's first tokens waited: from the gateway's publish to the
        # engine's first call over the prompt (the usage event's queue_ms), and the rest
        # (the gateway before the publish, the first token's way back, the client).
        mine = [o for o in tally.outcomes if o.tier == "priority" and o.request_id in queued]
        inside = [float(queued[o.request_id]) for o in mine]
        outside = [o.ttft_ms - queued[o.request_id] for o in mine]
        idle_p99 = pct(idle_priority, 0.99)
        p99 = summary["priority"]["ttft_p99_ms"]
        return {
            "capacity_rps": round(cap, 2),
            "offered_rps": round(rate, 2),
            "idle_priority_ttft_p50_ms": round(statistics.median(idle_priority), 1),
            "idle_priority_ttft_p99_ms": round(idle_p99, 1),
            "idle_default_ttft_p50_ms": round(statistics.median(idle_default), 1),
            "surge": summary,
            "priority_p99_over_idle_p99": round(p99 / idle_p99, 2) if p99 else None,
            "priority_p50_over_idle_p50": (
                round(summary["priority"]["ttft_p50_ms"] / statistics.median(idle_priority), 2)
                if summary["priority"]["ttft_p50_ms"]
                else None
            ),
            # The gateway's own figure (mantle_gateway_time_to_first_token_seconds), from a
            # request's arrival to its first token there: the load generator's lag is not
            # in it. Histogram buckets: each figure is the bucket's upper bound.
            "priority_ttft_at_gateway_ms_p50_p99_at_most": [
                bucket_quantile(at_gateway, 0.5),
                bucket_quantile(at_gateway, 0.99),
            ],
            "priority_publish_to_prompt_ms_p50_p99": (
                [round(statistics.median(inside)), round(pct(inside, 0.99))] if mine else None
            ),
            "priority_rest_of_ttft_ms_p50_p99": (
                [round(statistics.median(outside)), round(pct(outside, 0.99))] if mine else None
            ),
            "recovered_after_s": back,
            "answered_billed_once": sum(1 for r in answered if counts[r] == 1),
            "answered_not_billed_once": sum(1 for r in answered if counts[r] != 1),
            "refused_billed": sum(1 for r in refused if counts[r]),
            "refused_metered_at_no_tokens": sum(1 for r in refused if counts[f"{r}:empty"]),
        }
    finally:
        bench.stack.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--phases", default="fair,off")
    parser.add_argument("--port", type=int, default=18432)
    parser.add_argument(
        "--priority",
        type=float,
        default=0.03,
        help="the priority tier's share of the offered load (the rest: 2/3 default, 1/3 "
        "flex); at 10x, 0.1 makes priority alone the pool's whole capacity",
    )
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        help="run the worker's threads at this nice value after warm-up (the gateway and the "
        "load generator then take the CPU first, as on machines of their own)",
    )
    args = parser.parse_args()
    rest = 1.0 - args.priority
    TIERS.update(priority=args.priority, default=rest * 2 / 3, flex=rest / 3)

    # One machine for everything, as bin/run: the worker runs a call on one thread while
    # the gateway and the clients keep more than half a core busy (docs/service_tiers.md).
    os.environ.setdefault("MANTLE_ORT_ADAPTIVE_THREADS", "1")
    bench = BenchStack()
    bench.bootstrap()
    out = bench.manage("shell", "-c", ORGS)
    secrets = {
        line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("KEY")
    }
    results = {
        name: phase(bench, args.port, secrets, name, args) for name in args.phases.split(",")
    }
    mix = {tier: round(share, 3) for tier, share in TIERS.items()}
    print(
        json.dumps(
            {"factor": args.factor, "seconds": args.seconds, "mix": mix, **results}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
