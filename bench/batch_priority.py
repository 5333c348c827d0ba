"""Issue 17: an online request's time to first token while batch lines fill the engine.

Inside the causal LM engine on the real built-in chat model (smollm2, no prefix cache, no
Redis), three phases on one engine:
1. idle: online requests one after another, nothing else running;
2. full: the same requests while `max_batch` batch lines that never end (end of sequence
   biased away) hold every row throughout: the policy's worst case (the online request
   goes over max_batch, cutting the lines' step short);
3. policy on: the same while a feeder keeps `max_batch` batch lines in flight, as the batch
   runner does (each `--line-tokens` long, end of sequence biased away; a new line is
   submitted whenever one ends): beside online traffic the engine holds them to a quarter
   of the batch, as the heartbeat's batch_capacity would;
4. policy off: the same, the lines submitted as online (all one class, what the engine did
   before issue 17: an online request waits for a free row among the lines).
A request's first token counts when its sink is flushed (what a client can see), not when
the engine chose it. Between probes a random pause of 0.1-0.4 s, so that arrivals fall
anywhere in the streams' decode steps.

Run alone on the machine (check `uptime`), after bin/prepare-models:
    .venv/bin/python bench/batch_priority.py [--max-batch 8 32] [--probes 20]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from agent_engine import chat_ids  # noqa: E402  (the chat template, as the gateway applies it)
from chat_throughput import prompts  # noqa: E402

from tests.support.stack import artifact_dir, builtin_manifests  # noqa: E402
from workers.contract import (  # noqa: E402
    BillingIdentity,
    GenerateRequest,
    ModelRef,
    SamplingParams,
    ServiceClass,
)
from workers.engine.bench import NullSink  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Which planet is the largest?",
    "Say hello in Spanish.",
    "What does a baker make?",
    "Name a fruit that is yellow.",
]


class FlushTimingSink(NullSink):
    """Stamps each request's deltas when they are flushed, as a client would see them."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.tokens: dict[str, int] = {}
        self._pending: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def delta(
        self, request_id: str, text: str, tokens: int, index: Any = None, logprobs: Any = None
    ) -> None:
        with self.lock:
            self._pending.append((request_id, tokens))

    def flush(self) -> None:
        now = time.perf_counter()
        with self.lock:
            pending, self._pending = self._pending, []
            for rid, tokens in pending:
                self.times.setdefault(rid, []).append(now)
                self.tokens[rid] = self.tokens.get(rid, 0) + tokens


def request(
    rid: str,
    ids: Sequence[int],
    max_tokens: int,
    service_class: str,
    logit_bias: tuple[tuple[int, float], ...] = (),
) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model=ModelRef("bench", "onnx-causal-lm", "0" * 64, ""),
        identity=BillingIdentity("bench", "bench", "bench", "bench", "bench", "bench"),
        prompt_token_ids=tuple(ids),
        sampling=SamplingParams(
            max_tokens=max_tokens, temperature=0.0, top_p=1.0, logit_bias=logit_bias
        ),
        deadline=time.time() + 3600,
        service_class=service_class,
    )


def probe(
    engine: Any, model: Any, sink: FlushTimingSink, tag: str, count: int, tokens: int
) -> dict[str, Any]:
    """`count` online requests one after another: TTFT and time between their tokens."""
    rng = random.Random(17)
    ttft: list[float] = []
    gaps: list[float] = []
    for i in range(count):
        time.sleep(rng.uniform(0.1, 0.4))
        rid = f"{tag}-{i}"
        ids = chat_ids(model, QUESTIONS[i % len(QUESTIONS)])
        started = time.perf_counter()
        result = engine.submit(request(rid, ids, tokens, ServiceClass.ONLINE.value), sink).wait(300)
        assert result is not None and not result.error_code, result
        time.sleep(0.05)  # the publisher's last flush
        times = sink.times[rid]
        ttft.append(times[0] - started)
        gaps += [b - a for a, b in itertools.pairwise(times)]
    return {
        "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
        "ttft_p90_ms": round(sorted(ttft)[int(0.9 * (len(ttft) - 1))] * 1000, 1),
        "between_tokens_p50_ms": round(statistics.median(gaps) * 1000, 1) if gaps else None,
    }


def with_lines(
    tag: str,
    engine: Any,
    model: Any,
    chat: dict[str, Any],
    service_class: str,
    count: int,
    line_tokens: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Probes while a feeder keeps `count` lines of `service_class` in flight."""
    never_stop = tuple((int(e), -100.0) for e in chat.get("eos_token_ids") or ())
    sink = FlushTimingSink()
    topics = prompts()
    stop = threading.Event()
    handles: list[Any] = []
    lines = 0

    def feed() -> None:
        nonlocal lines
        while not stop.is_set():
            live = [h for h in handles if h.result is None]
            for _ in range(count - len(live)):
                rid = f"bg-{tag}-{lines}"
                ids = chat_ids(model, topics[lines % len(topics)])
                line = request(rid, ids, line_tokens, service_class, never_stop)
                live.append(engine.submit(line, sink))
                lines += 1
            handles[:] = live
            time.sleep(0.01)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    deadline = time.monotonic() + 600
    while sum(1 for rid in sink.times if rid.startswith("bg-")) < count:
        assert time.monotonic() < deadline, "the lines never all started"
        time.sleep(0.05)
    time.sleep(2.0)
    with sink.lock:
        before = sum(v for k, v in sink.tokens.items() if k.startswith("bg-"))
    started = time.perf_counter()
    figures = probe(engine, model, sink, f"probe-{tag}", args.probes, args.tokens)
    elapsed = time.perf_counter() - started
    with sink.lock:
        background = sum(v for k, v in sink.tokens.items() if k.startswith("bg-")) - before
    figures["lines_tok_s_during_probes"] = round(background / elapsed, 1)
    stop.set()
    feeder.join()
    for handle in handles:
        handle.claim()  # abandoned: the engine drops them silently
    while engine.running or engine.waiting:
        time.sleep(0.05)
    print(tag, json.dumps(figures), file=sys.stderr, flush=True)
    return figures


def run(chat: dict[str, Any], max_batch: int, args: argparse.Namespace) -> dict[str, Any]:
    from workers.engine.causal_lm import CausalLMEngine
    from workers.engine.prefix_cache import PrefixCache
    from workers.runtime.models import load_model

    location = Path(str(chat["location"]))
    model = load_model(ModelRef("bench", "onnx-causal-lm", str(chat["sha256"]), str(location)))
    engine = CausalLMEngine.from_model(
        model,
        max_batch=max_batch,
        max_prefill_tokens=4096,
        redis_client=None,
        prefix_cache=PrefixCache(0),
    ).start()
    try:
        warm = FlushTimingSink()
        probe(engine, model, warm, "warm", 3, args.tokens)
        idle = probe(engine, model, FlushTimingSink(), "idle", args.probes, args.tokens)
        print("idle", json.dumps(idle), file=sys.stderr, flush=True)
        batch, online = ServiceClass.BATCH.value, ServiceClass.ONLINE.value
        full = with_lines("full", engine, model, chat, batch, max_batch, 10**6, args)
        on = with_lines("on", engine, model, chat, batch, max_batch, args.line_tokens, args)
        off = with_lines("off", engine, model, chat, online, max_batch, args.line_tokens, args)
        cut_short = engine.cut_short
    finally:
        engine.stop()
    return {
        "max_batch": max_batch,
        "idle": idle,
        "batch_lines_never_ending": full,
        "batch_lines_policy_on": on,
        "same_lines_as_online_policy_off": off,
        "ttft_p50_ratio_full": round(full["ttft_p50_ms"] / idle["ttft_p50_ms"], 2),
        "ttft_p50_ratio_on": round(on["ttft_p50_ms"] / idle["ttft_p50_ms"], 2),
        "ttft_p50_ratio_off": round(off["ttft_p50_ms"] / idle["ttft_p50_ms"], 2),
        "batch_steps_cut_short": cut_short,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=8, help="tokens per online request")
    parser.add_argument("--line-tokens", type=int, default=64, help="tokens per batch line")
    args = parser.parse_args()
    chat = next(m for m in builtin_manifests(artifact_dir()) if m["runtime"] == "onnx-causal-lm")
    report = [run(chat, b, args) for b in args.max_batch]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
