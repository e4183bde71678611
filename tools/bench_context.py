#!/usr/bin/env python3
"""Batch-1 decode against the context length, and an A/B of environment
settings on it: TPOT after prompts of each --contexts length, one process a
run, the settings alternating (--pairs rounds).

    bench_context.py [--model DIR|FILE.gguf] [--device cpu] [--threads N]
                     [--contexts 16,2000,8000] [--new 96] [--pairs 4]
                     [--ab "PAGEDRT_CPU_SPLIT_DECODE=0"] [--json OUT.json]

Each run loads one Runtime and decodes --new greedy tokens after a prompt of
random token ids of each length, the first length again at the end; TPOT =
(last token's time - first's) / (tokens - 1), from the engine's events (and
the time from the submit to the first token: TTFT, the prompt's prefill). A
run's TPOT at each length is also given against its first length's (the
mean of the two short runs in the same process), which takes out most of a
shared VM's drift between runs. --ab: settings "VAR=value[,VAR=value]"
separated by ";", each run against the default (no variable set); the
greedy tokens must agree between settings that change no arithmetic, and the
table says whether they did. On the CPU the run first measures the machine's
ceilings (tools/cpu_ceilings.py, at --threads) and gives each TPOT as a
fraction of its bandwidth floor: a token reads the weights and the context's
K and V once, (weight bytes + mean context x KV bytes a token) / read rate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cpu_ceilings, bench
from bench import weight_params  # noqa: E402


def one_run(model, device, threads, contexts, new) -> dict:
    """In this process: TPOT ms at each length (the first again at the end) and a hash of the tokens."""
    import hashlib
    import time

    import numpy as np

    import pagedrt
    kw = {"device": device}
    if threads:
        kw["num_threads"] = threads
    rng = np.random.default_rng(0)
    out, ttft, digest = [], [], hashlib.sha256()
    with pagedrt.Runtime(model, **kw) as rt:
        st = rt.stats()
        kv_token = st.kv_cache_bytes / (st.num_blocks * st.block_size)  # every layer's K and V of one token
        weights = weight_params(rt.model_path) * {"float32": 4}.get(rt.model_info.weight_dtype, 2)  # bf16, fp16
        for n in list(contexts) + [contexts[0]]:
            t0 = time.perf_counter()
            rid = rt.submit(rng.integers(100, 30000, size=n).tolist(), by_id=True, max_tokens=new,
                            ignore_eos=True, temperature=0.0)
            times, done = [], False
            while not done:
                for ev in rt.poll(rid, timeout=1.0):
                    if ev.token_ids:
                        times.append(time.perf_counter())
                        digest.update(np.asarray(ev.token_ids, np.int64).tobytes())
                    done = ev.request_finished
            out.append((times[-1] - times[0]) / (len(times) - 1) * 1e3)
            ttft.append((times[0] - t0) * 1e3)
    return {"tpot_ms": out, "ttft_ms": ttft, "tokens_sha256": digest.hexdigest()[:16], "weight_bytes": weights,
            "kv_bytes_per_token": kv_token}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a Llama folder or .gguf (default: SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: the Runtime's default)")
    ap.add_argument("--contexts", default="16,2000,8000")
    ap.add_argument("--new", type=int, default=96, help="tokens decoded after each prompt")
    ap.add_argument("--pairs", type=int, default=4, help="rounds of the settings, alternating")
    ap.add_argument("--ab", default="", help='settings against the default: "VAR=v[,VAR=v];..."')
    ap.add_argument("--json", default=None)
    ap.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.one_run:
        print(json.dumps(one_run(args.model, args.device, args.threads, contexts, args.new)))
        return
    settings = [("default", {})]
    for s in filter(None, args.ab.split(";")):
        settings.append((s, dict(kv.split("=", 1) for kv in s.split(","))))
    base = {k: v for k, v in os.environ.items() if not any(k in env for _, env in settings)}
    cmd = [sys.executable, os.path.abspath(__file__), "--one-run", "--device", args.device, "--threads",
           str(args.threads), "--contexts", args.contexts, "--new", str(args.new)]
    if args.model:
        cmd += ["--model", args.model]
    ceilings = None
    if args.device == "cpu":  # a CPU figure holds as a fraction of the ceilings measured with it
        import pagedrt
        from cpu_ceilings import measure
        # the working set at which to measure the read rate too: the weights in bf16
        ceilings = measure(args.threads or None,
                           working_sets=[2 * weight_params(pagedrt.resolve_model(args.model, progress=False))])
    runs = {name: [] for name, _ in settings}
    for i in range(args.pairs):
        for name, env in settings:
            p = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"bench_context.py: the run of {name} failed ({p.returncode}):\n{p.stderr[-2000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            runs[name].append(r)
            print(f"round {i + 1} {name}: " + ", ".join(f"{n}: {t:.2f} ms" for n, t in zip(contexts, r["tpot_ms"]))
                  + f" (tokens {r['tokens_sha256']})", flush=True)
    print(f"\n| setting | " + " | ".join(f"TPOT at {n} (median ms)" for n in contexts)
          + " | " + " | ".join(f"{n} / {contexts[0]}" for n in contexts[1:]) + " | tokens |")
    print("|---|" + "---:|" * (2 * len(contexts) - 1) + "---|")
    summary = {}
    for name, rs in runs.items():
        med = [statistics.median(r["tpot_ms"][j] for r in rs) for j in range(len(contexts))]
        rel = [statistics.median(r["tpot_ms"][j] / ((r["tpot_ms"][0] + r["tpot_ms"][-1]) / 2) for r in rs)
               for j in range(1, len(contexts))]
        hashes = sorted({r["tokens_sha256"] for r in rs})
        summary[name] = {"tpot_ms_median": med, "relative_to_first_median": rel, "tokens": hashes, "runs": rs}
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in med) + " | "
              + " | ".join(f"{x:.3f}" for x in rel) + f" | {', '.join(hashes)} |")
    print(f"\n| setting | " + " | ".join(f"TTFT at {n} (median ms)" for n in contexts) + " |")
    print("|---|" + "---:|" * len(contexts))
    for name, rs in runs.items():
        summary[name]["ttft_ms_median"] = [statistics.median(r["ttft_ms"][j] for r in rs) for j in range(len(contexts))]
        print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in summary[name]["ttft_ms_median"]) + " |")
    floors = floor_ms(ceilings, runs, contexts, args.new)
    if floors:
        print(f"\nceilings ({ceilings['threads']} threads): read {floors['read_GBps']:.1f} GB/s, fp32 GEMM "
              f"{ceilings['gemm_GFLOPs']:.0f} GFLOP/s; bandwidth floor a token "
              + ", ".join(f"{n}: {m:.2f} ms" for n, m in zip(contexts, floors["ms"])))
        for name, row in summary.items():
            row["of_floor"] = [f / t for f, t in zip(floors["ms"], row["tpot_ms_median"])]
            print(f"  {name}: of the floor " + ", ".join(f"{n}: {x:.2f}" for n, x in zip(contexts, row["of_floor"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": args.threads, "contexts": contexts, "new": args.new,
                       "ceilings": ceilings, "floor": floors, "settings": summary}, f, indent=1)


def floor_ms(ceilings, runs, contexts, new):
    """ms a token at each context if it cost one read of the weights and of its
    mean context's K and V (the prompt plus half the new tokens) at the
    ceilings' read rate (cpu_ceilings.floor_GBps); None where unmeasured."""
    from cpu_ceilings import floor_GBps
    first = next(iter(runs.values()))[0]
    bw = floor_GBps(ceilings, first["weight_bytes"])
    if not bw:
        return None
    per = [(first["weight_bytes"] + (n + new / 2) * first["kv_bytes_per_token"]) for n in contexts]
    return {"read_GBps": bw, "bytes": per, "ms": [b / (bw * 1e9) * 1e3 for b in per]}


if __name__ == "__main__":
    main()
