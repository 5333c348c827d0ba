"""The upstream relay's overhead (issue 19), beside the same upstream called directly in the
same run.

    .venv/bin/python bench/relay_overhead.py [--requests 400] [--seconds 15]

Starts a throwaway platform (bench/platform_stack.py: the gateway; no worker is needed) and
the project's OpenAI-compatible fake provider (tests/support/upstream_fake.py, its own
process), routes a provider-only model to it, and measures chat completions (non-streamed,
16 words back) with the same small keep-alive client (bench/httpload.py):

1. concurrency 1: p50 and p99 latency direct to the fake and through the gateway; the
   relay's added latency is the difference of the p50s (target: at most 2 ms);
2. concurrency 32 for `--seconds`: requests per second direct and relayed (target: relayed
   at least 90% of direct).

Everything shares two cores: the client, the fake and the gateway. Run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

from bench.httpload import Result, run_load  # noqa: E402
from bench.platform_stack import BenchStack  # noqa: E402
from tests.support.upstream_fake import UpstreamFake  # noqa: E402

MODEL = "relay-bench"
UPSTREAM_MODEL = "gpt-bench"
MESSAGES = [{"role": "user", "content": " ".join(f"w{i}" for i in range(15))}]

SETUP = """
from decimal import Decimal
from billing.models import Price
from catalog.models import Endpoint, Model, ModelVersion, Provider, RouteTarget
from catalog.services import endpoint_publish, pool_ensure
from core import secretbox
from datetime import UTC, datetime
provider = Provider.objects.create(name="fake", kind="openai-compatible", base_url={base!r},
    credential_encrypted=secretbox.seal({key!r}), max_concurrency=1000)
model = Model.objects.create(name={model!r}, kind="chat", context_length=8192)
version = ModelVersion.objects.create(model=model, version=1, runtime="upstream", sha256="",
    location="")
pool = pool_ensure(name="upstream", region="any", providers=[])
endpoint = Endpoint.objects.create(name={model!r}, model_version=version, pool=pool,
    rpm_limit=10**9, tpm_limit=10**12)
RouteTarget.objects.create(endpoint=endpoint, kind="provider", provider=provider,
    upstream_model={upstream!r}, cost_input=Decimal("0.0000001"), cost_output=Decimal("0.0000002"))
endpoint_publish(endpoint)
for unit in ("input", "output"):
    Price.objects.create(model_name={model!r}, token_kind=unit, unit_price=Decimal("0.0000002"),
        effective_from=datetime(2020, 1, 1, tzinfo=UTC), reason="bench")
"""


def line(name: str, result: Result) -> str:
    ok = result.statuses.get(200, 0)
    rps = ok / result.elapsed if result.elapsed else 0.0
    return (
        f"| {name} | {ok} | {result.pct(50):.2f} | {result.pct(99):.2f} | {rps:.0f} | "
        f"{json.dumps(result.statuses)} |"
    )


async def measure(
    bench: BenchStack, fake: UpstreamFake, requests: int, seconds: float
) -> dict[str, Result]:
    direct = {"model": UPSTREAM_MODEL, "messages": MESSAGES, "max_tokens": 16}
    relayed = {"model": MODEL, "messages": MESSAGES, "max_tokens": 16}
    path = "/v1/chat/completions"
    out: dict[str, Result] = {}
    # Warm both paths (connections, the gateway's caches) before measuring.
    await run_load(fake.base_url, path, direct, fake.key, concurrency=4, requests=100)
    await run_load(bench.url, path, relayed, bench.secret, concurrency=4, requests=100)
    for rounds in range(2):  # alternated, so that drift hits both alike
        suffix = f" (round {rounds + 1}, upstream +{fake.latency_ms:.0f} ms)"
        out["direct c1" + suffix] = await run_load(
            fake.base_url, path, direct, fake.key, concurrency=1, requests=requests
        )
        out["relayed c1" + suffix] = await run_load(
            bench.url, path, relayed, bench.secret, concurrency=1, requests=requests
        )
        out["direct c32" + suffix] = await run_load(
            fake.base_url, path, direct, fake.key, concurrency=32, seconds=seconds
        )
        out["relayed c32" + suffix] = await run_load(
            bench.url, path, relayed, bench.secret, concurrency=32, seconds=seconds
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--gateway-procs", type=int, default=1)
    # 0: the relay's own cost against an upstream that answers at once; a real provider takes
    # tens to hundreds of milliseconds, where the throughput ratio is what a customer sees.
    parser.add_argument("--upstream-latency-ms", type=float, nargs="+", default=[0.0, 100.0])
    # Each answer's latency uniform within +- this share of it (0: all alike). With all alike,
    # the 32 clients stay in step: their requests reach the gateway together every cycle
    # and each waits behind the others' CPU; a real provider's answers vary.
    parser.add_argument("--upstream-spread", type=float, default=0.0)
    # The gateway without turns (core/turns.py): every request's work shares the loop.
    parser.add_argument("--no-turns", action="store_true")
    args = parser.parse_args()
    bench = BenchStack()
    if args.no_turns:
        bench.env["MANTLE_GATEWAY_TURNS"] = "false"
    bench.env["MANTLE_PROVIDER_ALLOWED_HTTP"] = "127.0.0.1"
    bench.env["MANTLE_PROVIDER_ALLOWED_PRIVATE"] = "127.0.0.1"
    from cryptography.fernet import Fernet

    bench.env["MANTLE_PROVIDER_SECRET_KEYS"] = Fernet.generate_key().decode()
    fake = UpstreamFake(key="bench-upstream-key", azure_filter_results=False)
    try:
        bench.bootstrap()
        fake.start()
        bench.manage(
            "shell",
            "-c",
            SETUP.format(
                base=fake.openai_base_url,
                key=fake.key,
                model=MODEL,
                upstream=UPSTREAM_MODEL,
            ),
        )
        from tests.support.stack import free_port

        gateway = bench.stack.start_gateway(
            "gateway", port=free_port(), processes=args.gateway_procs
        )
        bench.url = gateway.url
        bench.stack.wait_serving(gateway)
        results: dict[str, Result] = {}
        for latency in args.upstream_latency_ms:
            fake.set_latency(latency, latency * args.upstream_spread)
            results.update(asyncio.run(measure(bench, fake, args.requests, args.seconds)))
    finally:
        bench.stop()
        fake.stop()
    print("| run | answered | p50 ms | p99 ms | requests/s | statuses |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, result in results.items():
        print(line(name, result))
    for latency in args.upstream_latency_ms:
        for rounds in (1, 2):
            suffix = f" (round {rounds}, upstream +{latency:.0f} ms)"
            d1, r1 = results["direct c1" + suffix], results["relayed c1" + suffix]
            d32, r32 = results["direct c32" + suffix], results["relayed c32" + suffix]
            d_rps = d32.statuses.get(200, 0) / d32.elapsed
            r_rps = r32.statuses.get(200, 0) / r32.elapsed
            print(
                f"upstream +{latency:.0f} ms, round {rounds}: added p50 latency at c1 "
                f"{r1.pct(50) - d1.pct(50):.2f} ms; relayed/direct requests/s at c32 "
                f"{r_rps / d_rps:.2f}"
            )


if __name__ == "__main__":
    main()
