"""A noisy neighbour on a real stack: a quiet organization's time to first token while another
organization floods the pool, with fair sharing on and, as the baseline in the same run, off.

    .venv/bin/python bench/noisy_neighbour.py [--streams 24] [--samples 30]

Starts a throwaway platform (bench/platform_stack.py: a gateway and one worker of the
built-in SmolLM2 on this machine's cores) with two organizations. The quiet one sends
streamed chat requests one after another (8 tokens each) and records each time to first
token; the flooding one keeps `--streams` long streams running (256 tokens each, end of
sequence biased away so that every one runs its length). Three phases, each on freshly
started processes:

1. **idle**: the quiet organization alone;
2. **flood, fair sharing on** (the defaults: the engines' fair admission, the gateway's
   pool share);
3. **flood, fair sharing off** (`MANTLE_FAIR_SHARING=0` on the worker,
   `MANTLE_FAIR_POOL_ORG_SHARE=1` on the gateway: arrival order, as before issue 18).

Prints p50/p90 per phase and the ratios to idle (the target: p50 under the flood at most
1.5x idle), and the flood's tokens/s in each flooded phase. Run it alone: two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

from bench.platform_stack import BenchStack  # noqa: E402

CHAT = "smollm2-135m-instruct"
EOS = "2"  # SmolLM2's end of sequence (<|im_end|>): biased away from the flood's streams

FLOOD_ORG = """
from accounts.models import ApiKey, User
from accounts.principal import SYSTEM, Principal
from accounts import services, keys
user = User.objects.create_user("flood@bench.invalid", "x" * 20, full_name="Flood")
org = services.organization_create(principal=SYSTEM, name="Flood Inc", owner=user)
_, secret = services.api_key_create(
    principal=Principal(user=user), project=org.projects.get(is_default=True),
    name="flood", scopes=["inference"],
)
ApiKey.objects.update(rpm_limit=10**9, tpm_limit=10**12)
from accounts.models import Project
Project.objects.update(rpm_limit=10**9, tpm_limit=10**12)
[keys.cache_put(services._identity(k, k.organization))
 for k in ApiKey.objects.select_related("organization", "project")]
print("FLOOD", secret)
"""


def ttft_ms(client: Any, count: int) -> list[float]:
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


class Flood:
    """`streams` threads, each sending one long stream after another until stopped."""

    def __init__(self, client: Any, streams: int) -> None:
        self.client = client
        self.stop = threading.Event()
        self.tokens = 0
        self.errors = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(streams)]

    def run(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                stream = self.client.chat.completions.create(
                    model=CHAT,
                    messages=[{"role": "user", "content": f"Tell a long story, part {i}."}],
                    max_tokens=256,
                    temperature=0,
                    logit_bias={EOS: -100},
                    stream=True,
                )
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        with self.lock:
                            self.tokens += 1
                    if self.stop.is_set():
                        stream.close()
                        break
            except Exception:
                with self.lock:
                    self.errors += 1
                time.sleep(0.5)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase(
    bench: BenchStack,
    port: int,
    quiet_secret: str,
    flood_secret: str,
    *,
    streams: int,
    samples: int,
    fair: bool | None,
) -> dict[str, Any]:
    """fair None: no flood (idle)."""
    from openai import OpenAI

    gateway_env = {} if fair in (None, True) else {"MANTLE_FAIR_POOL_ORG_SHARE": "1"}
    worker_env = {} if fair in (None, True) else {"MANTLE_FAIR_SHARING": "0"}
    gateway = bench.stack.start_gateway("gateway", port=port, env=gateway_env)
    worker = bench.stack.start_worker(
        "cpu", name="worker-0", concurrency=64, node="bench-0", env=worker_env
    )
    try:
        bench.stack.wait_serving(gateway)
        bench.stack.wait_registered(worker, "cpu")
        url = f"{gateway.url}/v1"
        quiet = OpenAI(base_url=url, api_key=quiet_secret, timeout=600)
        ttft_ms(quiet, 3)  # warm-up: the model loaded, the first compile done
        flood = None
        if fair is not None:
            flood = Flood(OpenAI(base_url=url, api_key=flood_secret, timeout=600), streams)
            flood.start()
            time.sleep(8.0)  # every stream running
            before, started = flood.tokens, time.perf_counter()
        found = ttft_ms(quiet, samples)
        result: dict[str, Any] = {
            "p50_ms": round(statistics.median(found), 1),
            "p90_ms": round(pct(found, 0.9), 1),
        }
        if flood is not None:
            elapsed = time.perf_counter() - started
            result["flood_tokens_per_s"] = round((flood.tokens - before) / elapsed, 1)
            flood.finish()
            result["flood_errors"] = flood.errors
        return result
    finally:
        bench.stack.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=24)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--port", type=int, default=18431)
    args = parser.parse_args()

    # One machine for everything, as bin/run: the worker runs a call on one thread while
    # the gateway and the clients keep more than half a core busy (docs/service_tiers.md).
    os.environ.setdefault("MANTLE_ORT_ADAPTIVE_THREADS", "1")
    bench = BenchStack()
    bench.bootstrap()
    out = bench.manage("shell", "-c", FLOOD_ORG)
    flood_secret = next(line.split()[1] for line in out.splitlines() if line.startswith("FLOOD"))
    common = {"streams": args.streams, "samples": args.samples}
    results = {
        "idle": phase(bench, args.port, bench.secret, flood_secret, fair=None, **common),
        "flood_fair": phase(bench, args.port, bench.secret, flood_secret, fair=True, **common),
        "flood_arrival_order": phase(
            bench, args.port, bench.secret, flood_secret, fair=False, **common
        ),
    }
    idle = results["idle"]["p50_ms"]
    for name in ("flood_fair", "flood_arrival_order"):
        results[name]["p50_over_idle"] = round(results[name]["p50_ms"] / idle, 2)
    print(json.dumps({"streams": args.streams, "samples": args.samples, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
