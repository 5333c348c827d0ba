"""llama.cpp's greedy decode rate on a GGUF, the baseline of bench/decode_engine.py.

Runs in a benchmark-only environment with llama-cpp-python (never in the platform's):
    <llama venv>/bin/python bench/llamacpp_decode.py MODEL.gguf --threads 2 --tokens 128
Prints one JSON line: tokens/s of decoding (first token to last; the prompt excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default="Write a long story about dragons.")
    args = parser.parse_args()

    from llama_cpp import Llama

    # n_ubatch=1: llama.cpp's batched prompt path crashed on this CPU (issue 16).
    llm = Llama(
        model_path=args.gguf,
        n_ctx=2048,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ubatch=1,
        verbose=False,
    )
    text = f"<|im_start|>user\n{args.prompt}<|im_end|>\n<|im_start|>assistant\n"
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
    rates = []
    for _ in range(args.runs):
        llm.reset()
        times: list[float] = []
        # generate() does not stop at the end of sequence: every run decodes `tokens`.
        for _token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == args.tokens:
                break
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "threads": args.threads,
                "tokens": args.tokens,
                "decode_tok_s": round(statistics.median(rates), 1),
                "runs": [round(r, 1) for r in rates],
            }
        )
    )


if __name__ == "__main__":
    main()
