#!/usr/bin/env python3
"""How far transformers' own bf16 run follows its fp32 run on SmolLM2.

    python tools/hf_bf16_divergence.py

The same 6 prompts as tests/test_cuda.py, 32 greedy tokens each, the default
model in transformers on the CPU at fp32 and at bf16 (the same weights). Prints,
per prompt, whether the tokens are equal, else the first differing token and
the fp32 run's top-1 - top-2 logit margin there: the reference point for the
GPU's bf16 divergences in docs/results/2026-11-cuda-log.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import pagedrt  # noqa: E402
from conftest import SMOL_PROMPTS  # noqa: E402
from hf_cache import cache_arg  # noqa: E402

N = 32


def greedy(model, prompt):
    """(tokens, top-1 - top-2 margin at each step), with the KV cache."""
    ids, margins, past = list(prompt), [], None
    inp = torch.tensor([ids])
    name = cache_arg(model)  # `cache` or `past_key_values`, as the installed transformers names it
    with torch.no_grad():
        for _ in range(N):
            out = model(inp, **{name: past}, use_cache=True)
            past = getattr(out, name)
            logits = out.logits[0, -1].float()
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            ids.append(int(torch.argmax(logits)))
            inp = torch.tensor([[ids[-1]]])
    return ids[len(prompt):], margins


def main():
    path = pagedrt.default_model()
    with pagedrt.Runtime(path, device="cpu", kv_cache_bytes=64 << 20) as rt:
        prompts = [rt.encode_prompt(p) for p in SMOL_PROMPTS]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        runs[dtype] = [greedy(model, p) for p in prompts]
    equal = 0
    for k, ((a, ma), (b, _)) in enumerate(zip(runs[torch.float32], runs[torch.bfloat16])):
        j = next((i for i in range(N) if a[i] != b[i]), None)
        equal += j is None
        print(f"prompt {k}: " + ("equal" if j is None else f"first differing token {j}, fp32 margin {ma[j]:.2e}"))
    print(f"{equal} of {len(prompts)} prompts equal")


if __name__ == "__main__":
    main()
