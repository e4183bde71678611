#!/usr/bin/env python3
"""Speculative decoding by prompt lookup against plain decoding, batch 1
(issue 23; docs/speculative.md).

    bench_speculative.py [--model DIR|FILE.gguf] [--device cpu] [--max-tokens 128]
                         [--rounds 3] [--json OUT.json]

For each workload of tools/workloads.py SPECULATIVE_PROMPTS (rewrite,
extract, edit_code: answers that copy the prompt; open_ended: answers that do
not), each prompt alone, greedy: decode tokens/s = (tokens - 1) / (time of
the last token - time of the first), with speculative="ngram" and without,
alternating, one warm-up first; the speed-up is the ratio of the medians.
The acceptance rate is accepted / proposed tokens. Greedy output with
speculation must equal the plain output: a difference is printed as an error.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import speculative_prompts  # noqa: E402


def decode_rate(rt, prompt, max_tokens, spec):
    rid = rt.submit(prompt, by_id=True, max_tokens=max_tokens, temperature=0.0, speculative=spec)
    times, tokens, proposed, accepted = [], [], 0, 0
    done = False
    while not done:
        for ev in rt.poll(rid, timeout=1.0):
            times += [ev.time] * len(ev.token_ids)
            tokens += ev.token_ids
            proposed, accepted = ev.spec_proposed, ev.spec_accepted
            done |= ev.request_finished
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    return rate, tokens, proposed, accepted


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import pagedrt

    res = {"device": args.device, "max_tokens": args.max_tokens, "rounds": args.rounds, "workloads": {}}
    with pagedrt.Runtime(args.model, device=args.device, progress=False) as rt:
        res["model"] = rt.model_path.name
        work = speculative_prompts(rt)
        decode_rate(rt, work["open_ended"][0], 8, None)  # warm-up
        print(f"{'workload':11s} {'plain tok/s':>11s} {'ngram tok/s':>11s} {'speed-up':>8s} {'accepted':>9s}", flush=True)
        for name, prompts in work.items():
            plain, spec, prop, acc, same = [], [], 0, 0, True
            for _ in range(args.rounds):
                for p in prompts:
                    r0, t0, _, _ = decode_rate(rt, p, args.max_tokens, None)
                    r1, t1, pr, ac = decode_rate(rt, p, args.max_tokens, "ngram")
                    plain.append(r0)
                    spec.append(r1)
                    prop, acc, same = prop + pr, acc + ac, same and t0 == t1
            row = {"plain_tok_s": statistics.median(plain), "ngram_tok_s": statistics.median(spec),
                   "proposed": prop, "accepted": acc, "same_tokens": same}
            row["speedup"] = row["ngram_tok_s"] / row["plain_tok_s"]
            row["acceptance"] = acc / prop if prop else 0.0
            res["workloads"][name] = row
            print(f"{name:11s} {row['plain_tok_s']:11.1f} {row['ngram_tok_s']:11.1f} {row['speedup']:7.2f}x "
                  f"{100 * row['acceptance']:8.0f}%" + ("" if same else "   ERROR: tokens differ"), flush=True)
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
