#!/usr/bin/env python3
"""GPU benchmarks (PERFORMANCE.md), one part per call so that each runs in its own
process (pagedrt and transformers each hold a 16 GB model):

    bench_cuda.py ceilings  OUT.json            copy bandwidth, bf16 GEMM, cuBLAS at small M
    bench_cuda.py attention OUT.json            paged decode attention, batch 64 x 2048, vs SDPA
    bench_cuda.py gemv      OUT.json            own small-M GEMM vs cuBLASLt, n = 1..8, 8B shapes
    bench_cuda.py pagedrt   OUT.json MODEL_DIR  batch-1 TPOT (128/128), 256 x (512/128) throughput
    bench_cuda.py launch_ab OUT.json MODEL_DIR  batch-1 TPOT with CUDA graphs / PDL / fusions off and on
    bench_cuda.py hf        OUT.json MODEL_DIR  the same workloads with transformers (eager+SDPA)

GPU timings use CUDA events after warm-up, medians; inputs are random (never zeros).
"""
from __future__ import annotations

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


def attention():
    import torch
    import torch.nn.functional as F
    from pagedrt import _testing

    B, C, H, Hkv, D, bs = 64, 2048, 32, 8, 128, 16
    rng = np.random.default_rng(0)
    nb = B * C // bs
    perm = rng.permutation(nb).astype(np.int32)
    qkv = rng.standard_normal((B, (H + 2 * Hkv) * D), dtype=np.float32)
    kc = rng.standard_normal((nb, bs, Hkv, D), dtype=np.float32)
    vc = rng.standard_normal((nb, bs, Hkv, D), dtype=np.float32)
    pos = np.full(B, C - 1, np.int32)
    table = perm.reshape(B, C // bs)
    slots = (table[:, -1].astype(np.int64) * bs + (C - 1) % bs)
    kv_bytes = B * C * Hkv * D * 2 * 2

    def run(waves=None):
        """Median seconds per call, contexts split while fewer than `waves` blocks per SM (None: the default)."""
        if waves:
            os.environ["PAGEDRT_DECODE_SPLIT_WAVES"] = str(waves)  # read when the backend is made
        ops = _testing._Ops("cuda")
        os.environ.pop("PAGEDRT_DECODE_SPLIT_WAVES", None)
        ops.set_batch(np.zeros(B, np.int32), pos, slots, np.arange(B + 1, dtype=np.int32),
                      np.full(B, C, np.int32), np.arange(0, nb + 1, C // bs, dtype=np.int32),
                      perm, np.arange(B, dtype=np.int32))
        return statistics.median(ops.bench_paged_attention(qkv, kc, vc, H, Hkv, D, D ** -0.5, 50) for _ in range(5))

    sec = run()
    r = {"shape": f"batch {B} x context {C}, H {H}, Hkv {Hkv}, D {D}, block {bs}",
         "pagedrt_us": sec * 1e6, "pagedrt_TBps": kv_bytes / sec / 1e12,
         "split_waves_us": {w: run(w) * 1e6 for w in (2, 4, 8, 16, 32)}}
    print("decode attention us by split waves:", {w: round(v, 1) for w, v in r["split_waves_us"].items()}, flush=True)
    q = torch.from_numpy(qkv[:, :H * D]).to("cuda", torch.bfloat16).view(B, H, 1, D)
    K = torch.randn(B, Hkv, C, D, device="cuda", dtype=torch.bfloat16)
    V = torch.randn(B, Hkv, C, D, device="cuda", dtype=torch.bfloat16)
    ms = cuda_median_ms(lambda: F.scaled_dot_product_attention(q, K, V, enable_gqa=True), iters=50)
    r["sdpa_us"] = ms * 1e3
    r["sdpa_TBps"] = kv_bytes / ms / 1e9
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
            us = {impl: ops.time_linear(n, m, k, f32, 50, impl == "own") for impl in ("own", "cublas")}
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
    # One batch-1 decode step's GEMMs: 32 layers of qkv, o, gate_up, down, and the lm head.
    one = {row["shape"]: row for row in rows if row["n"] == 1}
    for impl in ("own", "cublas"):
        layer = sum(one[s][f"{impl}_us"] for s in ("qkv", "o_proj", "gate_up", "down"))
        r[f"decode_gemm_ms_{impl}"] = (32 * layer + one["lm_head"][f"{impl}_us"]) / 1e3
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


def launch_ab(model):
    """Batch-1 TPOT with CUDA graphs, programmatic dependent launch and the
    fused kernels (RoPE in decode attention, SiLU·mul in the gate/up GEMV) off
    and on (PAGEDRT_CUDA_GRAPHS, PAGEDRT_CUDA_PDL, PAGEDRT_CUDA_FUSE), one
    Runtime per setting, same run; the last two settings twice, interleaved."""
    import gc
    import pagedrt

    r = {}
    settings = (("0", "0", "0"), ("1", "0", "0"), ("1", "1", "0"), ("1", "1", "1"), ("1", "1", "0"), ("1", "1", "1"))
    for graphs, pdl, fuse in settings:
        env = {"PAGEDRT_CUDA_GRAPHS": graphs, "PAGEDRT_CUDA_PDL": pdl, "PAGEDRT_CUDA_FUSE": fuse}
        os.environ.update(env)
        rt = pagedrt.Runtime(model, device="cuda", max_num_seqs=8, kv_cache_bytes=4 << 30)
        key = f"tpot_ms_graphs{graphs}_pdl{pdl}_fuse{fuse}"
        _, tpot = batch1_latency(rt, np.random.default_rng(0))
        r[key] = min(tpot, r.get(key, tpot))
        rt.close()
        del rt
        gc.collect()
        for k in env:
            del os.environ[k]
        print(f"graphs {graphs} pdl {pdl} fuse {fuse}: TPOT {tpot:.3f} ms", flush=True)
    return r


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
    prompts = [rng.integers(0, 128000, size=512).tolist() for _ in range(256)]
    t0 = time.perf_counter()
    outs = rt.generate(prompts, params)
    wall = time.perf_counter() - t0
    # Greedy output of the whole run, to compare two builds bit for bit.
    r["tokens_sha256"] = hashlib.sha256(np.array([o.token_ids for o in outs], np.int32).tobytes()).hexdigest()
    r["throughput_tokens"] = sum(len(o.token_ids) for o in outs)
    r["throughput_s"] = wall
    r["throughput_tok_per_s"] = r["throughput_tokens"] / wall
    rt.close()
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


def main():
    part, out = sys.argv[1], sys.argv[2]
    fn = {"ceilings": ceilings, "attention": attention, "gemv": gemv}.get(part)
    res = fn() if fn else {"pagedrt": pagedrt_bench, "hf": hf_bench, "launch_ab": launch_ab}[part](sys.argv[3])
    json.dump(res, open(out, "w"), indent=1)
    print(part, json.dumps(res))


if __name__ == "__main__":
    main()
