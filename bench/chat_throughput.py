"""Chat tokens/s through the whole platform vs raw onnxruntime batched greedy generation.

Run alone on the machine:  .venv/bin/python bench/chat_throughput.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from httpload import run_load  # noqa: E402
from platform_stack import BenchStack  # noqa: E402

from tests.support.stack import artifact_dir, builtin_manifests  # noqa: E402
from workers.compile import lm_gate  # noqa: E402
from workers.runtime.models import model_file  # noqa: E402

TOPICS = [
    "dragons",
    "the sea",
    "a lighthouse",
    "Paris",
    "a robot",
    "winter",
    "a garden",
    "the moon",
    "a library",
    "trains",
    "a storm",
    "music",
    "a desert",
    "bees",
    "a mountain",
    "friendship",
    "a river",
    "castles",
    "the forest",
    "a clock",
    "volcanoes",
    "a ship",
    "tea",
    "the stars",
    "a market",
    "snow",
    "a bridge",
    "owls",
    "the harvest",
    "a kite",
    "an island",
    "bread",
]


def prompts() -> list[str]:
    return [f"Write a long story about {t}." for t in TOPICS]


def raw_baseline(manifest: dict[str, Any], batch: int, new_tokens: int) -> float:
    """Batched greedy generation straight on onnxruntime, fixed steps (lm_gate's decoder)."""
    import onnxruntime as ort
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

    location = Path(str(manifest["location"]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("MANTLE_ORT_THREADS", os.cpu_count() or 1))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The graph a worker serves: the manifest's, or the variant MANTLE_MODEL_VARIANT names.
    session = ort.InferenceSession(
        str(location / model_file(manifest)), options, providers=["CPUExecutionProvider"]
    )
    tokenizer = Tokenizer.from_file(str(location / "tokenizer.json"))
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        str(manifest["chat_template"])
    )
    texts = [
        template.render(messages=[{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts()[:batch]
    ]
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    # Either graph interface: the traced one (left-padded, presents copied out) or the
    # in-place one (right-padded buffers, the served graph since issue 16).
    decoder = lm_gate.Decoder(session, int(manifest.get("pad_token_id") or 0))
    started = time.perf_counter()
    logits, past, mask = decoder.start(ids)
    for step in range(new_tokens):
        next_ids = logits.argmax(axis=-1).astype(np.int64)
        if step + 1 < new_tokens:
            logits, past, mask = decoder.step(next_ids, past, mask)
    return batch * new_tokens / (time.perf_counter() - started)


async def platform_rate(
    stack: BenchStack, concurrency: int, new_tokens: int, rounds: int
) -> tuple[float, dict[int, int]]:
    bodies = [
        {
            "model": "smollm2-135m-instruct",
            "temperature": 0,
            "max_tokens": new_tokens,
            "messages": [{"role": "user", "content": p}],
        }
        for p in prompts()
    ]
    result = await run_load(
        stack.url,
        "/v1/chat/completions",
        bodies,
        stack.secret,
        concurrency=concurrency,
        requests=concurrency * rounds,
    )
    return result.completion_tokens / result.elapsed, result.statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="requests per client")
    parser.add_argument("--concurrency", default="1,8,32")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    chat = next(m for m in builtin_manifests(artifact_dir()) if m["runtime"] == "onnx-causal-lm")
    raw = {c: raw_baseline(chat, c, args.tokens) for c in levels}
    stack = BenchStack()
    stack.bootstrap()
    try:
        stack.start(8790)
        asyncio.run(platform_rate(stack, 1, 8, 1))  # load the model, warm caches
        platform = {
            c: asyncio.run(platform_rate(stack, c, args.tokens, args.rounds)) for c in levels
        }
    finally:
        stack.stop()
    rows = []
    for c in levels:
        rate, statuses = platform[c]
        rows.append(
            {
                "concurrency": c,
                "raw_tok_s": round(raw[c], 1),
                "platform_tok_s": round(rate, 1),
                "ratio": round(rate / raw[c], 3),
                "statuses": statuses,
            }
        )
    base = platform[levels[0]][0]
    print(
        json.dumps(
            {
                "new_tokens": args.tokens,
                "rows": rows,
                "speedup_vs_c1": {c: round(platform[c][0] / base, 2) for c in levels},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
