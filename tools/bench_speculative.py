#!/usr/bin/env python3
"""Speculative decoding by prompt lookup (and by a draft model) against plain
decoding, batch 1 (issue 23; docs/speculative.md).

    bench_speculative.py [--model DIR|FILE.gguf] [--device cpu] [--max-tokens 128]
                         [--draft-model DIR|FILE.gguf] [--ngram-min 2[,1...]]
                         [--prompts benchmark|other|json] [--rounds 3] [--json OUT.json]

For each workload of tools/workloads.py SPECULATIVE_PROMPTS (rewrite,
extract, edit_code: answers that copy the prompt; open_ended: answers that do
not), each prompt alone, greedy: decode tokens/s = (tokens - 1) / (time of
the last token - time of the first), with speculative="ngram" and without,
alternating, one warm-up first; the speed-up is the ratio of the medians.
The acceptance rate is accepted / proposed tokens; tok/step is decode tokens
per step (the gain before a verify step's extra cost, the same on every
device). --ngram-min 1,2 times n-grams with each ngram_min (columns ngram_n1,
ngram_n2). --prompts other takes SPECULATIVE_PROMPTS_OTHER instead (prompts
of the same kinds that no default was chosen on); --prompts json takes
SPECULATIVE_JSON (JSON answers under a schema: structured output with and
without speculation). Greedy output with speculation must equal the plain
output on the CPU (batch-invariant): a difference is printed (on CUDA, whose
verify and decode steps may round differently, it is counted). With --draft-model, speculative="draft" runs too.
On the CPU the run also measures the host's read bandwidth (over 1 GiB and
over the weights' size: the faster counts, as in bench.py) and GEMM rate
(tools/cpu_ceilings.py) and prints each rate as a fraction of the bandwidth
floor: the weights' bytes read once per token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import (SPECULATIVE_JSON, SPECULATIVE_PROMPTS, SPECULATIVE_PROMPTS_OTHER,  # noqa: E402
                       speculative_prompts)


def decode_rate(rt, prompt, max_tokens, spec, k=8, ngram_min=2):
    """prompt: (token ids, extra SamplingParams fields such as json_schema)."""
    ids, extra = prompt
    rid = rt.submit(ids, by_id=True, max_tokens=max_tokens, temperature=0.0, speculative=spec,
                    num_speculative_tokens=k, ngram_min=ngram_min, **extra)
    times, tokens, proposed, accepted = [], [], 0, 0
    done = False
    steps = -1  # decode steps: the events that carry tokens, less the prompt's
    while not done:
        for ev in rt.poll(rid, timeout=1.0):
            steps += bool(ev.token_ids)
            times += [ev.time] * len(ev.token_ids)
            tokens += ev.token_ids
            proposed, accepted = ev.spec_proposed, ev.spec_accepted
            done |= ev.request_finished
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    return rate, tokens, proposed, accepted, max(steps, 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--draft-model", default=None, help="also time speculative=\"draft\" with this draft model")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens: proposals a step at most")
    ap.add_argument("--prompts", default="benchmark", choices=["benchmark", "other", "json"],
                    help="SPECULATIVE_PROMPTS, SPECULATIVE_PROMPTS_OTHER (no default was chosen on them) or "
                         "SPECULATIVE_JSON (structured output)")
    ap.add_argument("--ngram-min", default="2", help="ngram_min, or several (1,2): each timed as its own mode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import pagedrt

    mins = [int(v) for v in args.ngram_min.split(",")]
    # mode -> (speculative, ngram_min)
    spec_of = {"ngram": ("ngram", mins[0])} if len(mins) == 1 else {f"ngram_n{v}": ("ngram", v) for v in mins}
    if args.draft_model:
        spec_of["draft"] = ("draft", 2)
    modes = list(spec_of)
    res = {"device": args.device, "max_tokens": args.max_tokens, "rounds": args.rounds, "modes": modes, "k": args.k,
           "ngram_min": mins, "prompts": args.prompts, "workloads": {}}
    model = pagedrt.resolve_model(args.model, progress=False)
    # bytes a decode step reads at least: the weights (the KV cache of a short answer is small)
    res["weight_bytes"] = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    if args.device == "cpu":  # a CPU figure holds as a fraction of the ceilings measured with it
        from cpu_ceilings import measure
        res["ceilings"] = measure(working_sets=[res["weight_bytes"]])
    with pagedrt.Runtime(model, device=args.device, progress=False, draft_model=args.draft_model) as rt:
        res["model"] = rt.model_path.name
        res["draft_model"] = rt.model_info.draft_model
        if args.prompts == "json":
            work = {name: [(rt.encode_prompt([{"role": "user", "content": text}]), {"json_schema": schema})
                           for text, schema in items] for name, items in SPECULATIVE_JSON.items()}
        else:
            texts = SPECULATIVE_PROMPTS_OTHER if args.prompts == "other" else SPECULATIVE_PROMPTS
            work = {name: [(ids, {}) for ids in lst] for name, lst in speculative_prompts(rt, texts).items()}
        for m in [None] + modes:
            decode_rate(rt, work[list(work)[-1]][0], 8, *spec_of.get(m, (None, 2)))  # warm-up
        print(f"{'workload':11s} {'plain tok/s':>11s}"
              + "".join(f" {m + ' tok/s':>11s} {'speed-up':>8s} {'accepted':>9s} {'tok/step':>8s}" for m in modes),
              flush=True)
        for name, prompts in work.items():
            rates = {m: [] for m in [None] + modes}
            prop, acc, differ, toks, steps = ({m: 0 for m in modes} for _ in range(5))
            for _ in range(args.rounds):
                for p in prompts:
                    r0, t0, _, _, _ = decode_rate(rt, p, args.max_tokens, None)
                    rates[None].append(r0)
                    for m in modes:
                        spec, ngram_min = spec_of[m]
                        r1, t1, pr, ac, st = decode_rate(rt, p, args.max_tokens, spec, args.k, ngram_min)
                        rates[m].append(r1)
                        toks[m], steps[m] = toks[m] + len(t1) - 1, steps[m] + st
                        prop[m], acc[m], differ[m] = prop[m] + pr, acc[m] + ac, differ[m] + (t0 != t1)
            row = {"plain_tok_s": statistics.median(rates[None])}
            line = f"{name:11s} {row['plain_tok_s']:11.1f}"
            for m in modes:
                row[f"{m}_tok_s"] = statistics.median(rates[m])
                row[f"{m}_speedup"] = row[f"{m}_tok_s"] / row["plain_tok_s"]
                row[f"{m}_proposed"], row[f"{m}_accepted"] = prop[m], acc[m]
                row[f"{m}_acceptance"] = acc[m] / prop[m] if prop[m] else 0.0
                row[f"{m}_runs_differing"] = differ[m]
                # decode tokens a step (the device-independent gain: greedy tokens are the same whatever is proposed)
                row[f"{m}_tokens_per_step"] = toks[m] / steps[m] if steps[m] else float("nan")
                line += (f" {row[f'{m}_tok_s']:11.1f} {row[f'{m}_speedup']:7.2f}x {100 * row[f'{m}_acceptance']:8.0f}%"
                         f" {row[f'{m}_tokens_per_step']:8.2f}"
                         + (f" ({differ[m]} runs' tokens differ)" if differ[m] else ""))
            res["workloads"][name] = row
            print(line, flush=True)
    c = res.get("ceilings") or {}
    from cpu_ceilings import floor_GBps
    bw = floor_GBps(c, res["weight_bytes"])
    if bw:
        floor = bw * 1e9 / res["weight_bytes"]  # tok/s if a token cost one read of the weights
        res["floor_tok_s"] = floor
        print(f"ceilings ({c['threads']} threads): read {bw:.1f} GB/s, fp32 GEMM "
              f"{c['gemm_GFLOPs']:.0f} GFLOP/s; weights {res['weight_bytes'] / 1e6:.0f} MB, so the bandwidth "
              f"floor of plain decoding is {floor:.1f} tok/s", flush=True)
        for name, row in res["workloads"].items():
            row["plain_of_floor"] = row["plain_tok_s"] / floor
            line = f"  {name:11s} plain {row['plain_of_floor']:.2f} of the floor"
            for m in modes:
                row[f"{m}_of_floor"] = row[f"{m}_tok_s"] / floor
                line += f", {m} {row[f'{m}_of_floor']:.2f}"
            print(line, flush=True)
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
