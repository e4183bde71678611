#!/usr/bin/env python3
"""Batch-1 CPU benchmark: pagedrt against transformers on the same model and prompt.

    python tools/bench_cpu.py                      # SmolLM2-135M-Instruct, 2 threads
    python tools/bench_cpu.py --model DIR --threads 4 --prompt-len 128 --new 128 --json out.json

Reports, per engine, the median over --runs runs of: prefill tokens/s (prompt
tokens / time to first token) and decode tokens/s (generated tokens after the
first / time from first to last token). Greedy, eos ignored, same prompt ids.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, copied and sold across Europe. ")


def prompt_ids(tokenizer, n):
    ids = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:n]


def bench_pagedrt(model_dir, ids, new, threads, dtype, runs):
    import pagedrt
    t0 = time.perf_counter()
    rt = pagedrt.Runtime(model_dir, device="cpu", dtype=dtype, num_threads=threads)
    load = time.perf_counter() - t0
    out = []
    with rt:
        for r in range(runs + 1):  # the first run warms up
            start = time.perf_counter()
            rid = rt.submit(ids, pagedrt.SamplingParams(max_tokens=new, ignore_eos=True, temperature=0))
            first, n, done = None, 0, False
            while not done:
                for ev in rt.poll(rid, timeout=1.0):
                    n += len(ev.token_ids)
                    if first is None and ev.token_ids:
                        first = time.perf_counter()
                    done = ev.finished
            end = time.perf_counter()
            if r:
                out.append((len(ids) / (first - start), (n - 1) / (end - first)))
            print(f"  pagedrt {dtype} run {r}{' (warm-up)' if r == 0 else ''}: "
                  f"{(first - start) * 1e3:.1f} ms TTFT, {(n - 1) / (end - first):.1f} tok/s",
                  file=sys.stderr)
    return load, out


def bench_transformers(model_dir, ids, new, threads, runs):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    out = []
    with torch.inference_mode():
        for r in range(runs + 1):
            start = time.perf_counter()
            res = model(torch.tensor([ids]), use_cache=True)
            past, tok = res.past_key_values, res.logits[0, -1].argmax()
            first = time.perf_counter()
            for _ in range(new - 1):
                res = model(tok.view(1, 1), past_key_values=past, use_cache=True)
                past, tok = res.past_key_values, res.logits[0, -1].argmax()
            end = time.perf_counter()
            if r:
                out.append((len(ids) / (first - start), (new - 1) / (end - first)))
            print(f"  transformers run {r}{' (warm-up)' if r == 0 else ''}: "
                  f"{(first - start) * 1e3:.1f} ms TTFT, {(new - 1) / (end - first):.1f} tok/s",
                  file=sys.stderr)
    return load, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16", help="pagedrt weight dtypes to run")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--json", default=None, help="write the results here too")
    a = p.parse_args(argv)

    import pagedrt
    model_dir = pagedrt.resolve_model(a.model)
    ids = prompt_ids(pagedrt.Tokenizer.from_model_dir(model_dir), a.prompt_len)
    rows = []
    for dtype in a.dtypes.split(","):
        print(f"pagedrt ({dtype}) ...", file=sys.stderr)
        load, res = bench_pagedrt(model_dir, ids, a.new, a.threads, dtype, a.runs)
        rows.append((f"pagedrt {dtype}", load, res))
    if not a.no_transformers:
        print("transformers (float32) ...", file=sys.stderr)
        load, res = bench_transformers(model_dir, ids, a.new, a.threads, a.runs)
        rows.append(("transformers float32", load, res))

    results = []
    for name, load, res in rows:
        results.append(dict(engine=name, load_s=load,
                            prefill_tok_s=statistics.median(r[0] for r in res),
                            decode_tok_s=statistics.median(r[1] for r in res)))
    base = next((r for r in results if r["engine"].startswith("transformers")), None)
    print(f"\n{model_dir.name}, prompt {a.prompt_len} tokens, {a.new} new, {a.threads} threads, "
          f"median of {a.runs} ({platform.processor() or platform.machine()}, {date.today()})")
    print(f"{'engine':<22} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs HF':>13}")
    for r in results:
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        print(f"{r['engine']:<22} {r['load_s']:>7.2f} {r['prefill_tok_s']:>14.1f} "
              f"{r['decode_tok_s']:>13.1f} {ratio:>13}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(model=str(model_dir), threads=a.threads, prompt_len=a.prompt_len,
                           new=a.new, runs=a.runs, date=str(date.today()), results=results), f, indent=2)


if __name__ == "__main__":
    main()
