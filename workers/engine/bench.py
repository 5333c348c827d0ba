"""Throughput of the batching engine against a raw ONNX Runtime loop on the same session.

Run alone on the machine (a concurrent export skews timings 2-3x):
    python -m workers.engine.bench [artifact dir or built-in name] [--batch 1 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workers.contract import BillingIdentity, GenerateRequest, ModelRef, SamplingParams
from workers.engine.base import EventSink, RequestResult
from workers.engine.causal_lm import CausalLMEngine, CausalLMSpec
from workers.runtime.models import LoadedModel, load_model, read_manifest

logger = logging.getLogger(__name__)

PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


def resolve_artifact(name_or_path: str) -> Path:
    """An artifact directory, given directly or by built-in name through the store's index."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    store = Path(os.environ.get("MANTLE_ARTIFACT_DIR", "~/.cache/mantle/artifacts")).expanduser()
    for index in sorted((store / "builtin").glob("*.json"), key=lambda p: p.stat().st_mtime):
        entry = json.loads(index.read_text(encoding="utf-8"))
        if entry.get("name") == name_or_path and (store / entry["sha256"]).is_dir():
            path = store / entry["sha256"]
    if not path.is_dir():
        raise SystemExit(f"no artifact {name_or_path!r} in {store}")
    return path


def raw_greedy(model: LoadedModel, prompts: Sequence[Sequence[int]], tokens: int) -> float:
    """Tokens/s of the plainest batched loop (prefill, then argmax steps) through the graph's
    own interface: lm_gate's decoder runs the traced graph and the in-place one."""
    from workers.compile.lm_gate import Decoder

    spec = CausalLMSpec.from_manifest(model.manifest)
    decoder = Decoder(model.session, spec.pad_token_id)
    started = time.perf_counter()
    logits, past, mask = decoder.start(prompts)
    for _ in range(tokens - 1):
        next_ids = np.argmax(logits, axis=-1).astype(np.int64)
        logits, past, mask = decoder.step(next_ids, past, mask)
    np.argmax(logits, axis=-1)
    return len(prompts) * tokens / (time.perf_counter() - started)


class NullSink:
    """Events go nowhere: an engine's own cost is measured, not Redis's."""

    def delta(
        self,
        request_id: str,
        text: str,
        tokens: int,
        index: int | None = None,
        logprobs: list[Any] | None = None,
    ) -> None:
        pass

    def prompt_logprobs(self, request_id: str, logprobs: list[Any]) -> None:
        pass

    def choice_done(
        self, request_id: str, index: int, finish_reason: str, completion_tokens: int
    ) -> None:
        pass

    def done(
        self,
        request_id: str,
        finish_reason: str,
        prompt: int,
        completion: int,
        *,
        cached_tokens: int = 0,
        result: RequestResult | None = None,
    ) -> None:
        pass

    def embeddings(
        self,
        request_id: str,
        vectors: np.ndarray,
        prompt_tokens: int,
        *,
        result: RequestResult | None = None,
    ) -> None:
        pass

    def error(
        self, request_id: str, code: str, message: str, *, result: RequestResult | None = None
    ) -> None:
        pass

    def flush(self) -> None:
        pass


def engine_greedy(
    model: LoadedModel, prompts: Sequence[Sequence[int]], tokens: int, redis_url: str
) -> float:
    """Tokens/s of the engine for the same work, events written to Redis when a URL is given."""
    # EOS is ignored so that both sides generate exactly `tokens` per sequence.
    spec = dataclasses.replace(
        CausalLMSpec.from_manifest(model.manifest), eos_token_ids=frozenset()
    )
    tokenizer = model.text_tokenizer()

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    sink: EventSink
    client = None
    if redis_url:
        import redis

        from workers.streams import ResponseWriter

        client = redis.Redis.from_url(redis_url)
        sink = ResponseWriter(client, ttl_s=30)
    else:
        sink = NullSink()
    engine = CausalLMEngine(
        model.session, spec, decode, max_batch=len(prompts), redis_client=client
    ).start()
    identity = BillingIdentity("bench", "bench", "bench", "bench", "bench", "bench")
    ref = ModelRef("bench", "onnx-causal-lm", "0" * 64, "")
    try:
        started = time.perf_counter()
        handles = [
            engine.submit(
                GenerateRequest(
                    request_id=f"bench-{time.time_ns()}-{i}",
                    model=ref,
                    identity=identity,
                    prompt_token_ids=tuple(p),
                    sampling=SamplingParams(max_tokens=tokens, temperature=0.0),
                    deadline=time.time() + 600,
                ),
                sink,
            )
            for i, p in enumerate(prompts)
        ]
        total = 0
        for handle in handles:
            result = handle.wait(600)
            assert result is not None
            total += result.completion_tokens
        return total / (time.perf_counter() - started)
    finally:
        engine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "artifact",
        nargs="?",
        default="smollm2-135m-instruct",
        help="artifact directory of an onnx-causal-lm model, or a built-in model's name",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--redis", default="", help="write events to this Redis (db!) as a worker does"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory = resolve_artifact(args.artifact)
    manifest = read_manifest(directory)
    model = load_model(ModelRef("bench", manifest["runtime"], manifest["sha256"], str(directory)))
    prompt = model.text_tokenizer().encode(PROMPT).ids
    raw_greedy(model, [prompt], 4)  # warm-up
    for batch in args.batch:
        # Prompts of slightly different lengths, as real traffic has.
        prompts = [prompt[: len(prompt) - (i % 4)] for i in range(batch)]
        raw = max(raw_greedy(model, prompts, args.tokens) for _ in range(args.repeat))
        eng = max(
            engine_greedy(model, prompts, args.tokens, args.redis) for _ in range(args.repeat)
        )
        sys.stdout.write(
            f"batch {batch}: raw onnxruntime {raw:.1f} tok/s, engine {eng:.1f} tok/s "
            f"({100 * eng / raw:.0f}%)\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
