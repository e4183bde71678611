#!/usr/bin/env python3
"""Host sampling's share of decode: SmolLM2 on the CPU, time per decode step
(64 tokens after a 4-token warm-up, the prompt's prefill included) under each
sampling setting, at batch 1 and 8. Greedy and plain temperature are the
floor; top-p's extra time is the sampler's (the CPU backend samples on the
host; pagedrt-chat's defaults are temperature 0.7, top-p 0.9).

    python tools/bench_sampler.py [OUT.json] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import pagedrt

SETTINGS = [("greedy", dict(temperature=0.0)), ("T=0.7", dict(temperature=0.7)),
            ("T=0.7 top_p=0.9", dict(temperature=0.7, top_p=0.9)),
            ("T=1.0 top_p=0.95", dict(temperature=1.0, top_p=0.95)),
            ("T=0.7 top_k=50 top_p=0.9", dict(temperature=0.7, top_k=50, top_p=0.9))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="JSON results")
    ap.add_argument("--model", help="model directory (default: SmolLM2, converted once)")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    model = args.model or pagedrt.default_model()
    rows = []
    with pagedrt.Runtime(model, device="cpu") as rt:
        prompt = rt.encode_prompt("Write a short story about a robot who learns to paint.")
        print(f"{'setting':<26} {'batch':>5} {'ms/step':>8}", flush=True)
        for name, kw in SETTINGS:
            for batch in (1, 8):
                rt.generate([prompt] * batch, pagedrt.SamplingParams(max_tokens=4, ignore_eos=True, **kw))
                t = time.perf_counter()
                rt.generate([prompt] * batch,
                            pagedrt.SamplingParams(max_tokens=args.tokens, ignore_eos=True, seed=1, **kw))
                ms = 1e3 * (time.perf_counter() - t) / args.tokens
                rows.append({"setting": name, "batch": batch, "ms_per_step": ms})
                print(f"{name:<26} {batch:>5} {ms:>8.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "model": str(model), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
