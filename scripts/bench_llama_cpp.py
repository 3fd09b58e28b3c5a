#!/usr/bin/env python3
"""llama.cpp baseline for `baton-lab engine --baseline llama-cpp`.

Measures, on the same GGUF and thread count, what baton's engine benchmark measures: prompt
processing (prefill) tokens/s for given prompt lengths, and single-stream greedy decode tokens/s.
Prints one JSON object. Needs `pip install llama-cpp-python` (builds llama.cpp from source).
"""
import argparse
import json
import sys
import time

try:
    import numpy as np
    from llama_cpp import Llama
except ImportError as e:  # pragma: no cover - reported to the caller as a clear error
    sys.exit(f"bench_llama_cpp: {e}; install with: pip install llama-cpp-python")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-lens", default="128,512")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lens = [int(x) for x in args.prompt_lens.split(",")]

    t0 = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_ctx=2048,
        n_batch=512,
        n_ubatch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    text = "The quick brown fox jumps over the lazy dog. " * 200
    base = llm.tokenize(text.encode(), add_bos=False)

    out = {"load_s": load_s, "threads": args.threads}
    for n in lens:
        tokens = (base * (n // len(base) + 1))[:n]
        best = None
        for _ in range(args.repeats):
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
            t = time.perf_counter()
            llm.eval(tokens)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        out[f"prefill_{n}_tok_s"] = n / best

    decode = []
    for _ in range(args.repeats):
        llm.reset()
        llm.eval(base[:16])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(args.decode_tokens):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode.append(args.decode_tokens / (time.perf_counter() - t))
    out["decode_tok_s"] = max(decode)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
