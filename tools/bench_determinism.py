#!/usr/bin/env python3
"""What deterministic=True costs against deterministic=False, same process,
rounds alternating (issue 22; docs/determinism.md).

    bench_determinism.py [--model DIR|FILE.gguf] [--device cpu] [--rounds 3]
                         [--prompt 1024] [--batch 16] [--batch-prompt 128]
                         [--batch-new 64] [--json OUT.json]

Per round and setting, one Runtime: batch-1 time to first token of a
--prompt-token prompt (a prefill: where the two settings differ on the CPU),
batch-1 TPOT (128-token prompt, 64 greedy tokens), and output tok/s of
--batch requests (--batch-prompt-token prompts, --batch-new tokens) submitted
at once (issue 22's GPU workload: --batch 256 --batch-prompt 512 --batch-new
128). Prints the
medians and the ratios True / False (a time ratio above 1 and a throughput
ratio below 1 are costs). Prompts are random token ids, fresh each time (no
cached prefix).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def ttft_ms(rt, rng, n):
    import pagedrt
    params = pagedrt.SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    t0 = time.perf_counter()
    rt.generate([rng.integers(100, 40000, size=n).tolist()], params)
    return (time.perf_counter() - t0) * 1e3


def tpot_ms(rt, rng):
    rid = rt.submit(rng.integers(100, 40000, size=128).tolist(), by_id=True, max_tokens=64, ignore_eos=True,
                    temperature=0.0)
    times = []
    done = False
    while not done:
        for ev in rt.poll(rid, timeout=1.0):
            times += [ev.time] * len(ev.token_ids)
            done |= ev.request_finished
    return 1e3 * (times[-1] - times[0]) / (len(times) - 1)


def batched_tok_s(rt, rng, batch, prompt=128, new=64):
    prompts = [rng.integers(100, 40000, size=prompt).tolist() for _ in range(batch)]
    t0 = time.perf_counter()
    outs = rt.generate(prompts, max_tokens=new, ignore_eos=True, temperature=0.0)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-prompt", type=int, default=128)
    ap.add_argument("--batch-new", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import pagedrt

    res = {"device": args.device, "rounds": args.rounds, "prompt": args.prompt, "batch": args.batch,
           "batch_prompt": args.batch_prompt, "batch_new": args.batch_new, "runs": {"True": [], "False": []}}
    rng = np.random.default_rng(0)
    for r in range(args.rounds):
        for setting in (True, False) if r % 2 == 0 else (False, True):
            with pagedrt.Runtime(args.model, device=args.device, deterministic=setting, progress=False,
                                 max_num_batched_tokens=max(2048, args.prompt)) as rt:
                ttft_ms(rt, rng, 64)  # warm-up
                run = {"ttft_ms": ttft_ms(rt, rng, args.prompt), "tpot_ms": tpot_ms(rt, rng),
                       "batched_tok_s": batched_tok_s(rt, rng, args.batch, args.batch_prompt, args.batch_new)}
            res["runs"][str(setting)].append(run)
            print(f"round {r + 1} deterministic={setting}: TTFT {run['ttft_ms']:.1f} ms ({args.prompt} tokens), "
                  f"TPOT {run['tpot_ms']:.2f} ms, {args.batch} x {args.batch_prompt}/{args.batch_new} "
                  f"{run['batched_tok_s']:.1f} tok/s", flush=True)
    med = {s: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for s, runs in res["runs"].items()}
    res["median"] = med
    res["ratio_true_over_false"] = {k: med["True"][k] / med["False"][k] for k in med["True"]}
    print("medians: " + "; ".join(f"{s}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()) for s, m in med.items()))
    print("True / False: " + ", ".join(f"{k} {v:.3f}" for k, v in res["ratio_true_over_false"].items()))
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
