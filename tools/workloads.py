"""The benchmark workloads, defined once with fixed seeds (see ../shared PERFORMANCE.md
in the project notes and docs/benchmarks.md). Each returns lists of prompt token ids
and output lengths; no engine-specific code here."""
from __future__ import annotations

import numpy as np

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, copied and sold across Europe. ")


def text_prompt(tokenizer, n: int) -> list[int]:
    """n token ids of natural text (the same for every engine)."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, add_special_tokens=False)
    return ids[:n]


def latency(tokenizer, prompt_len=32, new=128):
    """Workload 1: batch 1, one prompt, `new` tokens, greedy, eos ignored."""
    return [text_prompt(tokenizer, prompt_len)], [new]


def batched(tokenizer, vocab, count=32, lo=64, hi=200, new=128, seed=0):
    """Workload 2 (as issue 8 states it): `count` prompts of lo..hi tokens, `new` each, submitted at once."""
    rng = np.random.default_rng(seed)
    base = text_prompt(tokenizer, hi + 64)
    lens = rng.integers(lo, hi + 1, size=count)
    starts = rng.integers(0, 64, size=count)
    return [base[s:s + n] for s, n in zip(starts, lens)], [new] * count


def mixed(vocab, count=1000, in_median=200, out_median=100, in_max=1500, out_max=800, seed=0):
    """Workload 3: long-tailed lengths (ShareGPT-like), random token ids."""
    rng = np.random.default_rng(seed)
    ins = np.clip(np.round(rng.lognormal(np.log(in_median), 1.0, count)), 4, in_max).astype(int)
    outs = np.clip(np.round(rng.lognormal(np.log(out_median), 1.0, count)), 1, out_max).astype(int)
    return [rng.integers(100, vocab, size=int(n)).tolist() for n in ins], outs.tolist()
