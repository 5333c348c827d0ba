"""fp32 against 4-bit weights (MatMulNBits) for the built-in chat model, in a plain decode loop.

No platform: one ONNX Runtime session, a left-padded prefill of a 16-token prompt, then
greedy argmax steps with the KV cache fed back. For each graph (fp32, and 4-bit at
accuracy levels 0, 1 and 4, built here from the fp32 graph by workers/compile/int4.py with
the built-in recipe's options) and batch size: decode tokens/s (batch x steps / seconds,
the median of `--reps` runs) and the process's resident memory after loading and after
the runs. Every configuration runs in a fresh child process, so each RSS is its own.

Run alone on the machine (check `uptime`), after bin/prepare-models:
    .venv/bin/python bench/quantized_decode.py [--fp32 PATH] [--steps 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.compile import builtin, int4  # noqa: E402

PROMPT = [1, 504, 3575, 282, 4649, 314, 253, 1345, 11, 1070, 314, 282, 3575, 282, 4649, 314]
PAD = 2


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(model: str, batch: int, threads: int, steps: int, reps: int) -> dict[str, object]:
    """One configuration, measured in this process."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    started = time.monotonic()
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    load_s = time.monotonic() - started
    rss_load = rss_mb()
    inputs = {i.name: i for i in sess.get_inputs()}
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    kv, hd = inputs["past_key_values.0.key"].shape[1], inputs["past_key_values.0.key"].shape[3]
    names = [o.name for o in sess.get_outputs()]

    def run_once() -> float:
        ids = np.array([PROMPT] * batch, dtype=np.int64)
        mask = np.ones_like(ids)
        past = {
            f"past_key_values.{i}.{k}": np.zeros((batch, kv, 0, hd), dtype=np.float32)
            for i in range(layers)
            for k in ("key", "value")
        }
        pos = np.arange(ids.shape[1], dtype=np.int64)[None, :].repeat(batch, 0)
        t0 = 0.0
        for step in range(steps + 1):
            if step == 1:
                t0 = time.perf_counter()  # decode only: the prefill is not timed
            out = dict(
                zip(
                    names,
                    sess.run(
                        None,
                        {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past},
                    ),
                    strict=True,
                )
            )
            ids = out["logits"][:, -1, :].argmax(-1).astype(np.int64)[:, None]
            past = {k: out[k.replace("past_key_values", "present")] for k in past}
            pos = np.full((batch, 1), mask.shape[1], dtype=np.int64)
            mask = np.ones((batch, mask.shape[1] + 1), dtype=np.int64)
        return batch * steps / (time.perf_counter() - t0)

    run_once()  # warm-up (allocations, prepacking touched)
    rates = [run_once() for _ in range(reps)]
    return {
        "tok_s": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
        "load_s": round(load_s, 2),
        "rss_load_mb": round(rss_load),
        "rss_mb": round(rss_mb()),
    }


def build_variants(fp32: Path, cache: Path, head_bits: int) -> dict[str, Path]:
    """fp32 and the 4-bit graphs at accuracy levels 0, 1, 4 (built once into `cache`)."""
    cache.mkdir(parents=True, exist_ok=True)
    graphs = {"fp32": fp32}
    for level in (0, 1, 4):
        out = cache / f"int4-level{level}-head{head_bits}.onnx"
        if not out.is_file():
            int4.quantize(fp32, out, int4.Options(accuracy_level=level, head_bits=head_bits))
        graphs[f"int4 level {level}"] = out
    return graphs


def default_fp32() -> Path:
    store = Path(os.environ.get("MANTLE_ARTIFACT_DIR", "~/.cache/mantle/artifacts")).expanduser()
    (recipe,) = builtin.select("smollm2")
    found = builtin.lookup(store, builtin.recipe_key(recipe, builtin.read_pins()), full=False)
    if not isinstance(found, tuple):
        raise SystemExit(f"the built-in chat model is not built: {found} (bin/prepare-models)")
    directory, manifest = found
    variant = manifest.get("variants", {}).get("fp32", {}).get("model_file")
    return directory / (variant or manifest["model_file"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, help="the fp32 graph (default: the built-in's)")
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "mantle" / "bench" / "int4"
    )
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--graphs", help="comma-separated subset, e.g. 'fp32,int4 level 4'")
    parser.add_argument(
        "--head-bits", type=int, default=int4.Options().head_bits, help="the LM head's bits"
    )
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BATCH", "THREADS"))
    args = parser.parse_args()
    if args.child:
        model, batch, threads = args.child
        print(json.dumps(child(model, int(batch), int(threads), args.steps, args.reps)))
        return 0
    graphs = build_variants(args.fp32 or default_fp32(), args.cache, args.head_bits)
    if args.graphs:
        graphs = {k: v for k, v in graphs.items() if k in args.graphs.split(",")}
    configs = [(g, b, 2) for g in graphs for b in map(int, args.batches.split(","))]
    configs += [(g, 1, 1) for g in graphs]
    print("| graph | batch | threads | tokens/s (median) | runs | RSS after load MB | RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for graph, batch, threads in configs:
        argv = [sys.executable, __file__, "--steps", str(args.steps), "--reps", str(args.reps)]
        argv += ["--child", str(graphs[graph]), str(batch), str(threads)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"| {graph} | {batch} | {threads} | {r['tok_s']} | {r['runs']} | "
            f"{r['rss_load_mb']} | {r['rss_mb']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
