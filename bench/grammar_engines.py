"""Grammar engines for constrained decoding, measured on the built-in chat model's tokenizer.

Why the platform uses llguidance (docs/decisions.md): this compares the three engines issue
15 names, on what the gateway and the worker do per request with them: compile a typical
10-field JSON schema against SmolLM2's 49k-token vocabulary (cold, no cache), then compute
the allowed-token mask and advance, token by token, along a valid answer.

The engines are not all platform dependencies (xgrammar needs torch), so this runs in the
compile nodes' prepare venv (it has torch and transformers) with the three engines put
beside it in a scratch directory:

    P=$(ls -d ~/.cache/mantle/venvs/prepare-*)/bin
    $P/pip install -q --target /tmp/grammar-engines --no-deps \\
        llguidance outlines-core xgrammar apache-tvm-ffi
    PYTHONPATH=/tmp/grammar-engines:. $P/python bench/grammar_engines.py

Prints a markdown table: compile time (median of runs), time per token (mask + advance,
mean over the answer), and whether each engine accepted the whole answer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_schemas import TEN_FIELDS

SCHEMA = TEN_FIELDS
ANSWER = (
    '{"name": "Marie Curie", "email": "marie@example.org", "age": 66, "height_m": 1.6, '
    '"active": false, "city": "Paris", "country": "FR", "tags": ["physics", "chemistry"], '
    '"score": 9.5, "notes": null}'
)


def tokenizer_file() -> Path:
    home = Path(os.environ.get("MANTLE_HOME", Path.home() / ".cache" / "mantle"))
    store = Path(os.environ.get("MANTLE_ARTIFACT_DIR", home / "artifacts"))
    for index in sorted((store / "builtin").glob("smollm2*.json")):
        return store / json.loads(index.read_text())["sha256"] / "tokenizer.json"
    raise SystemExit("the built-in chat model is not built: run bin/prepare-models")


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    times = []
    out = None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_llguidance(path: Path, ids: list[int], runs: int) -> dict[str, Any]:
    import llguidance
    import llguidance.numpy as lnp

    tokenizer = llguidance.LLTokenizer(str(path), eos_token=2)
    text = json.dumps(SCHEMA)

    def compile_once() -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
        return llguidance.LLMatcher(tokenizer, grammar, log_level=0)

    compile_s, matcher = timed(compile_once, runs)
    mask = lnp.allocate_token_bitmask(1, tokenizer.vocab_size)
    start = time.perf_counter()
    ok = True
    for token in ids:
        lnp.fill_next_token_bitmask(matcher, mask, 0)
        if not (mask[0, token // 32] >> (token % 32)) & 1:
            ok = False
            break
        matcher.consume_token(token)
    per_token = (time.perf_counter() - start) / len(ids)
    return {"compile_s": compile_s, "per_token_s": per_token, "accepted": ok}


def bench_outlines(path: Path, ids: list[int], runs: int) -> dict[str, Any]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    by_text: dict[str, list[int]] = {}
    for token_id in range(hf.vocab_size):
        if token_id == 2:
            continue
        piece = hf.convert_tokens_to_string([hf.convert_ids_to_tokens(token_id)])
        by_text.setdefault(piece, []).append(token_id)
    vocabulary = Vocabulary(2, by_text)
    text = json.dumps(SCHEMA)

    def compile_once() -> Any:
        return Index(build_regex_from_schema(text), vocabulary)

    compile_s, index = timed(compile_once, max(1, runs // 4))
    guide = Guide(index)
    start = time.perf_counter()
    ok = True
    for token in ids:
        allowed = guide.get_tokens()
        if token not in allowed:
            ok = False
            break
        guide.advance(token)
    per_token = (time.perf_counter() - start) / len(ids)
    return {"compile_s": compile_s, "per_token_s": per_token, "accepted": ok}


def bench_xgrammar(path: Path, ids: list[int], runs: int) -> dict[str, Any]:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|im_end|>")  # noqa: S106 (a token)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=hf.vocab_size)
    text = json.dumps(SCHEMA)

    def compile_once() -> Any:
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        return compiler.compile_json_schema(text, any_whitespace=False)

    compile_s, compiled = timed(compile_once, runs)
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    start = time.perf_counter()
    ok = True
    for token in ids:
        matcher.fill_next_token_bitmask(mask)
        row = mask[0].numpy()
        if not (int(row[token // 32]) >> (token % 32)) & 1:
            ok = False
            break
        matcher.accept_token(token)
    per_token = (time.perf_counter() - start) / len(ids)
    return {"compile_s": compile_s, "per_token_s": per_token, "accepted": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    from tokenizers import Tokenizer

    path = tokenizer_file()
    ids = Tokenizer.from_file(str(path)).encode(ANSWER, add_special_tokens=False).ids
    print(f"schema: 10 fields; answer: {len(ids)} tokens; vocabulary: {path}", file=sys.stderr)
    rows = []
    for name, fn in (
        ("llguidance", bench_llguidance),
        ("outlines-core", bench_outlines),
        ("xgrammar", bench_xgrammar),
    ):
        try:
            result = fn(path, ids, args.runs)
        except ImportError as exc:
            rows.append(f"| {name} | not installed ({exc.name}) | | |")
            continue
        rows.append(
            f"| {name} | {result['compile_s'] * 1000:.1f} ms | "
            f"{result['per_token_s'] * 1e6:.0f} us | {'yes' if result['accepted'] else 'NO'} |"
        )
    print("| engine | compile (10-field schema, cold) | mask + advance per token | accepted |")
    print("| --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
