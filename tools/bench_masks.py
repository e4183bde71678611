#!/usr/bin/env python3
"""Where structured output's mask time goes (issue 19): llguidance's cost per
row on the token sequences a real run produced, outside the engine.

    bench_masks.py [--model DIR|FILE.gguf] [--requests 32] [--max-tokens 64]
                   [--threads 1,2,4,8] [--schema bounded|unbounded] [--json OUT.json]

First runs --requests JSON-schema requests (tools/bench_structured.py's
schema and prompts, greedy) through a Runtime on the CPU and keeps their
tokens; the engine's own mask time per row is printed. Then replays those
tokens through fresh matchers, step by step as the engine meets them: every
live row's mask computed (serially with llguidance's trie slices and with the
engine's, structured.trie_slices; then on llguidance's LLExecutor of each
thread count, with the engine's), then each row fed its token. Prints microseconds per row and
per step. The engine's figure against the serial replay shows what the engine
adds (the GIL, the forward's threads); the executor's against the serial one,
what spreading a step's rows over threads buys. The serial replays print
the rows' median, 90th percentile and slowest time too: near a string's
maxLength (--schema bounded, bench_structured's) llguidance walks every
token longer than what is left; --schema unbounded drops the maxLength.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_structured import schema_of  # noqa: E402


def replay(tokenizer, grammar, seqs, words, executor=None):
    """Seconds spent computing masks, the number of rows computed, and (serially)
    the sum over steps of each step's longest row and each row's seconds."""
    import llguidance
    matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in seqs]
    buf = np.zeros((len(seqs), words), np.uint32)
    total, rows, longest, times = 0.0, 0, 0.0, []
    for step in range(max(len(s) for s in seqs)):
        live = [i for i, s in enumerate(seqs) if step < len(s)]
        t0 = time.perf_counter()
        if executor is None:
            worst = 0.0
            for i in live:
                r0 = time.perf_counter()
                matchers[i].unsafe_compute_mask_ptr(buf[i].ctypes.data, words * 4)
                times.append(time.perf_counter() - r0)
                worst = max(worst, times[-1])
            longest += worst
        else:
            executor.unsafe_compute_mask_ptr([(matchers[i], i) for i in live], buf.ctypes.data, words * 4, len(seqs))
        total += time.perf_counter() - t0
        rows += len(live)
        for i in live:
            matchers[i].consume_token(seqs[i][step])
    return total, rows, longest, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--schema", default="bounded", choices=("bounded", "unbounded"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    schema = schema_of(args.schema)
    import llguidance

    import pagedrt
    from pagedrt.structured import grammar_of, trie_slices

    with pagedrt.Runtime(args.model, device="cpu", progress=False) as rt:
        prompts = [[{"role": "user", "content": f"Invent person number {i} and describe them as JSON."}]
                   for i in range(args.requests)]
        outs = rt.generate(prompts, max_tokens=args.max_tokens, temperature=0, json_schema=schema)
        seqs = [o.outputs[0].token_ids for o in outs]
        cons = rt._constraints()
        counters = cons.counters()
        engine_us = 1e6 * counters["fill_seconds"] / max(counters["fill_rows"], 1)
        tokenizer, words = cons.tokenizer, cons.words
    grammar = grammar_of("json_schema", schema)
    res = {"requests": args.requests, "schema": args.schema, "rows_per_step_max": len(seqs),
           "engine_us_per_row": engine_us, "replay": {}}
    print(f"engine (CPU run, masks beside the forward): {engine_us:.0f} us per row", flush=True)
    steps = max(len(s) for s in seqs)
    # The engine's trie slices (structured.trie_slices) against llguidance's own: the same masks
    slices = trie_slices()
    sliced = tokenizer.with_slices(slices) if slices else tokenizer
    for name, tok in (("llguidance's slices", tokenizer), ("pagedrt's slices", sliced)):
        t, n, longest, times = replay(tok, grammar, seqs, words)
        p50, p90, top = (1e6 * float(v) for v in np.percentile(times, [50, 90, 100]))
        res["replay"]["serial" if tok is sliced else "serial_library_slices"] = {
            "us_per_row": 1e6 * t / n, "longest_row_us_per_step": 1e6 * longest / steps,
            "row_us_p50": p50, "row_us_p90": p90, "row_us_max": top}
        print(f"replay, serial, {name:20s} {1e6 * t / n:6.0f} us per row (median {p50:.0f}, 90th percentile "
              f"{p90:.0f}, slowest {top:.0f}), a step's longest row {1e6 * longest / steps:6.0f} us", flush=True)
    for k in (int(x) for x in args.threads.split(",")):
        t, n, _, _ = replay(sliced, grammar, seqs, words, llguidance.LLExecutor(num_threads=k))
        res["replay"][f"executor_{k}"] = {"us_per_row": 1e6 * t / n}
        print(f"replay, LLExecutor({k:2d}):    {1e6 * t / n:6.0f} us per row", flush=True)
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
