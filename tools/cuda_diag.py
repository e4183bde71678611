#!/usr/bin/env python3
"""Small end-to-end probes, CUDA against the CPU on tiny random Llamas: which step
shape (prefill, chunked prefill, block size, batch, decode) first disagrees.

    python tools/cuda_diag.py WORKDIR [--only NAME] [--cuda-only]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))


def run(rt, prompts, n):
    from conftest import run_all
    return run_all(rt, prompts, max_tokens=n, ignore_eos=True, return_logits=True)


PROBES = {  # name: (model kw, prompt lengths, max_tokens, runtime kw)
    "prefill1": ({}, [20], 1, dict(block_size=16)),
    "prefill1-bs4": ({}, [20], 1, dict(block_size=4)),
    "chunked": ({}, [20], 1, dict(block_size=16, max_num_batched_tokens=7)),
    "two-prompts": ({}, [20, 13], 1, dict(block_size=16)),
    "decode": ({}, [5], 6, dict(block_size=16)),
    "g3": (dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=2), [20], 4, dict(block_size=16)),
    "d128": (dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1), [20], 4, dict(block_size=16)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=pathlib.Path)
    ap.add_argument("--only", default=None)
    ap.add_argument("--cuda-only", action="store_true")
    args = ap.parse_args()
    import pagedrt
    from conftest import make_tiny_llama

    for name, (mkw, lens, n, rkw) in PROBES.items():
        if args.only and name != args.only:
            continue
        path = args.work / name
        if not (path / "config.json").is_file():
            base = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16")
            make_tiny_llama(path, **{**base, **mkw})
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 320, size=k).tolist() for k in lens]
        res = {}
        for dev in (("cuda",) if args.cuda_only else ("cpu", "cuda")):
            act = "float32" if dev == "cpu" else "auto"  # the CPU oracle in fp32
            with pagedrt.Runtime(path, device=dev, dtype="bfloat16", activation_dtype=act,
                                 kv_cache_bytes=64 << 20, **rkw) as rt:
                res[dev] = run(rt, prompts, n)
        if args.cuda_only:
            print(name, "ran", [len(t) for t, _ in res["cuda"]])
            continue
        for k, ((tc, lc), (tg, lg)) in enumerate(zip(res["cpu"], res["cuda"])):
            L = len(prompts[k])
            same = next((i for i in range(len(tc)) if tc[i] != tg[i]), len(tc))
            rows = L - 1 + same + 1 if same < len(tc) else len(lc)
            err = [float(np.linalg.norm(lg[r] - lc[r]) / np.linalg.norm(lc[r])) for r in range(min(rows, len(lc)))]
            print(f"{name}[{k}] tokens cpu={tc} cuda={tg}; per-row rel err: "
                  + " ".join(f"{e:.1e}" for e in err))


if __name__ == "__main__":
    main()
