#!/usr/bin/env python3
"""Writes a Llama-family checkpoint with random bf16 weights (speed does not depend
on the values): config.json, sharded model-*.safetensors and the index.

    python tools/make_random_llama.py OUT_DIR                 # Llama-3-8B shape
    python tools/make_random_llama.py OUT_DIR --layers 2      # same widths, 2 layers
    python tools/make_random_llama.py OUT_DIR --preset llama3-70b   # Llama-3-70B shape (141 GB)
    python tools/make_random_llama.py OUT_DIR --preset smollm2-135m # SmolLM2-135M's widths, random
    python tools/make_random_llama.py OUT_DIR --tokenizer-from MODEL_DIR
        # the 8B widths with another model's tokenizer (its files, vocab size and special
        # ids): text prompts, chat templates and structured output on a model of that size

Weights are N(0, 0.02) (norms 1), drawn with a fixed seed by torch (on the GPU
when there is one); one shard per layer, so memory stays at one layer.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time

PRESETS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=8192,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # SmolLM2-135M's widths (the default model): what host time costs where the GPU's work is small
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         rope_theta=100000.0, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2),
    # tensor parallelism (docs/tensor_parallel.md): 141 GB of bf16, more than one H200 holds
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=8192,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", type=pathlib.Path, default=None, metavar="MODEL_DIR",
                    help="take this model folder's tokenizer files, vocab size and bos/eos ids")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    cfg = dict(PRESETS[args.preset])
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    special = dict(bos_token_id=cfg.pop("bos_token_id", 128000), eos_token_id=cfg.pop("eos_token_id", 128001))
    if args.tokenizer_from is not None:
        src = json.loads((args.tokenizer_from / "config.json").read_text())
        cfg["vocab_size"] = src["vocab_size"]
        special = {k: src[k] for k in special if k in src}
    H, Hkv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    D, inter, vocab = hidden // H, cfg["intermediate_size"], cfg["vocab_size"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    weight_map, t0 = {}, time.time()

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    L = cfg["num_hidden_layers"]
    shard("model-embed.safetensors", {"model.embed_tokens.weight": rand(vocab, hidden)})
    for l in range(L):
        p = f"model.layers.{l}."
        shard(f"model-layer{l:03d}.safetensors", {
            p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
            p + "self_attn.q_proj.weight": rand(H * D, hidden),
            p + "self_attn.k_proj.weight": rand(Hkv * D, hidden),
            p + "self_attn.v_proj.weight": rand(Hkv * D, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, H * D),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
        })
    shard("model-head.safetensors", {"model.norm.weight": ones(hidden), "lm_head.weight": rand(vocab, hidden)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                  rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16",
                  attention_bias=False, mlp_bias=False, head_dim=D, **special, **cfg)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if args.tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json"):
            if (args.tokenizer_from / name).is_file():
                shutil.copy(args.tokenizer_from / name, out / name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {L} layers, {size / 1e9:.2f} GB in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
