"""Provisioned throughput under a flood: does an organization with units receive the tokens
per minute they guarantee while another organization floods the pool?

    .venv/bin/python bench/provisioned.py [--units 4] [--streams 48] [--seconds 60]

Starts a throwaway platform (bench/platform_stack.py: a gateway and one worker of the
built-in SmolLM2 on this machine's cores). The demo organization ("provisioned") keeps
`--units` long streams running, one per unit (256 tokens each, end of sequence biased
away); a second organization keeps `--streams` long streams running. Phases, each on
freshly started processes, each measuring tokens received per minute over `--seconds`:

1. **alone**: the provisioned organization's streams, nobody else (no units sold);
2. **flood, arrival order** (the baseline): the same load with no units sold and fair
   sharing off (`MANTLE_FAIR_SHARING=0`, `MANTLE_FAIR_POOL_ORG_SHARE=1`), as before
   issue 18;
3. **flood, units sold**: `--units` units of the chat endpoint sold to the organization
   (billing.provisioned.commitment_create), fair sharing on (the defaults).

Prints per phase the provisioned organization's tokens/min in all and per stream, and the
flood's; the guarantee (units x MANTLE_PROVISIONED_UNIT_TPM of the model, 320 for SmolLM2:
the per-stream rate this measures at a full batch is where that figure comes from); and
whether phase 3 met it. Run it alone: two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

from bench.noisy_neighbour import CHAT, EOS, FLOOD_ORG, Flood  # noqa: E402
from bench.platform_stack import BenchStack  # noqa: E402

UNIT_TPM = 320  # config.settings.base MANTLE_PROVISIONED_UNIT_TPM for SmolLM2

SELL = """
from django.utils import timezone
from accounts.principal import SYSTEM
from accounts.models import Organization
from billing.periods import hour_start
from billing import provisioned
from catalog.models import Endpoint
from accounts.management.commands.seed_demo import DEMO_ORG
org = Organization.objects.get(name=DEMO_ORG)
endpoint = Endpoint.objects.get(name="{model}", organization__isnull=True)
provisioned.commitment_create(
    principal=SYSTEM, org=org, endpoint_id=endpoint.id, units={units},
    unit_hour_price="1", overflow="spill", starts_at=hour_start(timezone.now()),
    reason="bench",
)
print("SYNCED", provisioned.provisioned_sync())
"""


class Streams(Flood):
    """`streams` threads of long streams, counting the tokens and the service tiers seen."""

    def __init__(self, client: Any, streams: int) -> None:
        super().__init__(client, streams)
        self.tiers: dict[str, int] = {}

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
                            tier = str(getattr(chunk, "service_tier", None))
                            self.tiers[tier] = self.tiers.get(tier, 0) + 1
                    if self.stop.is_set():
                        stream.close()
                        break
            except Exception:
                with self.lock:
                    self.errors += 1
                time.sleep(0.5)


def phase(
    bench: BenchStack,
    port: int,
    own_secret: str,
    flood_secret: str,
    *,
    units: int,
    streams: int,
    seconds: float,
    flood: bool,
    fair: bool,
) -> dict[str, Any]:
    from openai import OpenAI

    gateway_env = {} if fair else {"MANTLE_FAIR_POOL_ORG_SHARE": "1"}
    worker_env = {} if fair else {"MANTLE_FAIR_SHARING": "0"}
    gateway = bench.stack.start_gateway("gateway", port=port, env=gateway_env)
    worker = bench.stack.start_worker(
        "cpu", name="worker-0", concurrency=64, node="bench-0", env=worker_env
    )
    try:
        bench.stack.wait_serving(gateway)
        bench.stack.wait_registered(worker, "cpu")
        url = f"{gateway.url}/v1"
        others = Streams(OpenAI(base_url=url, api_key=flood_secret, timeout=600), streams)
        if flood:
            others.start()
            time.sleep(8.0)  # every flood stream running
        own = Streams(OpenAI(base_url=url, api_key=own_secret, timeout=600), units)
        own.start()
        time.sleep(5.0)  # own streams running
        before_own, before_others, started = own.tokens, others.tokens, time.perf_counter()
        time.sleep(seconds)
        elapsed = time.perf_counter() - started
        own_tpm = (own.tokens - before_own) / elapsed * 60
        result: dict[str, Any] = {
            "own_tokens_per_min": round(own_tpm),
            "own_tokens_per_min_per_stream": round(own_tpm / units),
            "own_service_tiers": dict(own.tiers),
            "own_errors": own.errors,
        }
        if flood:
            result["flood_tokens_per_min"] = round((others.tokens - before_others) / elapsed * 60)
            result["flood_errors"] = others.errors
        own.finish()
        if flood:
            others.finish()
        return result
    finally:
        bench.stack.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=4)
    parser.add_argument("--streams", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--port", type=int, default=18433)
    args = parser.parse_args()

    # One machine for everything, as bin/run: the worker runs a call on one thread while
    # the gateway and the clients keep more than half a core busy (docs/service_tiers.md).
    os.environ.setdefault("MANTLE_ORT_ADAPTIVE_THREADS", "1")
    bench = BenchStack()
    bench.bootstrap()
    out = bench.manage("shell", "-c", FLOOD_ORG)
    flood_secret = next(line.split()[1] for line in out.splitlines() if line.startswith("FLOOD"))
    common = {"units": args.units, "streams": args.streams, "seconds": args.seconds}
    results: dict[str, Any] = {
        "alone": phase(
            bench, args.port, bench.secret, flood_secret, flood=False, fair=True, **common
        ),
        "flood_arrival_order_no_units": phase(
            bench, args.port, bench.secret, flood_secret, flood=True, fair=False, **common
        ),
    }
    bench.manage("shell", "-c", SELL.format(model=CHAT, units=args.units))
    results["flood_units_sold"] = phase(
        bench, args.port, bench.secret, flood_secret, flood=True, fair=True, **common
    )
    guarantee = args.units * UNIT_TPM
    results["guaranteed_tokens_per_min"] = guarantee
    results["met"] = results["flood_units_sold"]["own_tokens_per_min"] >= guarantee
    print(json.dumps({"units": args.units, "streams": args.streams, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
