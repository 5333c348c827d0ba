"""The worker engine's agent features on the built-in chat model: what constrained decoding and
n choices cost or gain (issue 15's targets).

1. Tokens/s at concurrency 8 (a closed loop: a finished request is replaced at once) with a
   typical 10-field json_schema grammar against the same load unconstrained, the two
   alternated round by round in one run. Target: constrained >= 90 % of unconstrained.
2. Grammar compilation for that schema, cold: `grammar.json_grammar` plus
   `Compiled.matcher` on a schema never seen before (a fresh description each run, so no
   cache helps); the median over runs. Target: < 50 ms. (The tokenizer's llguidance view is
   built once per engine and not counted; it is printed apart.)
3. One request with n=4 against the same request with n=1 (sampled, end of sequence
   ignored so every choice runs to max_tokens): completion tokens/s. Target: >= 2.5x.

Run alone on the machine (check `uptime`):
    .venv/bin/python bench/agent_engine.py [--rounds 5] [--requests 8] [--tokens 128]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_schemas import TEN_FIELDS  # noqa: E402

from workers.contract import (  # noqa: E402
    BillingIdentity,
    GenerateRequest,
    ModelRef,
    SamplingParams,
)
from workers.engine.bench import NullSink, resolve_artifact  # noqa: E402
from workers.engine.causal_lm import CausalLMEngine, CausalLMSpec  # noqa: E402
from workers.grammar import Compiled, json_grammar  # noqa: E402
from workers.runtime.models import LoadedModel, load_model, read_manifest  # noqa: E402

CONCURRENCY = 8

SCHEMA = TEN_FIELDS

PEOPLE = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana"]
IDENTITY = BillingIdentity("bench", "bench", "bench", "bench", "bench", "bench")
REF = ModelRef("bench", "onnx-causal-lm", "0" * 64, "")


def chat_ids(model: LoadedModel, question: str) -> tuple[int, ...]:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        model.manifest["chat_template"]
    )
    text = template.render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True
    )
    return tuple(model.text_tokenizer().encode(text, add_special_tokens=False).ids)


def request(rid: str, prompt: tuple[int, ...], sampling: SamplingParams) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        model=REF,
        identity=IDENTITY,
        prompt_token_ids=prompt,
        sampling=sampling,
        deadline=time.time() + 3600,
    )


def closed_loop(
    engine: CausalLMEngine, prompts: Sequence[tuple[int, ...]], sampling: SamplingParams, total: int
) -> tuple[float, int]:
    """Tokens/s with `CONCURRENCY` requests in flight until `total` have finished."""
    sink = NullSink()
    started = time.perf_counter()
    in_flight = []
    submitted = tokens = 0
    while submitted < min(CONCURRENCY, total):
        prompt = prompts[submitted % len(prompts)]
        in_flight.append(engine.submit(request(f"b{time.time_ns()}", prompt, sampling), sink))
        submitted += 1
    while in_flight:
        handle = in_flight.pop(0)
        result = handle.wait(3600)
        assert result is not None and not result.error_code, result
        tokens += result.completion_tokens
        if submitted < total:
            prompt = prompts[submitted % len(prompts)]
            in_flight.append(engine.submit(request(f"b{time.time_ns()}", prompt, sampling), sink))
            submitted += 1
    return tokens / (time.perf_counter() - started), tokens


def compile_times(
    tokenizer_file: str, eos: Sequence[int], runs: int
) -> tuple[float, list[float], list[float]]:
    """The tokenizer's llguidance view (once), then per cold schema: json_grammar + matcher,
    and the first mask after it (the rest of the work before the first constrained token),
    in ms."""
    import llguidance.numpy as lln

    t0 = time.perf_counter()
    compiled = Compiled(tokenizer_file, eos)
    build_ms = (time.perf_counter() - t0) * 1000
    bitmask = lln.allocate_token_bitmask(1, compiled.vocab_size)
    times, first_masks = [], []
    for i in range(runs):
        schema = copy.deepcopy(SCHEMA)
        schema["description"] = f"person record, run {i} {time.time_ns()}"  # never cached
        t0 = time.perf_counter()
        matcher = compiled.matcher(json_grammar(schema))
        t1 = time.perf_counter()
        lln.fill_next_token_bitmask(matcher, bitmask, 0)
        t2 = time.perf_counter()
        times.append((t1 - t0) * 1000)
        first_masks.append((t2 - t1) * 1000)
    return build_ms, times, first_masks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("artifact", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each side, alternated")
    parser.add_argument("--requests", type=int, default=8, help="requests per round")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens")
    parser.add_argument("--compile-runs", type=int, default=30)
    args = parser.parse_args(argv)

    directory = resolve_artifact(args.artifact)
    manifest = read_manifest(directory)
    model = load_model(ModelRef("bench", manifest["runtime"], manifest["sha256"], str(directory)))
    spec = CausalLMSpec.from_manifest(model.manifest)
    tokenizer_file = str(directory / str(manifest.get("tokenizer_file", "tokenizer.json")))

    # 2. Compilation first, on a quiet machine.
    build_ms, times, first_masks = compile_times(
        tokenizer_file, sorted(spec.eos_token_ids), args.compile_runs
    )

    # 1. Constrained against unconstrained, concurrency 8, alternated.
    engine = CausalLMEngine.from_model(
        model, max_batch=CONCURRENCY, max_prefill_tokens=4096, redis_client=None
    ).start()
    grammar = json_grammar(SCHEMA)
    json_prompts = [chat_ids(model, f"Describe {p}, a made-up person, as JSON.") for p in PEOPLE]
    free = SamplingParams(max_tokens=args.tokens, temperature=0.0)
    constrained = dataclasses.replace(free, grammar=grammar)
    closed_loop(engine, json_prompts, constrained, CONCURRENCY)  # warm-up (and grammar cache)
    rates: dict[str, list[float]] = {"free": [], "json": []}
    lengths: dict[str, int] = {"free": 0, "json": 0}
    for _ in range(args.rounds):
        for side, sampling in (("free", free), ("json", constrained)):
            rate, tokens = closed_loop(engine, json_prompts, sampling, args.requests)
            rates[side].append(rate)
            lengths[side] += tokens
    engine.stop()

    # 3. n=4 against n=1: the same sampled request, every choice to max_tokens.
    no_eos = dataclasses.replace(spec, eos_token_ids=frozenset())
    tokenizer = model.text_tokenizer()
    engine = CausalLMEngine(
        model.session,
        no_eos,
        lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
        max_batch=CONCURRENCY,
    ).start()
    story = [chat_ids(model, "Write a long story about a lighthouse keeper and the sea.")]
    n_rates: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(args.rounds):
        for n in (1, 4):
            sampling = SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=1, n=n)
            n_rates[n].append(closed_loop(engine, story, sampling, 1)[0])
    engine.stop()

    free_rate, json_rate = max(rates["free"]), max(rates["json"])
    # On a shared machine a burst of other work hits one round, not a neighbouring pair.
    pair_ratio = statistics.median(j / f for f, j in zip(rates["free"], rates["json"], strict=True))
    n1, n4 = max(n_rates[1]), max(n_rates[4])
    out = sys.stdout
    out.write(
        f"\nbench/agent_engine.py on {manifest['name']}: concurrency {CONCURRENCY}, "
        f"{args.requests} requests x {args.rounds} rounds per side, max_tokens {args.tokens}\n\n"
    )
    out.write("| measure | figure | target |\n| --- | --- | --- |\n")
    out.write(f"| unconstrained, tokens/s (best round) | {free_rate:.1f} | |\n")
    out.write(f"| json_schema (10 fields), tokens/s (best round) | {json_rate:.1f} | |\n")
    out.write(
        f"| constrained / unconstrained, best rounds | {100 * json_rate / free_rate:.0f} % "
        "| >= 90 % |\n"
    )
    out.write(
        f"| constrained / unconstrained, median of round pairs | {100 * pair_ratio:.0f} % "
        "| >= 90 % |\n"
    )
    out.write(
        f"| mean completion tokens, free / json | "
        f"{lengths['free'] / (args.rounds * args.requests):.0f} / "
        f"{lengths['json'] / (args.rounds * args.requests):.0f} | |\n"
    )
    out.write(
        f"| compile 10-field schema cold, median (max) of {len(times)} | "
        f"{statistics.median(times):.2f} ms ({max(times):.2f} ms) | < 50 ms |\n"
    )
    out.write(f"| first mask after it, median | {statistics.median(first_masks):.2f} ms | |\n")
    out.write(f"| llguidance tokenizer view, once per engine | {build_ms:.0f} ms | |\n")
    out.write(f"| one request n=1, tokens/s (best) | {n1:.1f} | |\n")
    out.write(f"| one request n=4, tokens/s (best) | {n4:.1f} | |\n")
    out.write(f"| n=4 / n=1 | {n4 / n1:.2f}x | >= 2.5x |\n")
    out.write("\n.venv/bin/python bench/agent_engine.py " + " ".join(sys.argv[1:]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
