#!/usr/bin/env python3
"""KV memory saved by sharing blocks: parallel sampling (n = 4) and beam search
(width 4), against the same outputs without sharing.

    python tools/bench_sharing.py                        # SmolLM2-135M on the CPU
    python tools/bench_sharing.py --prompts 64 --prompt-len 512 --new 64 --json sharing.json

For each mode all prompts are submitted at once. "Without sharing" is the sum
of the live sequences' block tables (what each sequence would hold if it owned
its blocks, as a system without PagedAttention's sharing must); "with
sharing" is the physical blocks in use. Both are peaks over the run; the
saving is 1 - physical / logical, the figure the PagedAttention paper reports
(6-30% for parallel sampling, 37-66% for beam search). For n = 4 the run is
also repeated as 4 independent requests per prompt (no fork, no prefix cache)
to compare throughput.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date

import numpy as np

import pagedrt


def run(model, prompts, a, label, per_prompt, **params):
    with pagedrt.Runtime(model, device="cpu", num_threads=a.threads, kv_cache_bytes=a.kv_cache_mib << 20,
                         max_num_seqs=a.max_num_seqs, enable_prefix_caching=params.pop("prefix", True)) as rt:
        t0 = time.perf_counter()
        ids = [rt.submit(p, **params) for p in prompts for _ in range(per_prompt)]
        left, tokens = set(ids), 0
        while left:
            for ev in rt.poll(timeout=0.1):
                tokens += len(ev.token_ids)
                if ev.request_finished:
                    left.discard(ev.request_id)
            print(f"\r{label}: {len(ids) - len(left)}/{len(ids)} requests", end="", file=sys.stderr)
        print(file=sys.stderr)
        s = rt.stats()
        secs = time.perf_counter() - t0
    return dict(mode=label, seconds=secs, output_tokens=tokens, tok_s=tokens / secs,
                peak_physical=s.peak_blocks_used, peak_logical=s.peak_blocks_logical,
                saving=1 - s.peak_blocks_used / max(1, s.peak_blocks_logical), copies=s.num_copies,
                preemptions=s.num_preemptions)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--kv-cache-mib", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model = pagedrt.resolve_model(a.model)
    rng = np.random.default_rng(0)
    vocab = pagedrt.Tokenizer.from_model_dir(model).vocab_size
    prompts = [rng.integers(100, vocab, size=a.prompt_len).tolist() for _ in range(a.prompts)]
    common = dict(max_tokens=a.new, ignore_eos=True)
    rows = [
        run(model, prompts, a, "n=4 sampling, shared", 1, n=4, temperature=1.0, seed=0, **common),
        run(model, prompts, a, "n=4 as 4 requests", 4, temperature=1.0, seed=0, prefix=False, **common),
        run(model, prompts, a, "beam width 4, shared", 1, beam_width=4, n=4, **common),
    ]
    print(f"\n{model.name}: {a.prompts} prompts x {a.prompt_len} tokens, {a.new} new, block 16, "
          f"{a.threads} threads, {date.today()}")
    print(f"{'mode':<24} {'peak blocks':>12} {'w/o sharing':>12} {'saved':>7} {'copies':>7} {'tok/s':>8}")
    for r in rows:
        print(f"{r['mode']:<24} {r['peak_physical']:>12} {r['peak_logical']:>12} {100 * r['saving']:>6.1f}% "
              f"{r['copies']:>7} {r['tok_s']:>8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(model=model.name, date=str(date.today()), args=vars(a), results=rows), f, indent=2)


if __name__ == "__main__":
    main()
