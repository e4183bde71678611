#!/usr/bin/env python3
"""Tensor parallelism's cost and gain (docs/tensor_parallel.md): batch-1 TPOT
(128-token prompt, 64 greedy tokens, after a warm-up) and batched output
tok/s (16 x 128/32) at each tensor_parallel_size, one Runtime each, the sizes
interleaved over --rounds rounds (the best of each kept).

    python tools/bench_tp.py --device cpu --threads 2 --sizes 1,2     # a random model made here
    python tools/bench_tp.py --model DIR --device cuda --sizes 1,2,4  # the GPU machine (gpu_check.sh tp)

Without --model it writes a random bf16 Llama of 160M parameters (hidden
1024, 16 heads, 8 kv heads, MLP 2816, 8 layers, vocabulary 32000) to
--workdir, once. Prints a table and writes --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_model(folder: pathlib.Path) -> pathlib.Path:
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import make_tiny_llama
        print(f"writing a random 160M-parameter Llama to {folder} ...", flush=True)
        make_tiny_llama(folder, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        num_attention_heads=16, num_key_value_heads=8, vocab_size=32000, dtype="bfloat16",
                        max_position_embeddings=2048)
    return folder


def measure(rt, rng, vocab: int) -> tuple[float, float]:
    """(batch-1 TPOT ms, 16 x 128/32 output tok/s)."""
    import pagedrt
    rt.generate([rng.integers(3, vocab, size=128).tolist()], max_tokens=8, ignore_eos=True, temperature=0.0)
    rid = rt.submit(rng.integers(3, vocab, size=128).tolist(),
                    pagedrt.SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0))
    stamps, done = [], False
    while not done:
        for ev in rt.poll(rid, timeout=1.0):
            stamps += [time.perf_counter()] * len(ev.token_ids)
            done = ev.finished
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3
    t0 = time.perf_counter()
    outs = rt.generate([rng.integers(3, vocab, size=128).tolist() for _ in range(16)], max_tokens=32,
                       ignore_eos=True, temperature=0.0)
    return tpot, sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=pathlib.Path, default=None)
    ap.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/pagedrt_bench_tp"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads over all ranks (0: all cores)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_tp.json"))
    args = ap.parse_args()
    import pagedrt
    model = args.model or random_model(args.workdir)
    sizes = [int(s) for s in args.sizes.split(",")]
    best: dict[int, list[float]] = {}
    rng = np.random.default_rng(0)
    for rnd in range(args.rounds):
        for tp in sizes:
            with pagedrt.Runtime(model, device=args.device, num_threads=args.threads, tensor_parallel_size=tp,
                                 max_num_seqs=16, progress=False) as rt:
                tpot, tps = measure(rt, rng, rt.model_info.vocab_size)
                info = rt.model_info
            print(f"round {rnd + 1}: TP {tp}: TPOT {tpot:.2f} ms, {tps:,.0f} tok/s", flush=True)
            b = best.setdefault(tp, [tpot, tps])
            best[tp] = [min(b[0], tpot), max(b[1], tps)]
    base = best[sizes[0]]
    print(f"\n{model.name}, {args.device}, {info.weight_dtype} weights, {info.activation_dtype} activations, "
          f"threads {args.threads or 'all'}")
    print("| TP | batch-1 TPOT ms | vs TP %d | 16 x 128/32 tok/s | vs TP %d |" % (sizes[0], sizes[0]))
    print("|---:|---:|---:|---:|---:|")
    for tp in sizes:
        t, s = best[tp]
        print(f"| {tp} | {t:.2f} | {t / base[0]:.2f}x | {s:,.0f} | {s / base[1]:.2f}x |")
    args.out.write_text(json.dumps({"model": str(model), "device": args.device, "threads": args.threads,
                                    "results": {str(tp): {"tpot_ms": t, "tok_per_s": s}
                                                for tp, (t, s) in best.items()}}, indent=1))


if __name__ == "__main__":
    main()
