#!/usr/bin/env python3
"""GPU benchmarks (PERFORMANCE.md), one part per call so that each runs in its own
process (pagedrt and transformers each hold a 16 GB model):

    bench_cuda.py ceilings  OUT.json            copy bandwidth, bf16 GEMM, cuBLAS at small M
    bench_cuda.py attention OUT.json            paged decode attention over shapes vs SDPA, FlashInfer, copy
    bench_cuda.py attention_sweep OUT.json      the same, pagedrt only, per decode kernel configuration
    bench_cuda.py decode_grid OUT.json          decode attention, kv heads innermost in the grid vs items (A/B)
    bench_cuda.py gemv      OUT.json            own small-M GEMM vs cuBLASLt, n = 1..8, 8B shapes
    bench_cuda.py prefill   OUT.json            causal prefill attention, 64 and 128 rows a tile, vs SDPA
    bench_cuda.py gemm      OUT.json            the 8B projections at M = 1..8192 against the roofline, torch
    bench_cuda.py glu       OUT.json            gate/up with the SiLU-mul epilogue vs cuBLASLt + silu_mul, per M
    bench_cuda.py pagedrt   OUT.json MODEL_DIR  batch-1 TPOT (128/128), 256 x (512/128) throughput
    bench_cuda.py launch_ab OUT.json MODEL_DIR  batch-1 TPOT with CUDA graphs / PDL / fusions off and on
    bench_cuda.py tpot_env  OUT.json MODEL_DIR SETTING...   batch-1 TPOT per setting ("VAR=1,VAR2=0"; "" = none)
    bench_cuda.py ttft_env  OUT.json MODEL_DIR SETTING...   batch-1 TTFT at 1k/4k/8k-token prompts per setting
    bench_cuda.py new_shapes OUT.json MODEL_DIR SETTING...  what a never-seen step size costs, per setting
    bench_cuda.py batch_tpot OUT.json MODEL_DIR SETTING...  decode TPOT at batch 1/16/64/128/256, per setting
    bench_cuda.py throughput OUT.json MODEL_DIR SETTING...  256 x (512/128) greedy output tok/s, per setting
    bench_cuda.py throughput_long OUT.json MODEL_DIR SETTING...  512 x (1024/1024), the same way
    bench_cuda.py hf        OUT.json MODEL_DIR  the same workloads with transformers (eager+SDPA)
    bench_cuda.py verify    OUT.json MODEL_DIR  speculative verify step, 1 + k positions (k = 0..8) vs batch-1 TPOT
    bench_cuda.py sampling  OUT.json            device sampling over 1 / 64 / 256 rows of 128K logits vs torch
    bench_cuda.py elastic   OUT.json MODEL_DIR  the elastic KV pool against one taken whole: memory, tok/s
    bench_cuda.py preemption OUT.json MODEL_DIR 256 x (512/384) in an 8 GiB pool: recompute, swap, auto

GPU timings use CUDA events after warm-up, medians; inputs are random (never zeros).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import sys
import time

import numpy as np


def cuda_median_ms(fn, iters=20, warmup=3):
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ceilings():
    import torch
    r = {"device": torch.cuda.get_device_name()}
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), iters=30)
    r["copy_TBps"] = 2 * src.numel() * 4 / ms / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = cuda_median_ms(lambda: a @ b, iters=20)
    r["gemm_8192_TFLOPs"] = 2 * 8192 ** 3 / ms / 1e9
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    for m in (1, 16, 64, 256):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        ms = cuda_median_ms(lambda: x @ w.t(), iters=50)
        r[f"cublas_M{m}_weight_TBps"] = w.numel() * 2 / ms / 1e9
    return r


# Paged decode attention shapes: (batch, context, H, Hkv, D, block size). The
# first five are issue 16's (Llama-3-8B heads); then GQA groups 1 and 8, block
# size 32 and head dim 64 at batch 64 x 2,048.
DECODE_SHAPES = [(64, 2048, 32, 8, 128, 16), (256, 1024, 32, 8, 128, 16), (512, 512, 32, 8, 128, 16),
                 (16, 8192, 32, 8, 128, 16), (1, 32768, 32, 8, 128, 16),
                 (64, 2048, 8, 8, 128, 16), (64, 2048, 64, 8, 128, 16), (64, 2048, 32, 8, 128, 32),
                 (64, 2048, 32, 8, 64, 16)]


def copy_tbps():
    import torch
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    tb = 2 * a.numel() / cuda_median_ms(lambda: b.copy_(a), iters=30) / 1e9
    del a, b
    return tb


def flashinfer_decode(B, C, H, Hkv, D, bs):
    """FlashInfer's paged decode (NHD) on random K/V of the shape, median ms; None where it is not installed."""
    try:
        import flashinfer
    except ImportError:
        return None
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    pages_per = C // bs
    kv = torch.randn(B * pages_per, 2, bs, Hkv, D, device="cuda", dtype=torch.bfloat16, generator=g)
    perm = torch.randperm(B * pages_per, device="cuda", generator=g).int()
    indptr = torch.arange(0, B + 1, device="cuda", dtype=torch.int32) * pages_per
    last = torch.full((B,), bs, device="cuda", dtype=torch.int32)
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), "NHD")
    w.plan(indptr, perm, last, H, Hkv, D, bs, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    ms = cuda_median_ms(lambda: w.run(q, kv), iters=30, warmup=3)
    del kv, w
    torch.cuda.empty_cache()
    return ms


def paged_batch(B, C, q_len, bs, rng):
    """B sequences of context C whose last q_len tokens are the queries, their
    blocks in shuffled order: the number of blocks, and _Ops.set_batch's arrays."""
    nb = B * C // bs
    perm = rng.permutation(nb).astype(np.int32)
    table = perm.reshape(B, C // bs)
    pos = np.tile(np.arange(C - q_len, C, dtype=np.int32), B)
    slots = (table[np.repeat(np.arange(B), q_len), pos // bs].astype(np.int64) * bs + pos % bs)
    return nb, (np.zeros(B * q_len, np.int32), pos, slots, np.arange(0, B * q_len + 1, q_len, dtype=np.int32),
                np.full(B, C, np.int32), np.arange(0, nb + 1, C // bs, dtype=np.int32), perm,
                np.arange(B, dtype=np.int32) * q_len + q_len - 1)


def pagedrt_attention_s(B, C, q_len, H, Hkv, D, bs, base, rng, iters=30, fp8=False):
    """Median seconds of one pagedrt paged_attention call: B sequences of context C
    whose last q_len tokens are the queries (1: decode; C: a prompt from scratch),
    blocks in shuffled order, values tiled from `base` (fp8: an fp8 cache of
    codes and exponents tiled from it, kv_cache_dtype="fp8")."""
    from pagedrt import _testing
    nb, batch = paged_batch(B, C, q_len, bs, rng)
    qkv = np.resize(base, (B * q_len, (H + 2 * Hkv) * D))
    kc = np.resize(base[7:], (nb, bs, Hkv, D))
    vc = np.resize(base[11:], (nb, bs, Hkv, D))
    if fp8:  # row bytes: codes, then each block's exponents (16-byte padded; 0x38 = 1.0, exponent 0)
        row = Hkv * D + -(-bs * Hkv // 16) * 16 // bs
        kc = np.full((nb, bs, row), 0x38, np.uint8)
        kc.reshape(nb, -1)[:, bs * Hkv * D:] = 0
        vc = kc.copy()
    ops = _testing._Ops("cuda", kv_cache_dtype="fp8" if fp8 else "")
    ops.set_batch(*batch)
    return statistics.median(ops.bench_paged_attention(qkv, kc, vc, H, Hkv, D, D ** -0.5, iters) for _ in range(5))


# Prefill attention shapes (causal prompts from scratch): (batch, prompt, H, Hkv, D, block size)
PREFILL_SHAPES = [(8, 2048, 32, 8, 128, 16), (1, 8192, 32, 8, 128, 16)]


def attention():
    """Paged decode attention per shape: pagedrt (shuffled block tables), its bytes
    and fraction of the copy rate measured here, torch SDPA on the same-size K/V
    laid contiguous, FlashInfer's paged decode where installed. Then causal
    prefill: pagedrt's TFLOP/s against SDPA's on contiguous q/K/V."""
    import torch
    import torch.nn.functional as F

    copy = copy_tbps()
    r = {"device": torch.cuda.get_device_name(), "copy_TBps": copy, "shapes": [], "prefill": []}
    try:
        import flashinfer
        r["flashinfer"] = flashinfer.__version__
    except ImportError:
        print("FlashInfer is not installed: its column stays empty", flush=True)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1 << 24, dtype=np.float32)  # tiled into the inputs: timing, not values
    print(f"copy {copy:.2f} TB/s", flush=True)
    print(f"{'batch x ctx':>12} {'H/Hkv':>6} {'D':>4} {'blk':>4} {'pagedrt us':>10} {'TB/s':>5} "
          f"{'copy%':>5} {'SDPA us':>8} {'FI us':>7}", flush=True)
    for B, C, H, Hkv, D, bs in DECODE_SHAPES:
        sec = pagedrt_attention_s(B, C, 1, H, Hkv, D, bs, base, rng)
        kv_bytes = B * C * Hkv * D * 2 * 2
        q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        K = torch.randn(B, Hkv, C, D, device="cuda", dtype=torch.bfloat16)
        V = torch.randn(B, Hkv, C, D, device="cuda", dtype=torch.bfloat16)
        sdpa = cuda_median_ms(lambda: F.scaled_dot_product_attention(q, K, V, enable_gqa=True), iters=30)
        del q, K, V
        torch.cuda.empty_cache()
        fi = flashinfer_decode(B, C, H, Hkv, D, bs)
        row = {"shape": f"{B}x{C}", "H": H, "Hkv": Hkv, "D": D, "block": bs, "bytes": kv_bytes,
               "pagedrt_us": sec * 1e6, "pagedrt_TBps": kv_bytes / sec / 1e12,
               "frac_copy": kv_bytes / sec / 1e12 / copy, "sdpa_us": sdpa * 1e3,
               "sdpa_frac_copy": kv_bytes / sdpa / 1e9 / copy, "flashinfer_us": None if fi is None else fi * 1e3}
        r["shapes"].append(row)
        print(f"{B:>5}x{C:<6} {H:>3}/{Hkv:<2} {D:>4} {bs:>4} {row['pagedrt_us']:>10.1f} "
              f"{row['pagedrt_TBps']:>5.2f} {100 * row['frac_copy']:>5.1f} {row['sdpa_us']:>8.1f} "
              f"{'-' if fi is None else f'{fi * 1e3:.1f}':>7}", flush=True)
    r["prefill"] = prefill_kernels(base, rng, PREFILL_SHAPES, [("default", {})])
    return r


FP8_SWEEP_SHAPES = [(64, 2048, 32, 8, 128, 16), (256, 1024, 32, 8, 128, 16), (512, 512, 32, 8, 128, 16),
                    (16, 8192, 32, 8, 128, 16), (1, 32768, 32, 8, 128, 16), (1, 256, 32, 8, 128, 16)]


@contextlib.contextmanager
def environ(env):
    """Environment variables set for the block (read when a backend is made), then unset."""
    os.environ.update(env)
    try:
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)


def fp8_kv_bytes(B, C, Hkv, D):
    """The bytes decode reads from an fp8 cache: K and V codes and one exponent a row."""
    return B * C * Hkv * (D + 1) * 2


def decode_plan(B, C, H, Hkv, D, bs, fp8=False):
    """The decode plan's (warps, stages, splits, keys a split, 1 where the
    CUDA-core kernel runs it) for B sequences of context C (the batch only: no
    cache is made)."""
    from pagedrt import _testing
    ops = _testing._Ops("cuda", kv_cache_dtype="fp8" if fp8 else "")
    ops.set_batch(*paged_batch(B, C, 1, bs, np.random.default_rng(0))[1])
    return tuple(ops.decode_plan(H, Hkv, D))


def attention_probe():
    """A few launches of the decode kernels on 64 x 2,048 (32/8, D 128),
    bf16 then fp8 cache, for a profiler to attach to (gpu_check stage ncu)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1 << 24, dtype=np.float32)
    B, C, H, Hkv, D, bs = FP8_SWEEP_SHAPES[0]
    return {"bf16_us": pagedrt_attention_s(B, C, 1, H, Hkv, D, bs, base, rng, iters=3) * 1e6,
            "fp8_us": pagedrt_attention_s(B, C, 1, H, Hkv, D, bs, base, rng, iters=3, fp8=True) * 1e6}


def attention_fp8():
    """Paged decode attention on an fp8 cache (kv_cache_dtype="fp8") per
    DECODE_SHAPES against the bf16 cache in the same process: time, the fp8
    bytes it must read (codes and one exponent a row) and their fraction of the
    copy rate (issue 21: >= 85% at 64 x 2,048); the fp8 kernel's shapes
    (PAGEDRT_DECODE_KERNEL=WxS) and split counts (PAGEDRT_DECODE_SPLITS) on
    FP8_SWEEP_SHAPES, the plan's own choice first; then causal prefill on
    8 x 2,048, whose blocks are dequantized to bf16 first."""
    copy = copy_tbps()
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1 << 24, dtype=np.float32)
    r = {"copy_TBps": copy, "decode": [], "prefill": []}
    print(f"copy {copy:.2f} TB/s", flush=True)
    print(f"{'batch x ctx':>12} {'H/Hkv':>6} {'D':>4} {'blk':>4} {'bf16 us':>8} {'fp8 us':>8} {'fp8 TB/s':>8} "
          f"{'copy%':>5}", flush=True)
    for B, C, H, Hkv, D, bs in DECODE_SHAPES:
        b16 = pagedrt_attention_s(B, C, 1, H, Hkv, D, bs, base, rng)
        f8 = pagedrt_attention_s(B, C, 1, H, Hkv, D, bs, base, rng, fp8=True)
        nbytes = fp8_kv_bytes(B, C, Hkv, D)
        row = {"shape": f"{B}x{C}", "H": H, "Hkv": Hkv, "D": D, "block": bs, "fp8_bytes": nbytes,
               "bf16_us": b16 * 1e6, "fp8_us": f8 * 1e6, "fp8_TBps": nbytes / f8 / 1e12,
               "frac_copy": nbytes / f8 / 1e12 / copy}
        r["decode"].append(row)
        print(f"{B:>5}x{C:<6} {H:>3}/{Hkv:<2} {D:>4} {bs:>4} {row['bf16_us']:>8.1f} {row['fp8_us']:>8.1f} "
              f"{row['fp8_TBps']:>8.2f} {100 * row['frac_copy']:>5.1f}", flush=True)
    # The fp8 kernel's shapes (W warps x S stages a warp) and split counts, forced, on the sweep's shapes
    r["shapes"] = []
    print(f"{'W x S/splits':>12} " + " ".join(f"{f'{B}x{C} us':>12}" for B, C, *_ in FP8_SWEEP_SHAPES), flush=True)
    configs = [("plan", {})] + [(cfg, {"PAGEDRT_DECODE_KERNEL": cfg}) for cfg in ("2x3", "2x6", "4x4", "cc")]
    configs += [(f"2x4/{n}", {"PAGEDRT_DECODE_KERNEL": "2x4", "PAGEDRT_DECODE_SPLITS": str(n)})
                for n in (1, 2, 3, 4, 8, 16, 32)]
    configs += [("2x6/1", {"PAGEDRT_DECODE_KERNEL": "2x6", "PAGEDRT_DECODE_SPLITS": "1"})]
    for cfg, env in configs:
        with environ(env):
            us = [pagedrt_attention_s(B, C, 1, H, Hkv, D, bs, base, rng, fp8=True) * 1e6
                  for B, C, H, Hkv, D, bs in FP8_SWEEP_SHAPES]
        r["shapes"].append({"config": cfg, "us": us,
                            "frac_copy": [fp8_kv_bytes(B, C, Hkv, D) / (u * 1e-6) / 1e12 / copy
                                          for (B, C, H, Hkv, D, bs), u in zip(FP8_SWEEP_SHAPES, us)]})
        print(f"{cfg:>12} " + " ".join(f"{u:>12.1f}" for u in us), flush=True)
    plans = [decode_plan(B, C, H, Hkv, D, bs, fp8=True) for B, C, H, Hkv, D, bs in FP8_SWEEP_SHAPES]
    r["plans"] = [{"warps": w, "stages": st, "splits": n, "chunk": ch, "cuda_cores": bool(cc)}
                  for w, st, n, ch, cc in plans]
    print(f"{'plan chose':>12} " + " ".join(f"{f'cc/{n}' if cc else f'{w}x{st}/{n}':>12}" for w, st, n, _, cc in plans),
          flush=True)
    for B, S, H, Hkv, D, bs in PREFILL_SHAPES[:1]:
        flops = B * 4 * H * D * S * S / 2
        b16 = pagedrt_attention_s(B, S, S, H, Hkv, D, bs, base, rng, iters=10)
        f8 = pagedrt_attention_s(B, S, S, H, Hkv, D, bs, base, rng, iters=10, fp8=True)
        r["prefill"].append({"shape": f"{B}x{S}", "bf16_ms": b16 * 1e3, "fp8_ms": f8 * 1e3,
                             "bf16_TFLOPs": flops / b16 / 1e12, "fp8_TFLOPs": flops / f8 / 1e12})
        print(f"prefill {B}x{S}: bf16 {b16 * 1e3:.3f} ms, fp8 {f8 * 1e3:.3f} ms", flush=True)
    return r


def prefill_kernels(base, rng, shapes, settings):
    """Causal prefill per shape: pagedrt's time under each setting, a
    (label, environment) pair read when the backend is made (e.g.
    PAGEDRT_PREFILL_KERNEL=mma and PAGEDRT_PREFILL_ROWS=64), against SDPA's on
    contiguous q/K/V. FLOPs count half of Q K^T and P V (causal)."""
    import torch
    import torch.nn.functional as F

    out = []
    heads = " ".join(f"{label:>9}" for label, _ in settings)
    print(f"{'prefill':>12} {'H/Hkv':>6} {'D':>4} {heads} {'TFLOP/s':>8} {'SDPA ms':>8} {'TFLOP/s':>8}", flush=True)
    for B, S, H, Hkv, D, bs in shapes:
        flops = B * 4 * H * D * S * S / 2
        secs = {}
        for label, env in settings:
            with environ(env):
                secs[label] = pagedrt_attention_s(B, S, S, H, Hkv, D, bs, base, rng, iters=10)
        q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
        K = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        V = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        sdpa = cuda_median_ms(lambda: F.scaled_dot_product_attention(q, K, V, is_causal=True, enable_gqa=True),
                              iters=10) * 1e-3
        del q, K, V
        torch.cuda.empty_cache()
        best = min(secs.values())
        row = {"shape": f"{B}x{S}", "H": H, "Hkv": Hkv, "D": D, "block": bs, "flops": flops,
               "pagedrt_ms": best * 1e3, "pagedrt_TFLOPs": flops / best / 1e12,
               "by_setting_ms": {k: v * 1e3 for k, v in secs.items()},
               "sdpa_ms": sdpa * 1e3, "sdpa_TFLOPs": flops / sdpa / 1e12}
        out.append(row)
        cols = " ".join(f"{v * 1e3:>9.3f}" for v in secs.values())
        print(f"{B:>5}x{S:<6} {H:>3}/{Hkv:<2} {D:>4} {cols} {row['pagedrt_TFLOPs']:>8.1f} "
              f"{row['sdpa_ms']:>8.3f} {row['sdpa_TFLOPs']:>8.1f}", flush=True)
    return out


# The prefill part: issue 16's 8 x 2,048 (GQA 4, D 128), one 8,192 and one
# 32,768-token prompt, GQA 1 and D 64.
PREFILL_PART_SHAPES = PREFILL_SHAPES + [(1, 32768, 32, 8, 128, 16), (8, 2048, 32, 32, 128, 16),
                                        (8, 2048, 32, 8, 64, 16)]


def prefill():
    """Causal prefill attention: the mma.sync kernel at 64 and 128 rows a tile
    and Hopper's two wgmma kernels (128 rows, D = 128 only: at D = 64 those
    settings run the mma.sync kernel) — the first, and the warp-specialized
    TMA one with 2 and 3 stages — against SDPA."""
    import torch
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1 << 24, dtype=np.float32)
    settings = [("mma 64", {"PAGEDRT_PREFILL_KERNEL": "mma", "PAGEDRT_PREFILL_ROWS": "64"}),
                ("mma 128", {"PAGEDRT_PREFILL_KERNEL": "mma", "PAGEDRT_PREFILL_ROWS": "128"}),
                ("wgmma", {"PAGEDRT_PREFILL_KERNEL": "wgmma"}),
                ("ws", {"PAGEDRT_PREFILL_KERNEL": "ws", "PAGEDRT_PREFILL_STAGES": "2"}),
                ("ws 3", {"PAGEDRT_PREFILL_KERNEL": "ws", "PAGEDRT_PREFILL_STAGES": "3"})]
    return {"device": torch.cuda.get_device_name(), "prefill": prefill_kernels(base, rng, PREFILL_PART_SHAPES, settings)}


# prefill_deal's shapes: one prompt of each TTFT length and 32,768, and
# issue 16's batched shape (several prompts: dealt round-robin either way),
# GQA 4, D 128, 16-token pages.
DEAL_SHAPES = [(1, 1024, 32, 8, 128, 16), (1, 2048, 32, 8, 128, 16), (1, 4096, 32, 8, 128, 16),
               (1, 8000, 32, 8, 128, 16), (8, 2048, 32, 8, 128, 16), (1, 32768, 32, 8, 128, 16)]


def prefill_deal(rounds=2):
    """The warp-specialized prefill kernel with a prompt's tiles dealt in a
    snake (the default) against round-robin (PAGEDRT_PREFILL_DEAL=rounds),
    alternating, `rounds` each, on DEAL_SHAPES (prefill_kernels, SDPA
    beside them); then rounds / snake per shape, the best of each."""
    import torch
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1 << 24, dtype=np.float32)
    settings = [(f"{deal} {i + 1}", {"PAGEDRT_PREFILL_KERNEL": "ws", "PAGEDRT_PREFILL_DEAL": deal})
                for i in range(rounds) for deal in ("snake", "rounds")]
    rows = prefill_kernels(base, rng, DEAL_SHAPES, settings)
    for row in rows:
        best = {deal: min(ms for label, ms in row["by_setting_ms"].items() if label.startswith(deal))
                for deal in ("snake", "rounds")}
        row["rounds_over_snake"] = best["rounds"] / best["snake"]
        print(f"{row['shape']:>12} rounds / snake {row['rounds_over_snake']:.3f}", flush=True)
    return {"device": torch.cuda.get_device_name(), "prefill_deal": rows}


def attention_sweep():
    """pagedrt's decode attention on the first five DECODE_SHAPES under each bf16 kernel
    configuration (PAGEDRT_DECODE_KERNEL = warps x stages): us per shape and config."""
    configs = ["2x3", "4x3", "4x2", "2x2", "2x4"]
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1 << 24, dtype=np.float32)
    r = {"configs": configs, "shapes": []}
    print(f"{'batch x ctx':>12} " + " ".join(f"{c:>7}" for c in configs), flush=True)
    for B, C, H, Hkv, D, bs in DECODE_SHAPES[:5]:
        us = []
        for cfg in configs:
            os.environ["PAGEDRT_DECODE_KERNEL"] = cfg  # read when the backend is made
            us.append(1e6 * pagedrt_attention_s(B, C, 1, H, Hkv, D, bs, base, rng))
        os.environ.pop("PAGEDRT_DECODE_KERNEL", None)
        r["shapes"].append({"shape": f"{B}x{C}", "us": dict(zip(configs, us))})
        print(f"{B:>5}x{C:<6} " + " ".join(f"{u:>7.1f}" for u in us), flush=True)
    return r


def decode_grid(rounds=2):
    """Decode attention with the grid's kv heads innermost (the default) against
    items innermost (PAGEDRT_DECODE_GRID=items), alternating, `rounds` each, on
    DECODE_SHAPES (bf16) and FP8_SWEEP_SHAPES' first five (fp8 cache): the
    median us of each order and its fraction of the copy rate, per shape."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1 << 24, dtype=np.float32)
    copy = copy_tbps()
    r = {"copy_TBps": copy, "shapes": []}
    print(f"copy {copy:.2f} TB/s", flush=True)
    print(f"{'cache':>5} {'batch x ctx':>12} {'H/Hkv':>6} {'D':>4} {'blk':>4} {'heads us':>9} {'copy%':>6} "
          f"{'items us':>9} {'copy%':>6} {'items/heads':>11}", flush=True)
    cases = [(False, s) for s in DECODE_SHAPES] + [(True, s) for s in FP8_SWEEP_SHAPES[:5]]
    for fp8, (B, C, H, Hkv, D, bs) in cases:
        kv_bytes = fp8_kv_bytes(B, C, Hkv, D) if fp8 else B * C * Hkv * D * 2 * 2
        us = {"heads": [], "items": []}
        for _ in range(rounds):
            for order in us:
                with environ({"PAGEDRT_DECODE_GRID": order}):
                    us[order].append(1e6 * pagedrt_attention_s(B, C, 1, H, Hkv, D, bs, base, rng, fp8=fp8))
        med = {k: statistics.median(v) for k, v in us.items()}
        row = {"cache": "fp8" if fp8 else "bf16", "shape": f"{B}x{C}", "H": H, "Hkv": Hkv, "D": D, "block": bs,
               "bytes": kv_bytes, "us": us, "heads_us": med["heads"], "items_us": med["items"],
               "heads_frac_copy": kv_bytes / med["heads"] / 1e6 / copy,
               "items_frac_copy": kv_bytes / med["items"] / 1e6 / copy}
        r["shapes"].append(row)
        print(f"{row['cache']:>5} {B:>5}x{C:<6} {H:>3}/{Hkv:<2} {D:>4} {bs:>4} {med['heads']:>9.1f} "
              f"{100 * row['heads_frac_copy']:>6.1f} {med['items']:>9.1f} {100 * row['items_frac_copy']:>6.1f} "
              f"{med['items'] / med['heads']:>11.3f}", flush=True)
    return r


# decode_splits' grid: (batch, context, head dim) -> (kernel shapes, split counts).
SPLIT_GRID = {(1, 32768, 128): (["2x3", "4x3"], [16, 32, 64]),
              (4, 16384, 128): (["2x3", "4x3"], [8, 16, 32]),
              (16, 8192, 128): (["2x3", "4x3"], [2, 4])}
# decode_sweep's: the shapes still short of issue 16's fractions (1 x 32,768 at 75%, D 64 at 90%).
SWEEP_GRID = {(1, 32768, 128): (["2x3", "4x3", "4x4", "4x2", "2x4"], [8, 16, 32, 64]),
              (64, 2048, 64): (["2x3", "4x3", "4x4", "2x4", "4x2", "2x2"], [1, 2, 3, 4]),
              (16, 8192, 64): (["2x3", "4x3", "4x4", "2x4"], [1, 2, 4, 8])}
# d64_sweep's: head dim 64 across batch shapes, 32/8 heads and SmolLM2's 9/3;
# split count 0 is the plan's own for that kernel.
D64_GRID = {(256, 1024, 64): (["2x3", "4x3"], [0, 1, 2]),
            (512, 512, 64): (["2x3", "4x3"], [0, 1]),
            (64, 2048, 64): (["2x3", "4x3"], [0, 1, 2]),
            (16, 8192, 64): (["2x3", "4x3"], [0, 4, 8]),
            (4, 8192, 64): (["2x3", "4x3"], [0, 8, 16]),
            (64, 2048, 64, 9, 3): (["2x3", "4x3"], [0, 1, 2]),
            (256, 1024, 64, 9, 3): (["2x3", "4x3"], [0, 1]),
            (8, 4096, 64, 9, 3): (["2x3", "4x3"], [0, 4, 8])}

# decode_short's: many sequences at short contexts, as in issue 17's batch-256 decode step (128 in /
# 128 out: 129 to 256 keys), where the plan runs every item unsplit; the kernel shapes forced, 0: the plan's splits.
SHORT_GRID = {(256, 160, 128): (["2x2", "2x3", "2x4", "4x2", "4x3"], [0]),
              (256, 256, 128): (["2x2", "2x3", "2x4", "4x2", "4x3"], [0]),
              (512, 128, 128): (["2x2", "2x3", "4x2", "4x3"], [0]),
              (128, 512, 128): (["2x2", "2x3", "4x2", "4x3"], [0])}


def decode_splits(grid=None):
    """Decode attention under forced split counts (PAGEDRT_DECODE_SPLITS; 0: the
    plan's) and kernel shapes (PAGEDRT_DECODE_KERNEL) where splits matter (long
    contexts, few sequences): us and fraction of the copy rate per (shape,
    kernel, splits); grid keys (B, C, D[, H, Hkv]), heads 32 over 8 unless
    given, block 16."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1 << 24, dtype=np.float32)
    copy = copy_tbps()
    r = {"copy_TBps": copy, "shapes": []}
    print(f"copy {copy:.2f} TB/s", flush=True)
    for key, (kernels, splits) in (grid or SPLIT_GRID).items():
        B, C, D, H, Hkv = key + (32, 8)[len(key) - 3:]
        kv_bytes = B * C * Hkv * D * 2 * 2
        row = {"shape": f"{B}x{C}", "D": D, "H": H, "Hkv": Hkv, "bytes": kv_bytes, "us": {},
               "plan": decode_plan(B, C, H, Hkv, D, 16)}
        row["default_us"] = 1e6 * pagedrt_attention_s(B, C, 1, H, Hkv, D, 16, base, rng)
        print(f"{B}x{C} D {D} heads {H}/{Hkv}: default {row['default_us']:.1f} us ({kv_bytes / row['default_us'] / 1e6 / copy:.0%} "
              f"of copy; plan {row['plan']})", flush=True)
        for k in kernels:
            for sp in splits:
                os.environ["PAGEDRT_DECODE_KERNEL"] = k
                if sp:
                    os.environ["PAGEDRT_DECODE_SPLITS"] = str(sp)
                else:
                    os.environ.pop("PAGEDRT_DECODE_SPLITS", None)
                us = 1e6 * pagedrt_attention_s(B, C, 1, H, Hkv, D, 16, base, rng)
                row["us"][f"{k}/{sp}"] = us
                print(f"  {k:>4} splits {sp:>3}: {us:7.1f} us  {kv_bytes / us / 1e6 / copy:.0%}", flush=True)
        os.environ.pop("PAGEDRT_DECODE_KERNEL", None)
        os.environ.pop("PAGEDRT_DECODE_SPLITS", None)
        r["shapes"].append(row)
    return r


def decode_sweep():
    """decode_splits over SWEEP_GRID."""
    return decode_splits(SWEEP_GRID)


def decode_short():
    """decode_splits over SHORT_GRID (short contexts at serving batch sizes)."""
    return decode_splits(SHORT_GRID)


def d64_sweep():
    """decode_splits over D64_GRID (the head-dim-64 plan rule's evidence)."""
    return decode_splits(D64_GRID)


def sampling():
    """Device sampling (Backend::sample) of rows of Llama-3's vocabulary (128,256
    fp32 logits) per filter set and row count, against what the same draws cost
    in torch on the GPU (softmax, a descending sort and its cumulative sum for
    top-k / top-p, multinomial: the usual GPU sampler) and against copying the
    rows to the host (what host sampling needs before it starts)."""
    import torch
    from pagedrt import _testing
    vocab = 128256
    ops = _testing._Ops("cuda")
    sets = [("T=1", 1.0, 0, 1.0, 0.0, 0, -1), ("top_k=50", 1.0, 50, 1.0, 0.0, 0, -1),
            ("top_p=0.9", 1.0, 0, 0.9, 0.0, 0, -1), ("k=50 p=0.9 min_p=0.05", 0.8, 50, 0.9, 0.05, 0, -1),
            ("p=0.9, 1,000 penalized", 1.0, 0, 0.9, 0.0, 1000, -1), ("T=1, logprobs 5", 1.0, 0, 1.0, 0.0, 0, 5)]
    r = {"vocab": vocab, "rows": []}
    print(f"{'rows':>5} {'filters':<24} {'pagedrt ms':>10} {'torch ms':>9} {'copy to host ms':>15}", flush=True)
    for n in (1, 64, 256):
        x = 4.0 * torch.randn(n, vocab, device="cuda")
        host = torch.empty(n, vocab, pin_memory=True)
        copy = cuda_median_ms(lambda: host.copy_(x, non_blocking=True), iters=20)
        for name, t, k, p, mp, edits, lps in sets:
            ours = 1e3 * ops.bench_sample(n, vocab, t, k, p, mp, 20, edits, lps)
            seen = (torch.arange(edits, device="cuda") * max(1, vocab // max(edits, 1)))[None, :] + \
                torch.arange(n, device="cuda")[:, None]

            def peer():
                y = x
                if edits:  # repetition, then frequency and presence, on the seen tokens (vLLM's way: gather, scatter)
                    v = x.gather(1, seen)
                    v = torch.where(v > 0, v / 1.2, v * 1.2) - 1.0
                    y = x.scatter(1, seen, v)
                if lps >= 0:
                    torch.log_softmax(x, dim=-1).topk(lps, dim=-1)
                probs = torch.softmax(y / t, dim=-1)
                if k or p < 1.0 or mp:
                    sp, si = probs.sort(dim=-1, descending=True)
                    keep = torch.ones_like(sp, dtype=torch.bool)
                    if k:
                        keep[:, k:] = False
                    if p < 1.0:
                        keep &= (sp.cumsum(-1) - sp) < p
                    if mp:
                        keep &= sp >= mp * sp[:, :1]
                    sp = sp * keep
                    return si.gather(1, torch.multinomial(sp, 1))
                return torch.multinomial(probs, 1)
            theirs = cuda_median_ms(peer, iters=20)
            r["rows"].append({"rows": n, "filters": name, "pagedrt_ms": ours, "torch_ms": theirs, "copy_ms": copy})
            print(f"{n:>5} {name:<24} {ours:>10.3f} {theirs:>9.3f} {copy:>15.3f}", flush=True)
    return r


# Llama-3-8B's linear layers: (name, m = out features, k = in features, fp32 out)
GEMV_SHAPES = [("qkv", 6144, 4096, False), ("o_proj", 4096, 4096, False), ("gate_up", 28672, 4096, False),
               ("down", 4096, 14336, False), ("lm_head", 128256, 4096, True)]


def gemv():
    """The own small-M GEMM (gemv.cu) against cuBLASLt, y (n, m) = x (n, k) @ W^T
    for n = 1, 2, 4, 8. Times come from `_Ops.time_linear`: the median of 50
    batches of back-to-back calls on the backend's stream (host clock around
    each ~2 ms batch, after a warm-up; the backend's stream is not torch's, so
    torch's CUDA events cannot see it), W rotating through > 512 MiB of copies
    so that it is never L2-resident, as in a decode step. TB/s counts weight
    bytes; the ratio is to a 1 GiB device-to-device copy (read + write) timed
    in the same process."""
    import torch
    from pagedrt import _testing

    r = {"device": torch.cuda.get_device_name()}
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), iters=50)
    copy = 2 * src.numel() * 4 / ms / 1e9
    r["copy_TBps"] = copy
    del src, dst
    torch.cuda.empty_cache()
    ops = _testing._Ops("cuda")
    rows = []
    for name, m, k, f32 in GEMV_SHAPES:
        for n in (1, 2, 4, 8):
            us = {impl: ops.time_linear(n, m, k, f32, 50, "engine" if impl == "own" else "heuristic")
                  for impl in ("own", "cublas")}
            row = {"shape": name, "m": m, "k": k, "n": n, "out": "fp32" if f32 else "bf16"}
            for impl, t in us.items():
                row[f"{impl}_us"] = t
                row[f"{impl}_TBps"] = m * k * 2 / t / 1e6
                row[f"{impl}_vs_copy"] = row[f"{impl}_TBps"] / copy
            row["speedup"] = us["cublas"] / us["own"]
            rows.append(row)
            print(f"{name:8s} m {m:6d} k {k:5d} n {n}: own {us['own']:7.1f} us {row['own_TBps']:.2f} TB/s "
                  f"({100 * row['own_vs_copy']:.0f}% of copy) | cuBLASLt {us['cublas']:7.1f} us "
                  f"{row['cublas_TBps']:.2f} TB/s ({100 * row['cublas_vs_copy']:.0f}%) | x{row['speedup']:.2f}",
                  flush=True)
    r["rows"] = rows
    one = {row["shape"]: row for row in rows if row["n"] == 1}
    for impl in ("own", "cublas"):
        r[f"decode_gemm_ms_{impl}"] = decode_chain_ms({s: row[f"{impl}_us"] for s, row in one.items()})
    return r


def decode_chain_ms(us):
    """One batch-1 decode step's GEMMs (the 8B shape), ms, from µs per
    GEMV_SHAPES name: 32 layers of qkv, o_proj, gate_up and down, and the lm head."""
    return (32 * sum(us[s] for s in ("qkv", "o_proj", "gate_up", "down")) + us["lm_head"]) / 1e3


GEMM_ROWS = [1, 8, 16, 32, 64, 128, 256, 512, 2048, 8192]
# Prefill steps of odd sizes (a prompt's length, a chunk's remainder).
GEMM_ODD_ROWS = [300, 1000, 1500, 3000, 4000, 5000, 6000, 7000, 8000]


def gemm_odd():
    """The 8B projections at odd n (GEMM_ODD_ROWS): cuBLASLt's first pick (the
    engine's) against the searched pick, against the roofline (as gemm)."""
    return gemm(GEMM_ODD_ROWS, ("heuristic", "search"), torch_peer=False)


def gemm_invariant():
    """deterministic=True's GEMMs (InvariantGemm: the own GEMV's order at every
    n) against the default engine's (own GEMV, then cuBLASLt's first pick),
    the 8B projections at every M of GEMM_ROWS and 300, against the roofline
    (as gemm)."""
    return gemm(sorted(GEMM_ROWS + [300]), ("engine", "invariant"), torch_peer=False)


def gemm(rows_n=GEMM_ROWS, impls=("engine", "search", "heuristic"), torch_peer=True):
    """Llama-3-8B's four projections at every M a step can have, against the
    roofline: the time bound is max(bytes / copy bandwidth, FLOPs / bf16 GEMM
    rate), both ceilings measured in this run (a 1 GiB copy; torch's 8192^3
    bf16 GEMM), bytes = W + x + y. pagedrt as the engine runs it ("engine":
    own small-M kernel at n <= 8, else cuBLASLt's first pick), cuBLASLt searched and cuBLASLt's heuristic first pick
    (both without the own kernel), and torch.matmul (its own cuBLAS choice) on
    the same sizes. pagedrt times come from `_Ops.time_linear` (median of 20
    ~2 ms batches, W rotating through > 512 MiB); torch's from CUDA events
    around a pass over > 512 MiB of W copies."""
    import torch
    from pagedrt import _testing

    r = {"device": torch.cuda.get_device_name(), "copy_TBps": copy_tbps()}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    r["gemm_8192_TFLOPs"] = tc = 2 * 8192 ** 3 / cuda_median_ms(lambda: a @ b, iters=20) / 1e9
    del a, b
    print(f"ceilings: copy {r['copy_TBps']:.2f} TB/s, bf16 GEMM 8192^3 {tc:.0f} TFLOP/s", flush=True)
    ops = _testing._Ops("cuda")
    shown = impls + (("torch",) if torch_peer else ())
    print(f"{'proj':8s} {'n':>5s} {'roof us':>8s} {'bound':>5s} " + " ".join(f"{i:>16s}" for i in shown), flush=True)
    rows = []
    for name, m, k, _ in GEMV_SHAPES[:4]:
        wbytes = m * k * 2
        ws = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
              for _ in range(max(2, -(-(512 << 20) // wbytes)) if torch_peer else 0)]
        for n in rows_n:
            nbytes, flops = wbytes + 2 * n * (k + m), 2 * n * m * k
            t_mem, t_tc = nbytes / r["copy_TBps"] / 1e6, flops / tc / 1e6
            roof = max(t_mem, t_tc)
            row = {"shape": name, "m": m, "k": k, "n": n, "bytes": nbytes, "flops": flops, "roof_us": roof,
                   "bound": "mem" if t_mem >= t_tc else "tc"}
            for impl in impls:
                row[f"{impl}_us"] = ops.time_linear(n, m, k, False, 20, impl)
            if torch_peer:
                x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                y = torch.empty(n, m, device="cuda", dtype=torch.bfloat16)

                def run_torch():
                    for w in ws:
                        torch.matmul(x, w.t(), out=y)
                row["torch_us"] = cuda_median_ms(run_torch, iters=10) * 1e3 / len(ws)
            for impl in shown:
                row[f"{impl}_roof"] = roof / row[f"{impl}_us"]
            rows.append(row)
            print(f"{name:8s} {n:5d} {roof:8.1f} {row['bound']:>5s} " +
                  " ".join(f"{row[f'{i}_us']:8.1f} ({100 * row[f'{i}_roof']:3.0f}%)" for i in shown), flush=True)
        del ws
        torch.cuda.empty_cache()
    r["rows"] = rows
    for impl in shown:
        r[f"{impl}_min_roof"] = min(row[f"{impl}_roof"] for row in rows)
        r[f"{impl}_at_85"] = sum(row[f"{impl}_roof"] >= 0.85 for row in rows)
        r[f"{impl}_total_us"] = sum(row[f"{impl}_us"] for row in rows)
    print("rows at >= 85% of the roofline: " + ", ".join(f"{i} {r[f'{i}_at_85']}/{len(rows)}" for i in shown))
    print("sum of the rows' times, us: " + ", ".join(f"{i} {r[f'{i}_total_us']:.0f}" for i in shown))
    return r


GLU_SHAPES = [("8B", 14336, 4096), ("SmolLM2", 1536, 576)]  # (I, hidden): gate/up (2 I, hidden)
GLU_ROWS = [256, 512, 1024, 2048, 4096, 8000, 8192]


def glu():
    """The MLP's gate/up projection with its SiLU·mul, y (n, I) = silu(x @
    gate^T) * (x @ up^T), two ways: the GEMM with the SiLU·mul in its
    epilogue (glu_gemm.hpp, forced from 1 row: "glu" in clusters of two
    blocks; "glu_c1" without, the default) against cuBLASLt's
    first pick writing (n, 2 I) bf16 then the silu_mul kernel ("unfused", the
    engine's path before). Against the same run's bf16 GEMM rate (torch's
    8192^3) for the product's FLOPs, and against the copy rate for the bytes
    (W + x + y; the unfused path also writes and reads the (n, 2 I) product).
    Times from `_Ops.time_linear` (median of 20 ~2 ms batches, W rotating
    through > 512 MiB)."""
    import torch
    from pagedrt import _testing

    r = {"device": torch.cuda.get_device_name(), "copy_TBps": copy_tbps()}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    r["gemm_8192_TFLOPs"] = tc = 2 * 8192 ** 3 / cuda_median_ms(lambda: a @ b, iters=20) / 1e9
    del a, b
    torch.cuda.empty_cache()
    print(f"ceilings: copy {r['copy_TBps']:.2f} TB/s, bf16 GEMM 8192^3 {tc:.0f} TFLOP/s", flush=True)
    ops = _testing._Ops("cuda")
    print(f"{'shape':8s} {'n':>5s} {'roof us':>8s} {'glu us':>8s} {'TFLOP/s':>8s} {'of roof':>7s} "
          f"{'glu_c1 us':>9s} {'unfused us':>10s} {'TFLOP/s':>8s} {'of roof':>7s} {'speedup':>7s}", flush=True)
    rows = []
    for name, inter, k in GLU_SHAPES:
        for n in GLU_ROWS:
            flops = 2 * n * 2 * inter * k
            nbytes = 2 * inter * k * 2 + n * k * 2 + n * inter * 2
            roof = max(flops / tc / 1e6, nbytes / r["copy_TBps"] / 1e6)
            row = {"shape": name, "inter": inter, "k": k, "n": n, "flops": flops, "roof_us": roof}
            for impl, key in (("glu", "glu"), ("glu_c1", "glu_c1"), ("glu_off", "unfused")):
                t = ops.time_linear(n, 2 * inter, k, False, 20, impl)
                row[f"{key}_us"], row[f"{key}_TFLOPs"], row[f"{key}_roof"] = t, flops / t / 1e6, roof / t
            row["speedup"] = row["unfused_us"] / row["glu_us"]
            rows.append(row)
            print(f"{name:8s} {n:5d} {roof:8.1f} {row['glu_us']:8.1f} {row['glu_TFLOPs']:8.0f} "
                  f"{100 * row['glu_roof']:6.0f}% {row['glu_c1_us']:9.1f} {row['unfused_us']:10.1f} {row['unfused_TFLOPs']:8.0f} "
                  f"{100 * row['unfused_roof']:6.0f}% {row['speedup']:7.3f}", flush=True)
    r["rows"] = rows
    return r


def gemm_fp8(rows_n=GEMM_ROWS):
    """The 8B projections with fp8 weights (quantization="fp8", W8A8) against
    bf16, per M, against the fp8 roofline: max(bytes / copy bandwidth, FLOPs /
    fp8 GEMM rate), both ceilings measured in this run (a 1 GiB copy; torch's
    8192^3 e4m3 _scaled_mm), bytes = W (1 byte a weight) + x (bf16) + y (bf16).
    pagedrt's fp8 time includes quantizing x per token (a kernel of its own).
    The peer: torch._scaled_mm with row-wise scales on already quantized x."""
    import torch
    from pagedrt import _testing

    r = {"device": torch.cuda.get_device_name(), "copy_TBps": copy_tbps()}
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    r["fp8_gemm_8192_TFLOPs"] = tc = 2 * 8192 ** 3 / cuda_median_ms(
        lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), iters=20) / 1e9
    del a, b
    print(f"ceilings: copy {r['copy_TBps']:.2f} TB/s, fp8 GEMM 8192^3 {tc:.0f} TFLOP/s", flush=True)
    ops = _testing._Ops("cuda")
    print(f"{'proj':8s} {'n':>5s} {'roof us':>8s} {'bound':>5s} {'fp8':>16s} {'bf16':>9s} {'torch fp8':>16s}",
          flush=True)
    rows = []
    for name, m, k, _ in GEMV_SHAPES[:4]:
        copies = max(2, -(-(512 << 20) // (m * k)))
        ws = [torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies)]
        sw = torch.ones(1, m, device="cuda")
        for n in rows_n:
            nbytes, flops = m * k + 2 * n * (k + m), 2 * n * m * k
            t_mem, t_tc = nbytes / r["copy_TBps"] / 1e6, flops / tc / 1e6
            roof = max(t_mem, t_tc)
            row = {"shape": name, "m": m, "k": k, "n": n, "bytes": nbytes, "flops": flops, "roof_us": roof,
                   "bound": "mem" if t_mem >= t_tc else "tc",
                   "fp8_us": ops.time_linear(n, m, k, False, 20, "fp8"),
                   "bf16_us": ops.time_linear(n, m, k, False, 20, "engine")}
            x = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
            sx = torch.ones(n, 1, device="cuda")
            try:
                def run_torch():
                    for w in ws:
                        torch._scaled_mm(x, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
                row["torch_us"] = cuda_median_ms(run_torch, iters=10) * 1e3 / len(ws)
            except RuntimeError as e:  # row-wise scales need a recent torch and cuBLASLt
                row["torch_us"], row["torch_error"] = float("nan"), str(e).splitlines()[0]
            for impl in ("fp8", "torch"):
                row[f"{impl}_roof"] = roof / row[f"{impl}_us"]
            row["fp8_vs_bf16"] = row["bf16_us"] / row["fp8_us"]
            rows.append(row)
            print(f"{name:8s} {n:5d} {roof:8.1f} {row['bound']:>5s} {row['fp8_us']:8.1f} ({100 * row['fp8_roof']:3.0f}%) "
                  f"{row['bf16_us']:9.1f} {row['torch_us']:8.1f} ({100 * row['torch_roof']:3.0f}%)", flush=True)
        del ws
        torch.cuda.empty_cache()
    r["rows"] = rows
    r["fp8_at_85"] = sum(row["fp8_roof"] >= 0.85 for row in rows)
    r["fp8_total_us"] = sum(row["fp8_us"] for row in rows)
    r["bf16_total_us"] = sum(row["bf16_us"] for row in rows)
    print(f"fp8 rows at >= 85% of the fp8 roofline: {r['fp8_at_85']}/{len(rows)}; sum of times fp8 "
          f"{r['fp8_total_us']:.0f} us, bf16 {r['bf16_total_us']:.0f} us")
    return r


def fp8_decode_chain():
    """A batch-1 decode step's GEMMs alone with fp8 weights (n = 1, the own
    GEMV, back to back with PDL as `gemv` times them): qkv, o_proj, gate_up
    and down in e4m3, the lm head in bf16 (fp32 out), each against the copy
    rate for its weight bytes; the chain is 32 layers + the lm head, against
    its floor (the step's weight bytes / copy). Four ways: x quantized in the
    GEMV's prologue (the default) and by a kernel of its own
    (PAGEDRT_FP8_GEMV_QUANT=0); every shape at 2 and at 4 steps a chunk
    (PAGEDRT_GEMV_STEPS: 2 leaves a block slot an SM for the next GEMV).
    Batch-1 TPOT minus the chain is what the rest of the step costs (norms,
    attention, RoPE, sampling, gaps)."""
    from pagedrt import _testing

    copy = copy_tbps()
    r = {"copy_TBps": copy, "runs": {}}
    print(f"copy {copy:.2f} TB/s", flush=True)
    for label, env in (("prologue", {}), ("kernel", {"PAGEDRT_FP8_GEMV_QUANT": "0"}),
                       ("steps2", {"PAGEDRT_GEMV_STEPS": "2"}), ("steps4", {"PAGEDRT_GEMV_STEPS": "4"})):
        with environ(env):
            ops = _testing._Ops("cuda")
            run, total_bytes = {}, 0
            for name, m, k, f32 in GEMV_SHAPES:
                fp8 = name != "lm_head"
                us = ops.time_linear(1, m, k, f32, 30, "fp8" if fp8 else "engine")
                nbytes = m * k * (1 if fp8 else 2)
                run[name] = {"us": us, "bytes": nbytes, "frac_copy": nbytes / us / 1e6 / copy}
                total_bytes += nbytes * (1 if name == "lm_head" else 32)
                print(f"{label:8s} {name:8s} {us:7.1f} us {100 * run[name]['frac_copy']:5.1f}% of copy", flush=True)
            chain = decode_chain_ms({s: run[s]["us"] for s in run})
            floor = total_bytes / copy / 1e9
            run.update(chain_ms=chain, floor_ms=floor, weight_bytes=total_bytes)
            print(f"{label:8s} chain {chain:.3f} ms, floor {floor:.3f} ms ({100 * floor / chain:.1f}%)", flush=True)
            r["runs"][label] = run
            del ops
    return r


def batch1_latency(rt, rng):
    """(TTFT ms, TPOT ms) of one 128-token prompt, 128 greedy tokens, after a warm-up (second trial)."""
    import pagedrt
    params = pagedrt.SamplingParams(max_tokens=128, ignore_eos=True, temperature=0.0)
    rt.generate([rng.integers(0, 128000, size=128).tolist()], max_tokens=8, ignore_eos=True, temperature=0.0)
    for trial in range(2):
        rid = rt.submit(rng.integers(0, 128000, size=128).tolist(), params)
        t_sub, stamps, done = time.perf_counter(), [], False
        while not done:
            for ev in rt.poll(rid, timeout=1.0):
                now = time.perf_counter()
                stamps += [now] * len(ev.token_ids)
                done = ev.finished
    return (stamps[0] - t_sub) * 1e3, (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def long_ttft_ms(rt, rng, n):
    """(time to first token, the engine's forward time within it) of one n-token
    prompt (fresh random tokens, so no cached prefix), ms, the better of two
    after a warm-up. The difference is host time outside the step: Python,
    submission, scheduling, the event's way back."""
    import pagedrt
    params = pagedrt.SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    rt.generate([rng.integers(0, 128000, size=n).tolist()], params)
    best = (float("inf"), 0.0)
    for _ in range(2):
        prompt = rng.integers(0, 128000, size=n).tolist()
        f0 = rt.stats().forward_seconds
        t0 = time.perf_counter()
        rt.generate([prompt], params)
        t = (time.perf_counter() - t0) * 1e3
        best = min(best, (t, (rt.stats().forward_seconds - f0) * 1e3))
    return best


def launch_ab(model):
    """Batch-1 TPOT with CUDA graphs, programmatic dependent launch and the
    fused kernels (RoPE in decode attention, SiLU·mul in the gate/up GEMV) off
    and on (PAGEDRT_CUDA_GRAPHS, PAGEDRT_CUDA_PDL, PAGEDRT_CUDA_FUSE), one
    Runtime per setting, same run; the last two settings twice, interleaved
    (the better of the two kept)."""
    flags = (("0", "0", "0"), ("1", "0", "0"), ("1", "1", "0"), ("1", "1", "1"), ("1", "1", "0"), ("1", "1", "1"))
    setting = "PAGEDRT_CUDA_GRAPHS={},PAGEDRT_CUDA_PDL={},PAGEDRT_CUDA_FUSE={}".format
    tpot = tpot_env(model, [setting(*f) for f in flags])
    return {f"tpot_ms_graphs{g}_pdl{p}_fuse{f}": tpot[setting(g, p, f)] for g, p, f in flags}


def split_setting(setting):
    """"NAME=VALUE,NAME=VALUE" as (environment variables: upper-case names,
    Runtime options: lower-case ones, whole numbers as ints: max_num_seqs=512,
    true / false as booleans: deterministic=true)."""
    pairs = dict(kv.split("=", 1) for kv in setting.split(",") if kv)
    flags = {"true": True, "false": False}
    return ({k: v for k, v in pairs.items() if not k.islower()},
            {k: int(v) if v.isdigit() else flags.get(v.lower(), v) for k, v in pairs.items() if k.islower()})


@contextlib.contextmanager
def runtime_under(model, setting, **kw):
    """A CUDA Runtime made under a setting ("NAME=VALUE,NAME=VALUE" of
    environment variables read when the backend is made, or of Runtime
    options where NAME is lower case: async_scheduling=off; "" for none),
    closed and its variables unset after."""
    import gc
    import pagedrt

    env, options = split_setting(setting)
    kw.update(options)
    with environ(env):
        rt = pagedrt.Runtime(model, device="cuda", **kw)
        try:
            yield rt
        finally:
            rt.close()
            del rt
            gc.collect()


def tpot_env(model, settings):
    """Batch-1 TPOT under each setting (runtime_under), one Runtime each."""
    r = {}
    for setting in settings:
        key = setting or "default"
        with runtime_under(model, setting, max_num_seqs=8, kv_cache_bytes=4 << 30) as rt:
            tpot = batch1_latency(rt, np.random.default_rng(0))[1]
        r[key] = min(tpot, r.get(key, tpot))  # a setting listed twice keeps its better run
        print(f"{key}: TPOT {tpot:.3f} ms", flush=True)
    return r


def ttft_env(model, settings):
    """Batch-1 time to first token at 1,024, 4,096 and 8,000-token prompts under
    each setting (runtime_under), one Runtime each, 8,192 tokens a step."""
    r = {}
    for setting in settings:
        key = setting or "default"
        with runtime_under(model, setting, max_num_seqs=8, max_num_batched_tokens=8192,
                           kv_cache_bytes=4 << 30) as rt:
            rng = np.random.default_rng(0)
            both = {n: long_ttft_ms(rt, rng, n) for n in (1024, 4096, 8000)}
        r[key] = {n: t for n, (t, _) in both.items()}
        r[key + " forward"] = {n: f for n, (_, f) in both.items()}
        print(f"{key}: TTFT ms " + " / ".join(f"{n}: {t:.1f} (forward {f:.1f})" for n, (t, f) in both.items()),
              flush=True)
    return r


def batch_tpot(model, settings, batches=(1, 16, 64, 128, 256), sampled=False):
    """Decode TPOT at each batch size (B prompts of 128 tokens, 128 greedy new
    tokens each, eos ignored: issue 17's table), per setting (runtime_under), one
    Runtime each. TPOT: the median over the batch's requests of (last
    token's time - first token's time) / 127; the second of two rounds.
    Beside it ("steady"), the median over requests of the time a token once
    every request of the batch has its first one: from 128 sequences up the
    prompts (B x 128 tokens) take more than one 8,192-token step, and the
    requests served first decode beside the later prompts' prefill steps,
    which TPOT counts and a static batch (the torch.compile peer: every
    prefill, then every decode step) does not.
    sampled: temperature 0.8, top_p 0.95 instead of greedy."""
    import pagedrt

    r = {}
    params = pagedrt.SamplingParams(max_tokens=128, ignore_eos=True,
                                    **(dict(temperature=0.8, top_p=0.95) if sampled else dict(temperature=0.0)))
    for setting in settings:
        key = setting or "default"
        r[key] = {}
        with runtime_under(model, setting, max_num_seqs=max(batches), max_num_batched_tokens=8192,
                           kv_cache_bytes=16 << 30) as rt:
            rng = np.random.default_rng(0)
            for B in batches:
                for trial in range(2):  # the first makes the step shapes (and their recordings)
                    rids = [rt.submit(rng.integers(0, 128000, size=128).tolist(), params) for _ in range(B)]
                    first, tpot, pending = {}, [], set(rids)
                    arrivals = {rid: [] for rid in rids}  # (time, tokens) of each event with tokens
                    while pending:
                        for ev in rt.poll(list(pending), timeout=1.0):
                            now = time.perf_counter()
                            if ev.token_ids:
                                first.setdefault(ev.request_id, now)
                                arrivals[ev.request_id].append((now, len(ev.token_ids)))
                            if ev.request_finished:
                                pending.discard(ev.request_id)
                                tpot.append((now - first[ev.request_id]) / 127 * 1e3)
                    all_started = max(first.values())
                    steady = []
                    for got in arrivals.values():
                        after = [(t, n) for t, n in got if t > all_started]
                        if len(after) > 1:
                            steady.append((after[-1][0] - after[0][0]) / sum(n for _, n in after[1:]) * 1e3)
                r[key][B] = statistics.median(tpot)
                r[key][f"{B}_steady"] = statistics.median(steady) if steady else None
                print(f"{key}: batch {B:4d} TPOT {r[key][B]:.3f} ms"
                      + (f", steady {r[key][f'{B}_steady']:.3f} ms (once every request has its first token)"
                         if steady else ""), flush=True)
    return r


def new_shapes(model, settings):
    """What a step of a token count never seen before costs, per setting
    (runtime_under), one Runtime each: batch-1 prefills of 16 small counts
    (17 ... 272 tokens, the sizes of a serving run's mixed steps) and 16 large
    ones (1,000 ... 1,015), each a new GEMM shape, then the same counts again
    (shapes known); wall ms per request, means. Session 35 (H100, CUDA 13):
    cuBLASLt's heuristic asked per exact count cost 1-2 ms of host time per
    new shape, so a new count's step 3-11 ms where known counts take 2 on a
    SmolLM2-sized model; PAGEDRT_GEMM_BANDS=0 is that rule, the default asks
    once per band of counts, when the model loads, and runs each band's
    algorithm once there (gemm.hpp: session 36, a new count then costs
    nothing). Beside the wall time, each request's host ms in run_step (its
    kernels queued), from the PAGEDRT_GRAPH_LOG lines the backend writes to
    the process's stderr (captured in a file while the setting runs), and
    each setting's Runtime() time (what the picks and runs at load add; the
    first setting's also reads the checkpoint from a cold page cache)."""
    import re
    import tempfile

    import pagedrt

    r = {}
    params = pagedrt.SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    counts = {"small": [17 + 17 * i for i in range(16)], "large": list(range(1000, 1016))}  # 17 ... 272
    run_ms = re.compile(r"^pagedrt step: .* run ([0-9.]+) ms$", re.M)
    for setting in settings:
        key = setting or "default"
        r[key] = {}
        logged = f"PAGEDRT_GRAPH_LOG=1,{setting}" if setting else "PAGEDRT_GRAPH_LOG=1"
        t_load = time.perf_counter()
        with tempfile.TemporaryFile() as log, stderr_to(log), runtime_under(
                model, logged, max_num_seqs=8, max_num_batched_tokens=8192, kv_cache_bytes=2 << 30) as rt:
            r[key]["load_s"] = time.perf_counter() - t_load  # Runtime(): the band picks and runs at load among it
            print(f"{key}: Runtime() {r[key]['load_s']:.2f} s", flush=True)
            rng = np.random.default_rng(0)
            vocab = min(rt.model_info.vocab_size, 32000)
            rt.generate([rng.integers(3, vocab, size=512).tolist()], params)  # warm-up

            def request(n):  # (wall ms, run_step host ms) of one batch-1 prefill of n tokens
                prompt = rng.integers(3, vocab, size=n).tolist()
                start = log.seek(0, os.SEEK_END)
                t0 = time.perf_counter()
                rt.generate([prompt], params)
                wall = (time.perf_counter() - t0) * 1e3
                log.seek(start)
                return wall, sum(float(v) for v in run_ms.findall(log.read().decode(errors="replace")))

            for name, ns in counts.items():
                passes = [[request(n) for n in ns] for _ in range(2)]
                (new, new_run), (known, known_run) = [
                    (statistics.mean(w for w, _ in p), statistics.mean(h for _, h in p)) for p in passes]
                r[key][name] = {"counts": ns, "new_ms": new, "known_ms": known,
                                "new_max_ms": max(w for w, _ in passes[0]),
                                "new_run_step_ms": new_run, "known_run_step_ms": known_run}
                print(f"{key}: {name} counts {ns[0]}-{ns[-1]}, mean ms a request: new {new:.2f} "
                      f"(max {r[key][name]['new_max_ms']:.2f}), known {known:.2f} (+{new - known:.2f} a new count); "
                      f"host ms in run_step: new {new_run:.2f}, known {known_run:.2f}", flush=True)
    return r


@contextlib.contextmanager
def stderr_to(f):
    """File descriptor 2 (the C++ library's stderr) into the open file f while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def tokens_hash(outs):
    """sha256 of a run's generated tokens (equal-length outputs), to compare two runs bit for bit."""
    return hashlib.sha256(np.array([o.token_ids for o in outs], np.int32).tobytes()).hexdigest()


def pagedrt_bench(model):
    import pagedrt

    rng = np.random.default_rng(0)
    r = {}
    t0 = time.time()
    rt = pagedrt.Runtime(model, device="cuda", max_num_seqs=256, max_num_batched_tokens=8192)
    r["load_s"] = time.time() - t0
    r["kv_blocks"] = rt.stats().num_blocks
    params = pagedrt.SamplingParams(max_tokens=128, ignore_eos=True, temperature=0.0)  # greedy
    r["ttft_ms"], r["tpot_ms"] = batch1_latency(rt, rng)
    for n in (1024, 4096, 8000):
        r[f"ttft_{n}_ms"], r[f"ttft_{n}_forward_ms"] = long_ttft_ms(rt, rng, n)
    print("batch 1 TTFT ms by prompt length:", {n: round(r[f"ttft_{n}_ms"], 1) for n in (1024, 4096, 8000)}, flush=True)
    prompts = [rng.integers(0, 128000, size=512).tolist() for _ in range(256)]
    t0 = time.perf_counter()
    outs = rt.generate(prompts, params)
    wall = time.perf_counter() - t0
    # Greedy output of the whole run, to compare two builds bit for bit.
    r["tokens_sha256"] = tokens_hash(outs)
    r["throughput_tokens"] = sum(len(o.token_ids) for o in outs)
    r["throughput_s"] = wall
    r["throughput_tok_per_s"] = r["throughput_tokens"] / wall
    rt.close()
    return r


def throughput_env(model, settings, n=256, prompt=512, new=128):
    """n x (prompt in / new out) greedy output tok/s per setting (runtime_under:
    async_scheduling=off against the default, say), the better of two runs
    after a warm-up, one Runtime each, each run on prompts of its own (the
    same prompts again would be prefix-cache hits: no prefill); the greedy
    tokens' hash of the last run."""
    rng = np.random.default_rng(0)
    runs = [[rng.integers(0, 128000, size=prompt).tolist() for _ in range(n)] for _ in range(2)]
    r = {}
    for setting in settings:
        key = setting or "default"
        with runtime_under(model, setting, max_num_seqs=256, max_num_batched_tokens=8192) as rt:
            import pagedrt
            params = pagedrt.SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.0)
            warm = [rng.integers(0, 128000, size=prompt).tolist() for _ in range(8)]
            rt.generate(warm, pagedrt.SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
            best = None
            for prompts in runs:
                t0 = time.perf_counter()
                outs = rt.generate(prompts, params)
                tps = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
                best = max(best or 0.0, tps)
            st = rt.stats()
            r[key] = {"tok_per_s": best, "async_steps": st.async_steps, "num_steps": st.num_steps,
                      "tokens_sha256": tokens_hash(outs)}
        print(f"{key}: {n} x {prompt}/{new} {best:,.0f} output tok/s", r[key], flush=True)
    return r


def elastic_bench(model):
    """The elastic KV pool against one taken whole (RuntimeConfig::elastic_kv),
    8B shape, default pool (gpu_memory_utilization 0.9): start-up seconds,
    free GPU memory (cudaMemGetInfo through torch) after start-up, after 256 x
    (512 in / 128 out) greedy and after kv_idle_release_s (1 s) without work;
    the run's output tok/s and the mapped bytes; the greedy tokens' hash
    (the same in both: same block ids, same kernels)."""
    import gc

    import pagedrt
    import torch

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128000, size=512).tolist() for _ in range(256)]
    params = pagedrt.SamplingParams(max_tokens=128, ignore_eos=True, temperature=0.0)
    gib = lambda: torch.cuda.mem_get_info()[0] / 2**30  # noqa: E731
    r = {}
    for elastic in (False, True, False, True):
        key = "elastic" if elastic else "whole"
        t0 = time.perf_counter()
        rt = pagedrt.Runtime(model, device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
                             elastic_kv=elastic, kv_idle_release_s=1.0, progress=False)
        e = {"start_s": time.perf_counter() - t0, "free_gib_start": gib(),
             "mapped_gib_start": rt.stats().kv_mapped_bytes / 2**30, "pool_gib": rt.stats().kv_cache_bytes / 2**30}
        rt.generate(prompts[:8], pagedrt.SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))  # warm-up
        t0 = time.perf_counter()
        outs = rt.generate(prompts, params)
        wall = time.perf_counter() - t0
        e["tok_per_s"] = sum(len(o.token_ids) for o in outs) / wall
        e["free_gib_after_run"] = gib()
        e["mapped_gib_after_run"] = rt.stats().kv_mapped_bytes / 2**30
        time.sleep(1.6)
        e["free_gib_after_idle"] = gib()
        e["mapped_gib_after_idle"] = rt.stats().kv_mapped_bytes / 2**30
        e["tokens_sha256"] = tokens_hash(outs)
        rt.close()
        del rt
        gc.collect()
        if key not in r or e["tok_per_s"] > r[key]["tok_per_s"]:  # each twice: the better run
            r[key] = e
        print(key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in e.items()}, flush=True)
    return r


def preemption_bench(model):
    """Preemption on the GPU: 256 x (512 in / 384 out) greedy requests into an
    8 GiB pool (8B shape: ~65K token slots against the ~230K the batch would
    hold at once), under preemption_mode "recompute", "swap" and "auto": output
    tok/s, preemptions, blocks swapped each way and the seconds spent issuing
    swaps (stats()), and the greedy tokens' hash (the same in all three)."""
    import gc

    import pagedrt

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128000, size=512).tolist() for _ in range(256)]
    params = pagedrt.SamplingParams(max_tokens=384, ignore_eos=True, temperature=0.0)
    r = {}
    for mode in ("recompute", "swap", "auto"):
        rt = pagedrt.Runtime(model, device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
                             kv_cache_bytes=8 << 30, preemption_mode=mode, swap_space_bytes=16 << 30, progress=False)
        rt.generate(prompts[:4], pagedrt.SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))  # warm-up
        t0 = time.perf_counter()
        outs = rt.generate(prompts, params)
        wall = time.perf_counter() - t0
        s = rt.stats()
        r[mode] = {"tok_per_s": sum(len(o.token_ids) for o in outs) / wall, "seconds": wall,
                   "preemptions": s.num_preemptions, "swapped_out": s.num_swapped_out,
                   "swap_out_blocks": s.swap_out_blocks, "swap_in_blocks": s.swap_in_blocks,
                   "swap_seconds": s.swap_seconds, "block_bytes": s.kv_cache_bytes // s.num_blocks,
                   "tokens_sha256": tokens_hash(outs)}
        rt.close()
        del rt
        gc.collect()
        print(mode, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r[mode].items()}, flush=True)
    return r


def hf_bench(model):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(model)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    r = {"note": "random init on the GPU (same shapes and dtype; speed does not depend on values)"}

    def gen(batch, n_in, n_out):
        ids = torch.randint(0, 128000, (batch, n_in), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out, min_new_tokens=n_out,
                             do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == n_in + n_out
        return time.perf_counter() - t0

    gen(1, 16, 4)  # warm-up
    t1, t128 = gen(1, 128, 1), gen(1, 128, 128)
    r["tpot_ms"] = (t128 - t1) / 127 * 1e3
    for batch in (64, 256):
        try:
            s = gen(batch, 512, 128)
            r[f"throughput_b{batch}_tok_per_s"] = batch * 128 / s
        except torch.OutOfMemoryError:
            r[f"throughput_b{batch}_tok_per_s"] = None
            torch.cuda.empty_cache()
    return r


def verify_cost(model):
    """The cost of a speculative verify step at batch 1 (issue 23): one
    sequence with 1,024 tokens of context computes 1 + k positions (its last
    token and k proposals) in one step, k = 0..8, against a batch-1 decode
    step at the same context in the same run. The step is made as a prompt
    whose first 1,024 tokens are in the prefix cache and whose last 1 + k are
    new, max_tokens 1: the same kernels as a verify step (attention of 1 + k
    query rows over the cached context, every GEMM at M = 1 + k), but logits
    for the last row only (a verify step's lm head takes 1 + k rows: at most
    9 x 4096 more of one weight-bound GEMM). Wall time of generate() (submit
    to final event), the median of 7 after one warm-up; the decode step is
    the median inter-token time of 64 greedy tokens (CUDA-graph replays)."""
    import pagedrt
    rng = np.random.default_rng(3)
    ctx = 1024
    one = pagedrt.SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    res = {"context": ctx, "rows": []}
    with pagedrt.Runtime(model, device="cuda", max_num_seqs=8) as rt:
        base = rng.integers(0, 128000, size=ctx).tolist()
        rt.generate([base + [7]], one)  # base's 64 blocks enter the prefix cache
        rid = rt.submit(base + [9], max_tokens=65, ignore_eos=True, temperature=0.0)
        stamps, done = [], False
        while not done:
            for ev in rt.poll(rid, timeout=1.0):
                stamps += [time.perf_counter()] * len(ev.token_ids)
                done = ev.finished
        res["decode_step_ms"] = statistics.median(np.diff(stamps[1:]).tolist()) * 1e3
        print(f"batch-1 decode step at {ctx} tokens of context: {res['decode_step_ms']:.3f} ms", flush=True)
        print(f"{'k':>2s} {'positions':>9s} {'step ms':>8s} {'/ decode':>8s} {'/ k=0':>6s}", flush=True)
        for k in range(9):
            times = []
            for _ in range(8):
                tail = rng.integers(0, 128000, size=k + 1).tolist()
                t0 = time.perf_counter()
                rt.generate([base + tail], one)
                times.append((time.perf_counter() - t0) * 1e3)
            row = {"k": k, "positions": k + 1, "step_ms": statistics.median(times[1:])}
            row["vs_decode"] = row["step_ms"] / res["decode_step_ms"]
            row["vs_k0"] = row["step_ms"] / (res["rows"][0]["step_ms"] if res["rows"] else row["step_ms"])
            res["rows"].append(row)
            print(f"{k:2d} {k + 1:9d} {row['step_ms']:8.3f} {row['vs_decode']:8.2f} {row['vs_k0']:6.2f}", flush=True)
    return res


def main():
    part, out = sys.argv[1], sys.argv[2]
    fn = {"ceilings": ceilings, "attention": attention, "attention_sweep": attention_sweep, "gemv": gemv,
          "attention_fp8": attention_fp8, "attention_probe": attention_probe,
          "decode_splits": decode_splits, "decode_sweep": decode_sweep, "decode_grid": decode_grid, "decode_short": decode_short, "d64_sweep": d64_sweep, "sampling": sampling,
          "gemm": gemm, "gemm_odd": gemm_odd, "gemm_invariant": gemm_invariant, "gemm_fp8": gemm_fp8, "glu": glu,
          "fp8_decode_chain": fp8_decode_chain,
          "prefill": prefill, "prefill_deal": prefill_deal}.get(part)
    if fn:
        res = fn()
    elif part == "tpot_env":
        res = tpot_env(sys.argv[3], sys.argv[4:])
    elif part == "ttft_env":
        res = ttft_env(sys.argv[3], sys.argv[4:])
    elif part == "throughput":  # 256 x 512/128 under settings: "" async_scheduling=off
        res = throughput_env(sys.argv[3], sys.argv[4:])
    elif part == "throughput_long":  # 512 x 1024/1024 (issue 17's long workload) under settings
        res = throughput_env(sys.argv[3], sys.argv[4:], n=512, prompt=1024, new=1024)
    elif part == "batch_tpot":
        res = batch_tpot(sys.argv[3], sys.argv[4:])
    elif part == "batch_tpot_sampled":  # device sampling against the host's: "" PAGEDRT_CUDA_SAMPLE=0
        res = batch_tpot(sys.argv[3], sys.argv[4:], batches=(1, 64, 256), sampled=True)
    elif part == "new_shapes":
        res = new_shapes(sys.argv[3], sys.argv[4:])
    else:
        res = {"pagedrt": pagedrt_bench, "hf": hf_bench, "launch_ab": launch_ab,
               "verify": verify_cost, "elastic": elastic_bench, "preemption": preemption_bench}[part](sys.argv[3])
    json.dump(res, open(out, "w"), indent=1)
    print(part, json.dumps(res))


if __name__ == "__main__":
    main()
