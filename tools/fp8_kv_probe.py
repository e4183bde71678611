#!/usr/bin/env python3
"""Where the fp8 KV cache's error comes from on real weights (issue 21), and
what two known remedies would buy: a reference Llama forward in PyTorch
(fp32, CPU) whose keys and values are rounded to e4m3 as pagedrt stores them
(a power-of-two scale per token and kv head, the smallest with amax <= 448
times it: backend/fp8.hpp's kv_row_exponent), against the same forward
unrounded, teacher-forced over the text tools/fp8_quality.py reads.

    fp8_kv_probe.py [--model DIR|FILE.gguf] [--positions 4096]
                    [--modes kv,k,v,kv-amax,kv-s4,k-mean16,...] [--json OUT.json]

Modes (each also rounds V, but "k" and "v", which round only one of them):
  kv                 pagedrt's rule: K and V rounded after RoPE
  k, v               only K, only V
  kv-amax            K and V with the scale amax / 448 instead of a power of two (the top
                     value lands on 448 exactly; dequantized values then have more than 4
                     significant bits)
  kv-s4              a scale of 4 significant bits (m 2^e, m in 1, 1.125 ... 1.875), the smallest
                     with amax <= 448 times it: a code times it has at most 8 significant
                     bits, so it is the same number in fp32 and bf16 (as with a power of two)
  k-mean16           K minus the mean of its window's first 16 keys (per layer, kv head and
                     channel) before rounding: a query's scores all move by q.mean, which the
                     softmax ignores, so attention needs no correction
  k-hadamard         K rotated by a normalized Hadamard matrix before rounding and back after
  k-mean16-hadamard  both
  kv-amax-mean16, kv-amax-hadamard   the amax / 448 scale with those

Prints, per mode, the top-1 agreement with the unrounded forward and the
perplexity of the text (windows of 1,024 tokens). A probe, not pagedrt's
kernels: the engine's own figures are tools/fp8_quality.py's.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from fp8_quality import corpus  # noqa: E402

MODES = ("kv", "k", "v", "kv-amax", "kv-s4", "k-mean16", "k-hadamard", "k-mean16-hadamard", "kv-amax-mean16",
         "kv-amax-hadamard", "kv-amax-mean16-hadamard", "kv-s4-hadamard", "kv-s4-mean16-hadamard")
WINDOW = 1024


def hadamard(n):
    import torch
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def e4m3(x, scale="pow2"):
    """x rounded to e4m3 with a scale per row of its last axis: "pow2" 2^e, the
    smallest with max |row| <= 448 * 2^e (pagedrt's fp8 KV rows); "amax" max
    |row| / 448; "s4" the smallest m 2^e >= max |row| / 448 with m of 4
    significant bits."""
    import torch
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    if scale == "amax":
        s = amax / 448.0
    elif scale == "s4":
        t = amax / 448.0
        e = torch.floor(torch.log2(t))
        s = torch.ceil(t / torch.exp2(e) * 8) / 8 * torch.exp2(e)  # m = ceil(t / 2^e, 1/8), in [1, 2]
    else:
        s = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    return (x / s).to(torch.float8_e4m3fn).float() * s


class Llama:
    """The model's forward on one window of token ids, fp32 (the checkpoint's
    safetensors, a Hugging Face Llama layout)."""

    def __init__(self, folder):
        import torch
        from safetensors.torch import load_file
        cfg = json.loads((folder / "config.json").read_text())
        self.w = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.layers = cfg["num_hidden_layers"]
        self.heads, self.kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.dim = cfg["hidden_size"] // self.heads
        self.eps = cfg["rms_norm_eps"]
        inv = 1.0 / cfg.get("rope_theta", 10000.0) ** (torch.arange(0, self.dim, 2).float() / self.dim)
        self.inv_freq = inv
        self.had = hadamard(self.dim)

    def norm(self, x, w):
        import torch
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def rope(self, x):  # x (T, heads, D): rotate-half, positions 0 ... T - 1
        import torch
        f = torch.arange(x.shape[0]).float()[:, None] * self.inv_freq[None]
        c, s = f.cos()[:, None], f.sin()[:, None]
        x1, x2 = x[..., :self.dim // 2], x[..., self.dim // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def round_kv(self, k, v, mode):
        if mode is None:
            return k, v
        scale = "amax" if "amax" in mode else "s4" if "s4" in mode else "pow2"
        if mode != "k":
            v = e4m3(v, scale)
        if mode == "v":
            return k, v
        if "mean16" in mode:
            k = k - k[:16].mean(0, keepdim=True)  # (T, kv heads, D) - (1, kv heads, D)
        if "hadamard" in mode:
            return e4m3(k @ self.had, scale) @ self.had.T, v
        return e4m3(k, scale), v

    def log_probs(self, ids, mode=None):
        """(T, vocab) log-probabilities of each next token; mode: how K and V are rounded (None: not)."""
        import torch
        w, T = self.w, len(ids)
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]
        causal = torch.full((T, T), float("-inf")).triu(1)
        group = self.heads // self.kv_heads
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self.norm(x, w[p + "input_layernorm.weight"])
            q = self.rope((h @ w[p + "self_attn.q_proj.weight"].T).view(T, self.heads, self.dim))
            k = self.rope((h @ w[p + "self_attn.k_proj.weight"].T).view(T, self.kv_heads, self.dim))
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, self.kv_heads, self.dim)
            k, v = self.round_kv(k, v, mode)
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            a = torch.einsum("thd,shd->hts", q, k) / math.sqrt(self.dim) + causal
            o = torch.einsum("hts,shd->thd", a.softmax(-1), v).reshape(T, -1)
            x = x + o @ w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, w[p + "post_attention_layernorm.weight"])
            up = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
            x = x + up @ w[p + "mlp.down_proj.weight"].T
        x = self.norm(x, w["model.norm.weight"])
        return (x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T).log_softmax(-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a Llama folder or .gguf file (default: SmolLM2, converted)")
    ap.add_argument("--positions", type=int, default=4096, help="tokens of text, in windows of 1,024")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch

    import pagedrt
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    folder = pagedrt.resolve_model(args.model, progress=False)  # as fp8_quality.py: a folder, a .gguf or the default
    ids = pagedrt.Tokenizer.from_model_dir(folder).encode(corpus(), add_special_tokens=False)
    windows = [ids[s:s + WINDOW] for s in range(0, min(len(ids), args.positions), WINDOW)]
    windows = [w for w in windows if len(w) > 1]
    model = Llama(folder)
    res = {"model": str(folder), "positions": sum(len(w) for w in windows), "modes": {}}
    with torch.no_grad():
        ref = [model.log_probs(w) for w in windows]
        for mode in ["none"] + modes:
            lps = ref if mode == "none" else [model.log_probs(w, mode) for w in windows]
            agree = sum(int((lp.argmax(-1) == r.argmax(-1)).sum()) for lp, r in zip(lps, ref))
            nll = sum(-float(lp[:-1].gather(1, torch.tensor(w[1:])[:, None]).sum()) for lp, w in zip(lps, windows))
            n_next = sum(len(w) - 1 for w in windows)
            row = {"top1_agreement": agree / res["positions"], "perplexity": math.exp(nll / n_next)}
            res["modes"][mode] = row
            print(f"{mode:18s} top-1 agreement {100 * row['top1_agreement']:6.2f}%  "
                  f"perplexity {row['perplexity']:.3f}", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
