#!/usr/bin/env python3
"""Structured output's cost: 32 JSON-schema requests against 32 unconstrained
ones on the same prompts, all submitted at once, one Runtime, rounds alternating.

    bench_structured.py [--model DIR|FILE.gguf] [--device cpu] [--requests 32] [--max-tokens 64]
                        [--rounds 3] [--lend auto|0|both] [--checked on|off|both]
                        [--schema bounded|unbounded] [--json OUT.json]

TPOT per request = (time of its last token - time of its first) / (tokens - 1),
from the engine's event times; the mean over requests is compared. The mask
provider's time (llguidance, on an engine helper thread while the forward runs)
is printed per step and per row (C++: pagedrt/llguidance_masks.hpp). --lend: the cores a CPU forward leaves the
masks while they are filled (TokenMaskProvider::threads): auto (the
provider's), 0 (none), or both (each round runs the JSON requests both ways:
an A/B in one process; the ratio printed is auto's). --checked: the engine's
checked picks (pagedrt/token_mask.hpp: a plain greedy row is picked without
its mask and the pick validated; a refused one is masked and picked again):
on, off (a mask before every pick), or both (an A/B, as --lend both).
--schema: the schema below (bounded) or the same without its strings'
maxLength (unbounded: where llguidance's masks cost ~10x less, schema_of).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 24}, "tags": {"type": "array", "items": {"type": "string",
                                                                                     "maxLength": 12},
                                                          "maxItems": 4}},
    "required": ["name", "age", "city", "tags"], "additionalProperties": False}


def schema_of(kind: str) -> dict:
    """The benchmark's schema ("bounded", as above) or the same without its
    strings' maxLength ("unbounded"). Near a string's maxLength llguidance
    walks every token longer than what is left (0.2-0.35 ms a row on a Zen 4
    core in the last ~10 characters; ~0.01 ms a row unbounded; docs/benchmarks.md,
    "Structured output's slow rows")."""
    if kind == "bounded":
        return SCHEMA

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "maxLength"}
        return [strip(v) for v in node] if isinstance(node, list) else node
    return strip(SCHEMA)


def run(rt, prompts, **kw):
    before = rt.stats()
    ids = [rt.submit(p, by_id=True, **kw) for p in prompts]
    times = {rid: [] for rid in ids}
    pending = set(ids)
    t0 = time.perf_counter()
    while pending:
        for ev in rt.poll(list(pending), timeout=1.0):
            times[ev.request_id] += [ev.time] * len(ev.token_ids)
            if ev.request_finished:
                pending.discard(ev.request_id)
    wall = time.perf_counter() - t0
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    after = rt.stats()
    steps = max(after.num_steps - before.num_steps, 1)
    return {"tpot_ms": 1e3 * statistics.mean(tpots), "tokens": sum(len(t) for t in times.values()), "wall_s": wall,
            "steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
            "forward_ms_per_step": 1e3 * (after.forward_seconds - before.forward_seconds) / steps,
            "output_ms_per_step": 1e3 * (after.output_seconds - before.output_seconds) / steps,
            "launch_ms_per_step": 1e3 * (after.launch_seconds - before.launch_seconds) / steps,
            "collect_wait_ms_per_step": 1e3 * (after.collect_wait_seconds - before.collect_wait_seconds) / steps,
            "mask_wait_ms_per_step": 1e3 * (after.mask_wait_seconds - before.mask_wait_seconds) / steps,
            "async_steps": after.async_steps - before.async_steps,
            "rows_checked": after.mask_rows_checked - before.mask_rows_checked,
            "rows_refused": after.mask_rows_refused - before.mask_rows_refused}


def breakdown(r):
    return (f"{r['steps']} steps of {r['wall_ms_per_step']:.2f} ms ({r['async_steps']} launched ahead): "
            f"forward {r['forward_ms_per_step']:.2f}, launching {r['launch_ms_per_step']:.2f}, "
            f"waiting for the device {r['collect_wait_ms_per_step']:.2f}, "
            f"waiting for masks {r['mask_wait_ms_per_step']:.2f}, outputs {r['output_ms_per_step']:.2f}"
            + (f"; picks checked without a mask {r['rows_checked']}, refused {r['rows_refused']}"
               if r["rows_checked"] else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="Runtime num_threads (on CUDA: the host sampler's threads; 0: all cores)")
    ap.add_argument("--lend", default="auto", choices=("auto", "0", "both"))
    ap.add_argument("--checked", default="on", choices=("on", "off", "both"),
                    help="checked picks (plain greedy rows picked without a mask, then validated); "
                         "both: also a JSON run with a mask before every pick")
    ap.add_argument("--schema", default="bounded", choices=("bounded", "unbounded"),
                    help="the JSON schema: bounded (strings with maxLength) or unbounded (the same without)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import pagedrt
    schema = schema_of(args.schema)

    rt = pagedrt.Runtime(args.model, device=args.device, max_num_seqs=max(64, args.requests),
                         num_threads=args.threads)
    prompts = [[{"role": "user", "content": f"Invent person number {i} and describe them as JSON."}]
               for i in range(args.requests)]
    res = {"device": rt.model_info.device, "model": str(rt.model_path), "requests": args.requests,
           "schema": args.schema, "plain": [], "json_schema": []}
    rt.generate(prompts[:2], max_tokens=4, json_schema=schema)  # compiles llguidance's tokenizer once
    cons = rt._constraints()
    res["llguidance"] = cons.masks.version
    lend = {"auto": [cons.busy_threads], "0": [0], "both": [cons.busy_threads, 0]}[args.lend]
    checked = args.checked != "off"
    res["lent_threads"] = lend[0]
    res["checked_picks"] = checked
    # the B runs of the A/Bs: (name, lent threads, checked)
    others = [(f"json_schema_lent_{t}", t, checked) for t in lend[1:]]
    if args.checked == "both":
        others.append(("json_schema_unchecked", lend[0], False))
    for name, _, _ in others:
        res[name] = []
    for r in range(args.rounds):
        p = run(rt, prompts, max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        for name, threads, check in others:  # run first, so that A runs last as before
            cons.install(rt._rt, threads, check)
            b = run(rt, prompts, max_tokens=args.max_tokens, temperature=0, json_schema=schema)
            res[name].append(b)
            print(f"round {r + 1}: json_schema lending {threads} cores, picks "
                  f"{'checked' if check else 'masked first'}: TPOT {b['tpot_ms']:.2f} ms "
                  f"({b['tpot_ms'] / p['tpot_ms']:.3f}x plain)", flush=True)
        cons.install(rt._rt, lend[0], checked)
        c0, e0 = cons.counters(), rt.stats()
        s = run(rt, prompts, max_tokens=args.max_tokens, temperature=0, json_schema=schema)
        c1, e1 = cons.counters(), rt.stats()
        d = {k: c1[k] - c0[k] for k in c1}
        steps = max(e1.mask_steps - e0.mask_steps, 1)
        s["mask_ms_per_step"] = 1e3 * d["fill_seconds"] / max(d["fill_calls"], 1)  # inside the provider's fill
        s["mask_us_per_row"] = 1e6 * d["fill_seconds"] / max(d["fill_rows"], 1)
        # a fill on the pool: its longest row, its rows' times summed, the pool's wake-up (its first rows' starts)
        s["mask_longest_row_ms_per_step"] = 1e3 * d["fill_longest_row_seconds"] / max(d["fill_calls"], 1)
        s["mask_rows_sum_ms_per_step"] = 1e3 * d["fill_row_seconds"] / max(d["fill_calls"], 1)
        s["mask_first_rows_start_ms_per_step"] = 1e3 * d["fill_first_rows_start_seconds"] / max(d["fill_calls"], 1)
        # checked picks: the provider's validate() (on the engine's thread, after the forward)
        s["validate_us_per_row"] = 1e6 * d["validate_seconds"] / max(d["validate_rows"], 1)
        s["validate_ms_per_step"] = 1e3 * d["validate_seconds"] / max(s["steps"], 1)
        # the model's tokenizer, asked for text the grammar forces (kept answers; a miss goes to Python)
        s["tokenize_calls"], s["tokenize_misses"] = d["tokenize_calls"], d["tokenize_misses"]
        # the engine's view: the helper thread's whole call, and what the forward did not hide
        s["mask_wall_ms_per_step"] = 1e3 * (e1.mask_seconds - e0.mask_seconds) / steps
        s["mask_wait_ms_per_step"] = 1e3 * (e1.mask_wait_seconds - e0.mask_wait_seconds) / steps
        s["mask_overlap"] = 1 - s["mask_wait_ms_per_step"] / max(s["mask_wall_ms_per_step"], 1e-9)
        res["plain"].append(p)
        res["json_schema"].append(s)
        print(f"round {r + 1}: TPOT plain {p['tpot_ms']:.2f} ms, json_schema {s['tpot_ms']:.2f} ms "
              f"(lending {lend[0]} cores) "
              f"({s['tpot_ms'] / p['tpot_ms']:.3f}x); masks {s['mask_ms_per_step']:.2f} ms per step in the "
              f"provider ({s['mask_us_per_row']:.0f} us per row), {s['mask_wall_ms_per_step']:.2f} ms on the "
              f"helper thread, {s['mask_wait_ms_per_step']:.2f} ms not hidden by the forward "
              f"({100 * s['mask_overlap']:.0f}% overlapped); checks {s['validate_ms_per_step']:.2f} ms per step "
              f"({s['validate_us_per_row']:.1f} us per row); tokenizer asked {s['tokenize_calls']} times, "
              f"{s['tokenize_misses']} not kept", flush=True)
        print(f"  a fill: {s['mask_ms_per_step']:.3f} ms; its longest row {s['mask_longest_row_ms_per_step']:.3f}, "
              f"rows summed {s['mask_rows_sum_ms_per_step']:.3f}, first rows begun by "
              f"{s['mask_first_rows_start_ms_per_step']:.3f} ms", flush=True)
        print(f"  plain: {breakdown(p)}\n  json_schema: {breakdown(s)}", flush=True)
    ratios = [s["tpot_ms"] / p["tpot_ms"] for p, s in zip(res["plain"], res["json_schema"])]
    res["tpot_ratio_median"] = statistics.median(ratios)
    print(f"json_schema / plain TPOT, median of {args.rounds}: {res['tpot_ratio_median']:.3f}")
    for name, _, _ in others:
        med = statistics.median(b["tpot_ms"] / p["tpot_ms"] for p, b in zip(res["plain"], res[name]))
        res[name + "_ratio_median"] = med
        print(f"{name} / plain TPOT, median of {args.rounds}: {med:.3f}")
    if args.json:
        json.dump(res, open(args.json, "w"), indent=1)
    rt.close()


if __name__ == "__main__":
    main()
