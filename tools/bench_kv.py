#!/usr/bin/env python3
"""KV-cache benchmarks: memory waste at the peak of a mixed-length workload, and
a shared system prompt with the prefix cache on and off.

    python tools/bench_kv.py                         # SmolLM2-135M on the CPU, defaults below
    python tools/bench_kv.py --requests 200 --prefix-requests 200 --json kv.json

waste: all requests are submitted at once; input and output lengths are drawn
(fixed seed) from log-normal distributions with long tails (medians --in-median
and --out-median, clipped at --in-max / --out-max), eos ignored. While the
engine runs, stats are sampled; at the sample where KV blocks in use peak we
report pagedrt's waste (1 - token slots in use / slots in allocated blocks) and,
for the same running requests at that instant, what a contiguous allocator
would waste reserving prompt + max_tokens per request (the best a
pre-allocating system can do) and max_model_len per request (what the vLLM
paper calls prior systems' practice).

prefix: --prefix-requests requests = one --prefix-len-token system prompt + a
distinct --suffix-len-token question each, --prefix-new tokens generated; run
with enable_prefix_caching on and off; reports hit rate and throughput.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date

import numpy as np

import pagedrt


def progress(msg):
    print(f"\r\x1b[K{msg}" if sys.stderr.isatty() else msg, end="" if sys.stderr.isatty() else "\n",
          file=sys.stderr, flush=True)


def lognormal(rng, median, sigma, lo, hi, n):
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def waste_run(model, a):
    rng = np.random.default_rng(0)
    ins = lognormal(rng, a.in_median, 1.0, 4, a.in_max, a.requests)
    outs = lognormal(rng, a.out_median, 1.0, 1, a.out_max, a.requests)
    with pagedrt.Runtime(model, device="cpu", num_threads=a.threads, max_num_seqs=a.max_num_seqs,
                         kv_cache_bytes=a.kv_cache_mib << 20) as rt:
        vocab = rt.model_info.vocab_size
        max_len = rt.model_info.max_model_len
        ids = {}
        for n_in, n_out in zip(ins, outs):
            rid = rt.submit(rng.integers(100, vocab, size=int(n_in)).tolist(), max_tokens=int(n_out),
                            ignore_eos=True, temperature=0)
            ids[rid] = [int(n_in), int(n_out), 0, False]     # prompt, max_tokens, generated, finished
        best, t0, done = None, time.perf_counter(), 0
        while done < len(ids):
            for ev in rt.poll(timeout=0.05):
                r = ids[ev.request_id]
                r[2] += len(ev.token_ids)
                if ev.finished:
                    r[3] = True
                    done += 1
            s = rt.stats()
            if best is None or s.blocks_used > best["blocks_used"]:
                live = [r for r in ids.values() if r[2] > 0 and not r[3]]
                used = sum(r[0] + r[2] - 1 for r in live)  # tokens holding K/V
                best = dict(blocks_used=s.blocks_used, waste=s.waste, running=s.num_running,
                            contiguous_reserve_waste=1 - used / max(1, sum(r[0] + r[1] for r in live)),
                            contiguous_max_len_waste=1 - used / max(1, len(live) * max_len))
            progress(f"waste: {done}/{len(ids)} done, {s.blocks_used}/{s.num_blocks} blocks, "
                     f"{s.tokens_per_s:.0f} tok/s")
        s = rt.stats()
        elapsed = time.perf_counter() - t0
    progress("")
    return dict(requests=a.requests, in_median=float(np.median(ins)), in_max=int(ins.max()),
                out_median=float(np.median(outs)), out_max=int(outs.max()), num_blocks=s.num_blocks,
                block_size=s.block_size, peak_blocks=s.peak_blocks_used, waste_at_peak=s.waste_at_peak,
                preemptions=s.num_preemptions, sampled_peak=best, seconds=elapsed,
                output_tok_s=int(outs.sum()) / elapsed)


def prefix_run(model, a, enable):
    rng = np.random.default_rng(1)
    with pagedrt.Runtime(model, device="cpu", num_threads=a.threads, enable_prefix_caching=enable,
                         kv_cache_bytes=a.kv_cache_mib << 20) as rt:
        vocab = rt.model_info.vocab_size
        system = rng.integers(100, vocab, size=a.prefix_len).tolist()
        t0 = time.perf_counter()
        # The first request warms the cache, as a long-running service's would.
        rt.generate([system + rng.integers(100, vocab, size=a.suffix_len).tolist()],
                    max_tokens=a.prefix_new, ignore_eos=True, temperature=0)
        ids = [rt.submit(system + rng.integers(100, vocab, size=a.suffix_len).tolist(),
                         max_tokens=a.prefix_new, ignore_eos=True, temperature=0) for _ in range(a.prefix_requests - 1)]
        left = set(ids)
        while left:
            for ev in rt.poll(timeout=0.05):
                if ev.finished:
                    left.discard(ev.request_id)
            progress(f"prefix cache {'on' if enable else 'off'}: "
                     f"{a.prefix_requests - len(left)}/{a.prefix_requests} done")
        elapsed = time.perf_counter() - t0
        s = rt.stats()
    progress("")
    return dict(enable_prefix_caching=enable, seconds=elapsed,
                hit_rate=s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
                prompt_tokens_computed=s.prompt_tokens,
                requests_per_s=a.prefix_requests / elapsed,
                output_tok_s=a.prefix_requests * a.prefix_new / elapsed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-mib", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--in-median", type=int, default=200)
    p.add_argument("--in-max", type=int, default=1500)
    p.add_argument("--out-median", type=int, default=48)
    p.add_argument("--out-max", type=int, default=400)
    p.add_argument("--prefix-requests", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--prefix-new", type=int, default=16)
    p.add_argument("--skip", default="", help="comma list of parts to skip: waste,prefix")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model = pagedrt.resolve_model(a.model)
    skip = set(filter(None, a.skip.split(",")))
    res = dict(model=model.name, date=str(date.today()), threads=a.threads)
    if "waste" not in skip:
        w = res["waste"] = waste_run(model, a)
        sp = w["sampled_peak"]
        print(f"\nwaste at peak ({w['requests']} requests, input median {w['in_median']:.0f} max "
              f"{w['in_max']}, output median {w['out_median']:.0f} max {w['out_max']}, "
              f"block {w['block_size']}):")
        print(f"  {'allocator':<42} {'waste':>8}")
        print(f"  {'pagedrt (paged, on demand)':<42} {100 * w['waste_at_peak']:>7.2f}%")
        print(f"  {'contiguous, prompt + max_tokens reserved':<42} {100 * sp['contiguous_reserve_waste']:>7.2f}%")
        print(f"  {'contiguous, max_model_len reserved':<42} {100 * sp['contiguous_max_len_waste']:>7.2f}%")
        print(f"  peak {w['peak_blocks']} of {w['num_blocks']} blocks, {sp['running']} running, "
              f"{w['preemptions']} preemptions, {w['output_tok_s']:.1f} output tok/s")
    if "prefix" not in skip:
        on, off = prefix_run(model, a, True), prefix_run(model, a, False)
        res["prefix"] = [on, off]
        print(f"\nshared prefix ({a.prefix_requests} requests, {a.prefix_len}-token system prompt + "
              f"{a.suffix_len}, {a.prefix_new} new each):")
        print(f"  {'prefix cache':<14} {'hit rate':>9} {'prompt tok computed':>20} {'req/s':>8} {'seconds':>8}")
        for r in (on, off):
            print(f"  {'on' if r['enable_prefix_caching'] else 'off':<14} {100 * r['hit_rate']:>8.1f}% "
                  f"{r['prompt_tokens_computed']:>20} {r['requests_per_s']:>8.2f} {r['seconds']:>8.1f}")
        print(f"  speed-up with the cache: {off['seconds'] / on['seconds']:.1f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
