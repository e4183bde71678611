#!/usr/bin/env python3
"""pagedrt against its peers on the CPU: every workload, one command, the same prompts.

    python tools/bench.py --json bench.json --plot bench.png       # all workloads, every peer installed
    python tools/bench.py --workloads latency,batched --peers llama.cpp --gguf-types f16
    python tools/bench.py --workloads latency,batched --throughput-runs 3   # batched: median of 3 runs
    python tools/bench.py --workloads latency --peers llama.cpp --rounds 5  # a noisy VM: engines alternating
    python tools/bench.py --workloads sharing,prefix --set prefix.requests=32
    python tools/bench.py --workloads mixed --peers "" --dtypes bfloat16 --kv-cache-mib 48 --kv-watermark 0,0.01
                                      # a tight KV pool: admission's watermark against none
    python tools/bench.py --tiny --json out.json                    # CI: tiny random model, pagedrt only
    python tools/bench.py --device cuda --model DIR --size paper --workloads latency,batched
                                      # a GPU: pagedrt CUDA (bf16) vs transformers bf16, same card

Workloads (defined in tools/workloads.py with fixed seeds; sizes from --size,
default "cpu": SmolLM2-135M on 2 cores, about 9 minutes with every peer):
latency, batched, mixed, sharing (n = 4, beam 4 against n = 1), prefix (cache
on/off), waste (at the peak of mixed). pagedrt runs each --dtypes (sharing,
prefix and waste with the first only: they depend on the KV cache, not the
weights); peers run when installed: llama.cpp (latency through the high-level
API, batched and mixed through the batch API), CTranslate2 and transformers
(latency, batched). Each engine runs in its own process so that its peak RSS
is its own. Results: one table per workload, a JSON file, a PNG. Details and
measured figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kv  # noqa: E402
import hf_cache  # noqa: E402
import workloads  # noqa: E402

import pagedrt  # noqa: E402

HEAD = 16  # greedy tokens per sequence compared across engines (batched, first two prompts)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Meter:
    """Peak RSS of this process since reset() (VmHWM, reset through /proc/self/clear_refs)."""

    def reset(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # then the peak is since the process started

    def peak(self):
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0)


def latency_row(engine, meter, samples, prompt_len, new):
    """samples: (seconds to first token, seconds from first to last token) per timed run."""
    ttft = statistics.median(s[0] for s in samples)
    decode = statistics.median((new - 1) / s[1] for s in samples)
    return dict(engine=engine, workload="latency", variant=None, output_tok_s=decode, decode_tok_s=decode,
                prefill_tok_s=prompt_len / ttft, ttft_ms=ttft * 1e3, peak_rss_mb=meter.peak())


def batched_row(engine, workload, meter, outputs, secs, **extra):
    n = sum(len(o) for o in outputs)
    return dict(engine=engine, workload=workload, variant=None, output_tok_s=n / secs, seconds=secs,
                output_tokens=n, peak_rss_mb=meter.peak(), head=[list(o[:HEAD]) for o in outputs[:2]], **extra)


def median_run(a, once):
    """once() -> (outputs, seconds, ...); runs it --throughput-runs times. Returns
    the median run's tuple and every run's seconds."""
    runs = [once() for _ in range(a.throughput_runs)]
    secs = [r[1] for r in runs]
    return sorted(runs, key=lambda r: r[1])[len(runs) // 2], secs


# ---- pagedrt ---------------------------------------------------------------------------
def pagedrt_latency_batched(model, dtype, W, a, meter, engine):
    """Both on one Runtime with the default configuration (its load time is the user's)."""
    rows = []
    meter.reset()
    t0 = time.perf_counter()
    gpu = dict(max_num_seqs=256, max_num_batched_tokens=8192) if a.device == "cuda" else {}
    # No prefix cache: the latency runs repeat one prompt, the batched runs one
    # prompt set, and the peers compute every prompt anew.
    with pagedrt.Runtime(model, device=a.device, dtype=dtype, num_threads=a.threads, enable_prefix_caching=False,
                         kv_cache_dtype=a.kv_cache_dtype, quantization=a.quantization, **gpu) as rt:
        load = time.perf_counter() - t0
        if "latency" in W:
            (prompt,), (new,) = W["latency"]
            samples = []
            for r in range(a.runs + 1):
                start = time.monotonic()  # events carry the engine's time on this clock
                rid = rt.submit(prompt, max_tokens=new, ignore_eos=True, temperature=0)
                first, done, end = None, False, None
                while not done:
                    for ev in rt.poll(rid, timeout=1.0):
                        first = first or (ev.time if ev.token_ids else None)
                        done, end = ev.request_finished, ev.time
                if r == 0:
                    load_to_first = load + first - start
                else:
                    samples.append((first - start, end - first))
                log(f"  {engine} latency run {r}: decode {(new - 1) / (end - first):.1f} tok/s")
            rows.append(latency_row(engine, meter, samples, len(prompt), new))
            rows[-1].update(bench_kv.kv_fields(rt.stats()), load_to_first_token_s=load_to_first)
        if "batched" in W:
            prompts, news = W["batched"]
            meter.reset()

            def once():
                t0 = time.perf_counter()
                outs = rt.generate(prompts, max_tokens=news[0], ignore_eos=True, temperature=0)
                return [o.outputs[0].token_ids for o in outs], time.perf_counter() - t0
            (outs, secs), runs = median_run(a, once)
            rows.append(batched_row(engine, "batched", meter, outs, secs, runs_s=runs, **bench_kv.kv_fields(rt.stats())))
            log(f"  {engine} batched: {rows[-1]['output_tok_s']:.1f} tok/s (runs: {', '.join(f'{x:.2f}' for x in runs)} s)")
        for r in rows:
            r.update(gpu_memory(a))
    return rows


def pagedrt_job(model, dtype, W, a, meter):
    engine, rows = f"pagedrt {dtype}" + (" fp8-weights" if a.quantization == "fp8" else "") + \
        (" fp8-kv" if a.kv_cache_dtype == "fp8" else ""), []
    if "latency" in W or "batched" in W:
        rows += pagedrt_latency_batched(model, dtype, W, a, meter, engine)
    if "mixed" in W or "waste" in W:
        rows += bench_kv.mixed(model, dtype, *W.get("mixed", W.get("waste")), a, meter, engine, "waste" in W)
    if "sharing" in W:
        rows += bench_kv.sharing(model, dtype, *W["sharing"], a, meter, engine)
    if "prefix" in W:
        rows += bench_kv.prefix(model, dtype, *W["prefix"], a, meter, engine)
    if a.device == "cpu":  # calibrated at the first Runtime of this process (backend/cpu/gemm.hpp)
        print(f"  {engine}: CPU GEMM {pagedrt._core.cpu_gemm_info()}", flush=True)
    return rows


def gpu_memory(a):
    """On the GPU: device memory this process holds now (the engine loaded), MB."""
    if a.device != "cuda":
        return {}
    import torch
    free, total = torch.cuda.mem_get_info()
    return {"gpu_mem_mb": (total - free) / 2**20}


# ---- peers -----------------------------------------------------------------------------
def transformers_job(model, _, W, a, meter):
    import torch
    import transformers
    torch.set_num_threads(a.threads)
    meter.reset()
    cuda = a.device == "cuda"  # bf16 on the card (eager + SDPA), else fp32 on the CPU
    dt = torch.bfloat16 if cuda else torch.float32
    m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dt).eval().to(a.device)
    engine, rows = f"transformers {'bfloat16' if cuda else 'float32'}", []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cache_arg = hf_cache.cache_arg(m)  # `cache` or `past_key_values`, as the installed transformers names it
    with torch.inference_mode():
        if "latency" in W:
            (prompt,), (new,) = W["latency"]
            samples = []
            for r in range(a.runs + 1):
                start = time.perf_counter()
                res = m(torch.tensor([prompt], device=a.device), use_cache=True)
                past, tok = getattr(res, cache_arg), res.logits[0, -1].argmax()
                sync()
                first = time.perf_counter()
                for _ in range(new - 1):
                    res = m(tok.view(1, 1), **{cache_arg: past}, use_cache=True)
                    past, tok = getattr(res, cache_arg), res.logits[0, -1].argmax()
                sync()
                samples += [(first - start, time.perf_counter() - first)] if r else []
                log(f"  transformers latency run {r}: decode {(new - 1) / (time.perf_counter() - first):.1f} tok/s")
            rows.append(latency_row(engine, meter, samples, len(prompt), new))
        if "batched" in W:  # left-padded greedy generate over all prompts at once
            prompts, news = W["batched"]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=a.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=a.device)
            meter.reset()

            def once():
                t0 = time.perf_counter()
                out = m.generate(ids, attention_mask=mask, max_new_tokens=news[0], min_new_tokens=news[0],
                                 do_sample=False, pad_token_id=0)
                sync()
                return out[:, width:].tolist(), time.perf_counter() - t0
            (outs, secs), runs = median_run(a, once)
            rows.append(batched_row(engine, "batched", meter, outs, secs, runs_s=runs))
            log(f"  transformers batched: {rows[-1]['output_tok_s']:.1f} tok/s")
    for r in rows:
        r["version"] = transformers.__version__
        r.update(gpu_memory(a))
    return rows


def ctranslate2_job(model, _, W, a, meter):
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ct2"
        TransformersConverter(str(model)).convert(str(out), quantization="float32")
        vocab = json.loads((out / "vocabulary.json").read_text())  # CTranslate2 takes token strings
        to_str = lambda ids: [vocab[i] for i in ids]
        for ctype in ("float32", "int8"):
            engine = f"ctranslate2 {ctype}"
            meter.reset()
            gen = ctranslate2.Generator(str(out), device="cpu", compute_type=ctype, intra_threads=a.threads)
            if "latency" in W:
                (prompt,), (new,) = W["latency"]
                samples = []
                for r in range(a.runs + 1):
                    t0 = time.perf_counter()
                    gen.generate_batch([to_str(prompt)], max_length=1, include_prompt_in_result=False, sampling_topk=1)
                    ttft = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    gen.generate_batch([to_str(prompt)], max_length=new, min_length=new,
                                       include_prompt_in_result=False, sampling_topk=1)
                    samples += [(ttft, max(time.perf_counter() - t0 - ttft, 1e-9))] if r else []
                rows.append(latency_row(engine, meter, samples, len(prompt), new))
                log(f"  {engine} latency: decode {rows[-1]['decode_tok_s']:.1f} tok/s")
            if "batched" in W:
                prompts, news = W["batched"]
                meter.reset()

                def once():
                    t0 = time.perf_counter()
                    res = gen.generate_batch([to_str(p) for p in prompts], max_length=news[0], min_length=news[0],
                                             include_prompt_in_result=False, sampling_topk=1,
                                             max_batch_size=len(prompts))
                    return [r.sequences_ids[0] for r in res], time.perf_counter() - t0
                (outs, secs), runs = median_run(a, once)
                rows.append(batched_row(engine, "batched", meter, outs, secs, runs_s=runs))
                log(f"  {engine} batched: {rows[-1]['output_tok_s']:.1f} tok/s")
            del gen
    for r in rows:
        r["version"] = ctranslate2.__version__
    return rows


def llamacpp_batched(gguf, prompts, news, a, layout, label):
    """Greedy continuous batching through llama.cpp's batch API: every prompt in
    its own sequence (seq_id = its index) is prefilled n_batch tokens per
    llama_decode, logits kept only for each prompt's last token; then each
    llama_decode takes one token per live sequence, until each sequence has
    generated exactly its max new tokens (eos ignored); a finished sequence's
    cells are freed. layout "split": a KV stream per sequence, each of the
    longest sequence's length (llama.cpp's default, kv_unified = false);
    "unified": one buffer of n_ctx = the sum of the sequences' lengths.
    Returns (outputs, seconds, n_ctx, peak cells in use)."""
    import llama_cpp as L
    import numpy as np
    n, lens = len(prompts), [len(p) + k for p, k in zip(prompts, news)]
    model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cp = L.llama_context_default_params()
    cp.n_ctx = sum(lens) if layout == "unified" else n * max(lens)
    cp.kv_unified, cp.n_seq_max = layout == "unified", n
    cp.n_batch = max(n, min(2048, sum(len(p) for p in prompts)))
    cp.n_ubatch = min(cp.n_batch, 512)
    cp.n_threads = cp.n_threads_batch = a.threads
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        L.llama_model_free(model)
        raise RuntimeError(f"llama.cpp could not make a context for {n} sequences, n_ctx {cp.n_ctx}")
    mem, n_ctx = L.llama_get_memory(ctx), L.llama_n_ctx(ctx)
    batch = L.llama_batch_init(cp.n_batch, 0, 1)
    argmax = lambda i: int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    def decode(items):  # items: (seq, pos, token, want logits)
        for i, (s, pos, t, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, want
            batch.seq_id[i][0] = s
        batch.n_tokens = len(items)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for i, (s, _, _, want) in enumerate(items):
            if want:
                out[s].append(argmax(i))

    out, peak_used, tick = [[] for _ in range(n)], 0, time.perf_counter()
    try:
        t0 = time.perf_counter()
        flat = [(s, pos, t, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        for c in range(0, len(flat), cp.n_batch):
            decode(flat[c:c + cp.n_batch])
        live = [s for s in range(n) if len(out[s]) < news[s]]
        while live:
            decode([(s, len(prompts[s]) + len(out[s]) - 1, out[s][-1], True) for s in live])
            peak_used = max(peak_used, sum(len(prompts[s]) + len(out[s]) - 1 for s in live))
            for s in live:
                if len(out[s]) == news[s]:
                    L.llama_memory_seq_rm(mem, s, -1, -1)
            live = [s for s in live if len(out[s]) < news[s]]
            if time.perf_counter() - tick > 1:
                tick = time.perf_counter()
                bench_kv.progress(f"  {label}: {n - len(live)}/{n} sequences done, {len(live)} live, "
                                  f"{tick - t0:.0f} s")
        secs = time.perf_counter() - t0
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    bench_kv.progress(f"  {label}: {sum(news)} tokens in {secs:.1f} s", end=True)
    return out, secs, n_ctx, peak_used


_quiet = None
# split reads every stream up to the longest sequence at each decode step, unified attends over
# every prompt at prefill: on 2 cores split was 2x faster on batched, unified 1.4x on mixed
AUTO_KV = {"batched": "split", "mixed": "unified"}


def llamacpp_job(model, gguf_type, W, a, meter):
    import llama_cpp
    from llama_cpp import Llama
    global _quiet
    _quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_quiet, None)
    gguf, engine, rows = gguf_path(gguf_type), f"llama.cpp {gguf_type.upper()}", []
    load = lambda: Llama(model_path=str(gguf), n_threads=a.threads, n_ctx=2048, verbose=False)
    if "latency" in W:
        (prompt,), (new,) = W["latency"]
        meter.reset()
        llm = load()
        samples = []
        for r in range(a.runs + 1):
            llm.reset()  # else generate() reuses the previous run's prompt from its KV cache
            start, first, n = time.perf_counter(), None, 0
            for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                n += 1
                first = first or time.perf_counter()
                if n == new:
                    break
            samples += [(first - start, time.perf_counter() - first)] if r else []
            log(f"  {engine} latency run {r}: decode {(n - 1) / (time.perf_counter() - first):.1f} tok/s")
        rows.append(latency_row(engine, meter, samples, len(prompt), new))
        del llm  # (a second mapping of the weights would count twice in the next runs' RSS)
    for wl in [w for w in ("batched", "mixed") if w in W or (w == "mixed" and "waste" in W)]:
        prompts, news = W.get(wl) or W["waste"]
        for layout in a.llamacpp_kv.split(",") if a.llamacpp_kv != "auto" else [AUTO_KV[wl]]:
            meter.reset()
            if wl == "batched":  # --throughput-runs runs, the median's row
                (outs, secs, n_ctx, used), runs = median_run(
                    a, lambda: llamacpp_batched(gguf, prompts, news, a, layout, f"{engine} {wl}"))
                extra = dict(runs_s=runs)
            else:
                outs, secs, n_ctx, used = llamacpp_batched(gguf, prompts, news, a, layout, f"{engine} {wl}")
                extra = {}
            row = batched_row(engine, wl, meter, outs, secs, kv_slots_reserved=n_ctx, waste_at_peak=1 - used / n_ctx,
                              **extra)
            row["variant"] = f"{layout} KV, n_ctx {n_ctx}"
            rows.append(row)
            log(f"  {engine} {wl} ({row['variant']}): {row['output_tok_s']:.1f} tok/s")
            if wl == "mixed" and "waste" in W:
                rows.append(dict(engine=engine, workload="waste", variant=f"n_ctx reserved ({row['variant']})",
                                 waste_at_peak=row["waste_at_peak"], kv_slots_reserved=n_ctx,
                                 peak_rss_mb=row["peak_rss_mb"]))
            if wl == "batched":  # the batch API's greedy tokens against the high-level API's
                llm = load()
                ref = [next_tokens(llm, p, len(h)) for p, h in zip(prompts, row["head"])]
                del llm
                row["matches_high_level"] = ref == row["head"]
                if ref != row["head"]:
                    log(f"  WARNING {engine}: batch API greedy tokens {row['head']} != high-level API's {ref}")
    for r in rows:
        r["version"] = llama_cpp.__version__
    return rows


def next_tokens(llm, prompt, k):
    """The high-level API's first k greedy tokens."""
    out = []
    llm.reset()
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(t)
        if len(out) == k:
            break
    return out


def gguf_path(gguf_type):
    """The shipped Q4_1 GGUF, or its re-encoding (tools/make_gguf.py), made once."""
    from pagedrt.models import _default_gguf, cache_root
    if gguf_type == "q4_1":
        return _default_gguf()
    path = cache_root().parent / "gguf" / f"SmolLM2-135M-Instruct-{gguf_type}.gguf"
    if not path.is_file():
        import make_gguf
        path.parent.mkdir(parents=True, exist_ok=True)
        make_gguf.main(["--type", gguf_type, "--out", str(path)])
    return path


JOBS = {"pagedrt": pagedrt_job, "transformers": transformers_job, "ctranslate2": ctranslate2_job,
        "llama.cpp": llamacpp_job}
PEERS = {"transformers": ("transformers", ("latency", "batched")),      # peer: (module, its workloads)
         "ctranslate2": ("ctranslate2", ("latency", "batched")),
         "llama.cpp": ("llama_cpp", ("latency", "batched", "mixed", "waste"))}


# ---- report ----------------------------------------------------------------------------
BASE = {"engine": str, "workload": str, "variant": (str, type(None)), "peak_rss_mb": float}
SCHEMA = {"latency": {"output_tok_s": float, "decode_tok_s": float, "prefill_tok_s": float, "ttft_ms": float},
          "batched": {"output_tok_s": float, "seconds": float, "output_tokens": int},
          "mixed": {"output_tok_s": float, "seconds": float, "output_tokens": int},
          "sharing": {"output_tok_s": float, "kv_blocks_peak": int, "kv_blocks_logical_peak": int,
                      "saving": float, "vs_n1": float},
          "prefix": {"output_tok_s": float, "seconds": float, "hit_rate": float, "prompt_tokens_computed": int},
          "waste": {"waste_at_peak": float}}
MEMORY = {"kv_blocks_peak": int, "kv_slots_reserved": int, "waste_at_peak": float}  # every pagedrt run

RSS = ("peak RSS MB", "peak_rss_mb", "f0")
COLUMNS = {  # workload: (header, key, format) after engine [and variant]
    "latency": [("decode tok/s", "decode_tok_s", "f1"), ("{first} ×", "first_x", "x"), ("of floor", "of_floor", "pct"),
                ("prefill tok/s", "prefill_tok_s", "f1"), ("TTFT ms", "ttft_ms", "f1"), RSS],
    "batched": [("output tok/s", "output_tok_s", "f1"), ("{first} ×", "first_x", "x"), ("seconds", "seconds", "f1"),
                ("KV slots", "kv_slots_reserved", "int"), ("waste", "waste_at_peak", "pct"), RSS,
                ("greedy = {ref}", "greedy_match", "str"), ("= high-level API", "matches_high_level", "str")],
    "mixed": [("output tok/s", "output_tok_s", "f1"), ("{first} ×", "first_x", "x"), ("seconds", "seconds", "f1"),
              ("KV slots", "kv_slots_reserved", "int"), ("waste", "waste_at_peak", "pct"),
              ("preemptions", "preemptions", "int"), RSS],
    "sharing": [("peak blocks", "kv_blocks_peak", "int"), ("w/o sharing", "kv_blocks_logical_peak", "int"),
                ("saved", "saving", "pct"), ("vs n=1", "vs_n1", "x"), ("copies", "copies", "int"),
                ("output tok/s", "output_tok_s", "f1"), RSS],
    "prefix": [("hit rate", "hit_rate", "pct"), ("prompt tok computed", "prompt_tokens_computed", "int"),
               ("seconds", "seconds", "f1"), ("output tok/s", "output_tok_s", "f1"), RSS],
    "waste": [("waste at peak", "waste_at_peak", "pct"), ("KV slots", "kv_slots_reserved", "int")],
}


TITLES = {
    "latency": "batch 1, {prompt_len}-token prompt, {new} new, greedy, eos ignored, median of {runs}",
    "batched": "{count} prompts of {lo}-{hi} tokens, {new} new each, all at once",
    "mixed": "{count} requests, input median {in_median} (max {in_max}), output median {out_median} "
             "(max {out_max}), all at once",
    "sharing": "{prompts} prompts of {prompt_len} tokens, {new} new per sequence",
    "prefix": "{requests} requests: one {prefix_len}-token system prompt + {suffix_len} own tokens, {new} new each",
    "waste": "1 - token slots in use / slots allocated, at the peak of the mixed workload",
}


FORMATS = {"f1": "{:,.1f}", "f0": "{:,.0f}", "int": "{:,}", "pct": "{:.1%}", "x": "{:.2f}x", "str": "{}"}


def fmt(v, kind):
    return "-" if v is None else FORMATS[kind].format(v)


def print_tables(rows, size, runs, ref, throughput_runs=1, first=""):
    """One table per workload; columns from COLUMNS."""
    for wl, cols in COLUMNS.items():
        rs = [r for r in rows if r["workload"] == wl]
        if not rs:
            continue
        cols = [c for c in cols if any(r.get(c[1]) is not None for r in rs)]  # none of these engines has it
        var = any(r.get("variant") for r in rs)
        head = ["engine"] + ["variant"] * var + [h.format(ref=ref, first=first) for h, _, _ in cols]
        body = [[r["engine"]] + [r.get("variant") or ""] * var + [fmt(r.get(k), f) for _, k, f in cols] for r in rs]
        widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
        median = f", median of {throughput_runs} runs" if wl == "batched" and throughput_runs > 1 else ""
        print(f"\n{wl}: " + TITLES[wl].format(runs=runs, **size["mixed" if wl == "waste" else wl]) + median)
        for line in [head] + body:
            print("  " + "  ".join(c.ljust(w) if i <= var else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(line, widths))))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(wl, key, t) for wl, key, t in [
        ("latency", "decode_tok_s", "batch-1 decode tok/s"), ("batched", "output_tok_s", "batched output tok/s"),
        ("mixed", "output_tok_s", "mixed output tok/s"), ("sharing", "kv_blocks_peak", "sharing: peak KV blocks"),
        ("prefix", "output_tok_s", "shared prefix: output tok/s"), ("waste", "waste_at_peak", "waste at peak")]
        if any(r["workload"] == wl for r in rows)]
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4.5 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (wl, key, t) in zip(axes.flat, panels):
        rs = [r for r in rows if r["workload"] == wl]
        ax.barh([r["engine"] + (f"\n{r['variant']}" if r.get("variant") else "") for r in rs],
                [r.get(key) or 0 for r in rs],
                color=["tab:blue" if r["engine"].startswith("pagedrt") else "tab:gray" for r in rs])
        ax.set_title(t)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def check_schema(rows, selected):
    for wl in selected:
        assert any(r["workload"] == wl for r in rows), f"no row for workload {wl}"
    for r in rows:
        spec = {**BASE, **SCHEMA[r["workload"]]}
        if r["engine"].startswith("pagedrt") and r["workload"] != "waste":
            spec.update(MEMORY)
        for k, t in spec.items():
            assert k in r and isinstance(r[k], t), (k, r)


RATIO_KEYS = {"latency": "decode_tok_s", "batched": "output_tok_s", "mixed": "output_tok_s"}


def add_ratios(rows):
    """first_x: the first engine's (pagedrt's first dtype) tok/s over each row's,
    per workload (decode tok/s for latency). Returns that engine's name."""
    first = ""
    for wl, key in RATIO_KEYS.items():
        rs = [r for r in rows if r["workload"] == wl and r.get(key)]
        if rs:
            first = rs[0]["engine"]
            for r in rs:
                r["first_x"] = rs[0][key] / r[key]
    return first


def weight_params(model: Path) -> int:
    """Parameters a decode token reads, from the safetensors' headers: every
    tensor's but the embedding table's where the model has an lm_head of its
    own (a token reads one row of the table; a tied table is the lm head)."""
    shapes = {}
    for f in model.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        shapes.update((k, t["shape"]) for k, t in header.items() if k != "__metadata__")
    if "lm_head.weight" in shapes:
        shapes.pop("model.embed_tokens.weight", None)
    return sum(math.prod(shape) for shape in shapes.values())


# Bytes a weight takes in an engine row's format (the name of its variant).
BYTES_PER_WEIGHT = [("float32", 4.0), ("F32", 4.0), ("bfloat16", 2.0), ("BF16", 2.0), ("float16", 2.0), ("F16", 2.0),
                    ("Q8_0", 34 / 32), ("int8", 1.0)]


def bytes_per_weight(engine):
    """Bytes a weight takes in an engine row's or job's format, or None (fp8
    projections beside bf16 embeddings: a mix this table does not know)."""
    if "fp8" in engine.lower():
        return None
    return next((b for name, b in BYTES_PER_WEIGHT if name.lower() in engine.lower()), None)


def weight_bytes(params, engines):
    """The distinct sizes of the weights in the engines' formats: the working
    sets to measure the read bandwidth at."""
    return sorted({int(params * b) for b in map(bytes_per_weight, engines) if b})


def add_floors(rows, params, ceilings):
    """Each batch-1 decode rate as a fraction of its bandwidth floor: the
    tokens a second if every token read the weights once (params x bytes per
    weight of the row's format) at the read bandwidth measured in this run,
    with this run's threads (cpu_ceilings.floor_GBps: where the weights fit
    the last-level cache, decode reads them from there). None where the
    format or the ceiling is unknown."""
    from cpu_ceilings import floor_GBps
    for r in rows:
        bpw = bytes_per_weight(r["engine"])
        bw = floor_GBps(ceilings, params * bpw) if bpw else None
        if r["workload"] != "latency" or not bw:
            continue
        r["floor_tok_s"] = bw * 1e9 / (params * bpw)
        r["of_floor"] = r["decode_tok_s"] / r["floor_tok_s"]


def greedy_matches(rows):
    """Batched rows: how many of the first HEAD greedy tokens (first two prompts)
    equal the reference engine's (pagedrt float32 if it ran)."""
    bat = [r for r in rows if r["workload"] == "batched" and r.get("head")]
    ref = next((r for r in bat if r["engine"] == "pagedrt float32"), bat[0] if bat else None)
    for r in bat:
        same = min(next((i for i, (x, y) in enumerate(zip(h, g)) if x != y), min(len(h), len(g)))
                   for h, g in zip(r["head"], ref["head"]))
        r["greedy_match"] = f"{same}/{min(len(h) for h in ref['head'])}"
    return ref["engine"] if ref else ""


# ---- driver ----------------------------------------------------------------------------
def plan(a, selected):
    """(engine, option, workloads) per process to start."""
    jobs = []
    for i, dtype in enumerate(filter(None, a.dtypes.split(","))):
        wl = [w for w in selected if w in ("latency", "batched", "mixed") or (i == 0 and w in bench_kv.KV)]
        jobs += [("pagedrt", dtype, wl)] if wl else []
    for name in filter(None, a.peers.split(",")):
        if name not in PEERS:
            raise SystemExit(f"unknown peer {name!r}; have {','.join(PEERS)}")
        if a.device == "cuda" and name != "transformers":
            log(f"skipping {name} on --device cuda: a CPU engine")
            continue
        module, supported = PEERS[name]
        wl = [w for w in selected if w in supported]
        if not wl:
            continue
        if not importlib.util.find_spec(module):
            log(f"skipping {name}: not installed (pip install {module.replace('_', '-')})")
        elif name == "llama.cpp" and a.model is not None:
            log("skipping llama.cpp: its GGUF files are the default model's")
        else:
            jobs += [(name, t, wl) for t in (a.gguf_types.split(",") if name == "llama.cpp" else [""])]
    return jobs


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--workloads", default=",".join(workloads.NAMES), help="comma list (default: all)")
    p.add_argument("--size", default="cpu", choices=sorted(workloads.SIZES), help="request counts and lengths")
    p.add_argument("--set", action="append", default=[], metavar="WL.KEY=N",
                   help="override one size, e.g. --set mixed.count=100 (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: pagedrt's CUDA backend against transformers (bf16) on the same card; "
                        "other peers are CPU engines and are skipped")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="timed latency runs (after one warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="every engine this many times, alternating, the probe again before each round; the "
                        "tables give each figure's median over the rounds, a ratio or fraction of the floor "
                        "the median of each round's own (for VMs whose bandwidth drifts between engines)")
    p.add_argument("--throughput-runs", type=int, default=1,
                   help="runs of the batched workload per engine; the median's row (runs_s in the JSON has all)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="pagedrt weight dtypes")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="pagedrt's KV cache element type (latency and batched workloads)")
    p.add_argument("--quantization", default="", choices=["", "fp8"],
                   help="pagedrt's weight quantization at load (latency and batched workloads)")
    p.add_argument("--peers", default="llama.cpp,ctranslate2,transformers")
    p.add_argument("--gguf-types", default="q4_1,f16,bf16", help="llama.cpp weights to run")
    p.add_argument("--llamacpp-kv", default="auto", help="llama.cpp KV layout for batched/mixed: split (a "
                   "stream per sequence, llama.cpp's default), unified (n_ctx = sum of lengths), split,unified "
                   "(both), auto (the faster one here: split for batched, unified for mixed)")
    p.add_argument("--kv-cache-mib", type=int, default=2048, help="pagedrt's KV pool for mixed/sharing/prefix")
    p.add_argument("--max-num-seqs", type=int, default=256, help="pagedrt's for mixed/sharing/prefix")
    p.add_argument("--kv-watermark", default=None, metavar="W[,W...]",
                   help="pagedrt's kv_watermark for mixed/sharing/prefix (default: the engine's); a comma list "
                        "runs mixed once per value, in one process (sharing, prefix and waste take the first)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model, tiny sizes, pagedrt only (CI)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG path")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def worker(a):
    engine, _, opt = a.worker.partition(":")
    model = pagedrt.resolve_model(a.model)
    has_tok = any((model / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    tok = pagedrt.Tokenizer.from_model_dir(model) if has_tok else None  # None: random-id prompts
    vocab = tok.vocab_size if tok else json.loads((model / "config.json").read_text())["vocab_size"]
    size = workloads.sizes(a.size, a.set)
    W = {w: workloads.build(w, size, tok, vocab) for w in a.workloads.split(",")}
    Path(a.worker_out).write_text(json.dumps(JOBS[engine](model, opt, W, a, Meter())))


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def system_libstdcxx() -> str | None:
    """The system's libstdc++ where there is one and it is not preloaded already."""
    for p in ("/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6", "/usr/lib/libstdc++.so.6"):
        if os.path.isfile(p) and p not in os.environ.get("LD_PRELOAD", ""):
            return p
    return None


def run_jobs(jobs, argv, a, model, t_start, errors, covered, prefix=""):
    """One process an engine, in `jobs`' order; the rows they wrote, each tagged with its job."""
    rows = []
    for k, (engine, opt, wl) in enumerate(jobs, 1):
        label = f"{engine} {opt}".strip()
        log(f"{prefix}[{k}/{len(jobs)}] {label}: {', '.join(wl)}  ({time.perf_counter() - t_start:.0f} s so far)")
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "rows.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--model", str(model), "--size", a.size,
                   "--runs", str(a.runs), "--workloads", ",".join(wl), "--worker", f"{engine}:{opt}",
                   "--worker-out", str(out)]
            rc = subprocess.run(cmd).returncode
            if rc == -signal.SIGSEGV and engine == "llama.cpp" and (pre := system_libstdcxx()):
                # llama.cpp's library died in its tokenizer's set-up under a Python whose own
                # libstdc++ came first (a GPU host's, sessions 17 and 36); with the system's it ran
                log(f"  {label} died (SIGSEGV); again with {pre} preloaded")
                env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [pre, os.environ.get("LD_PRELOAD")])))
                rc = subprocess.run(cmd, env=env).returncode
            if rc == 0 and out.is_file():
                rows += [dict(row, _job=f"{engine}:{opt}") for row in json.loads(out.read_text())]
                covered.update(wl)
            elif engine == "pagedrt":
                raise SystemExit(f"{label} failed (exit status {rc})")
            else:
                errors.append(f"{label}: exit status {rc}")
                log(f"  {label} failed (exit status {rc}); going on without it")
    return rows


def merge_rounds(rounds, params):
    """Each round's ratios and floor fractions from its own rows and probe, then
    one row per (job, workload, variant): every number the median over the
    rounds that have the row (the per-round figures kept under "rounds")."""
    for rows, ceilings in rounds:
        first = add_ratios(rows)
        add_floors(rows, params, ceilings)
    if len(rounds) == 1:
        return first, rounds[0][0]
    key = lambda x: (x["_job"], x["workload"], x.get("variant"))  # noqa: E731
    merged, seen = [], set()
    for row in (x for rows, _ in rounds for x in rows):  # a row is kept where any round has it (a peer may fail once)
        if key(row) in seen:
            continue
        seen.add(key(row))
        same = [x for rows, _ in rounds for x in rows if key(x) == key(row)]
        out = dict(row)
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals = [x[k] for x in same if isinstance(x.get(k), (int, float))]
                out[k] = statistics.median(vals) if isinstance(v, float) else int(statistics.median(vals))
        out["rounds"] = [{k: x.get(k) for k in ("decode_tok_s", "output_tok_s", "first_x", "of_floor", "floor_tok_s")
                          if x.get(k) is not None} for x in same]
        merged.append(out)
    return first, merged


def print_rounds(rows):
    """With --rounds: the throughput rows' figures round by round (the tables give their medians)."""
    for wl, key in RATIO_KEYS.items():
        rs = [r for r in rows if r["workload"] == wl and r.get("rounds")]
        if not rs:
            continue
        floor = wl == "latency"
        print(f"\n{wl}, round by round ({key.replace('_', ' ').replace(' s', '/s')}, x the first engine"
              + (", of the floor):" if floor else "):"))
        names = [r["engine"] + (f" ({r['variant']})" if r.get("variant") else "") for r in rs]
        for r, name in zip(rs, names):
            print(f"  {name:<{max(map(len, names))}}" + "  ".join(
                f"{x[key]:7.1f} {x.get('first_x', 0):.2f}x" + (f" {x.get('of_floor', 0):6.1%}" if floor else "")
                for x in r["rounds"]))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    if a.rounds < 1:
        raise SystemExit(f"--rounds {a.rounds}: at least 1")
    if a.device == "cuda" and not any(x.startswith("--dtypes") for x in argv):
        a.dtypes = "bfloat16"  # float32 on the GPU is the validation mode, not a contender
    if a.worker:
        return worker(a)
    selected = [w for w in workloads.NAMES if w in a.workloads.split(",")]
    if unknown := set(a.workloads.split(",")) - set(workloads.NAMES):
        raise SystemExit(f"unknown workloads {sorted(unknown)}; have {','.join(workloads.NAMES)}")
    tmp = None
    if a.tiny:
        tmp = tempfile.TemporaryDirectory()
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_llama, train_sentencepiece
        model, _ = make_tiny_llama(Path(tmp.name) / "tiny", vocab_size=400)
        train_sentencepiece(model)
        a.peers, a.runs, a.size = "", 1, "tiny"
    else:
        model = pagedrt.resolve_model(a.model)
    size = workloads.sizes(a.size, a.set)
    jobs = plan(a, selected)
    ceilings, params = None, weight_params(model)
    sizes = weight_bytes(params, [f"{engine} {opt}" for engine, opt, _ in jobs])  # the probe's working sets
    if a.device == "cpu":
        from cpu_ceilings import measure
    for t in {opt for engine, opt, _ in jobs if engine == "llama.cpp"}:
        gguf_path(t)  # made here, once, not inside a timed job
    t_start, load_start = time.perf_counter(), os.getloadavg()
    rounds, errors, covered = [], [], set()
    job_index = {f"{engine}:{opt}": i for i, (engine, opt, _) in enumerate(jobs)}
    for r in range(a.rounds):
        if a.device == "cpu":  # a CPU figure holds as a fraction of the ceilings measured with it: each round's
            ceilings = measure(a.threads, sizes)
        order = jobs[r % len(jobs):] + jobs[:r % len(jobs)]  # each engine first in some round
        got = run_jobs(order, argv, a, model, t_start, errors, covered, f"round {r + 1}/{a.rounds} " * (a.rounds > 1))
        got.sort(key=lambda row: job_index[row["_job"]])  # the first job's rows first: ratios are to it
        rounds.append((got, ceilings))
    seconds = time.perf_counter() - t_start
    first, rows = merge_rounds(rounds, params)
    rows = [r for r in rows if r["workload"] in selected]
    ref = greedy_matches(rows)
    check_schema(rows, [w for w in selected if w in covered])

    from pagedrt import _testing
    kernel = _testing._gemm_variant()  # the CPU GEMM this processor runs
    print(f"\n{model.name} on {platform.machine()} ({cpu_name()}, CPU GEMM {kernel}), {a.threads} threads, "
          f"{date.today()}, sizes \"{a.size}\"{' ' + ' '.join(a.set) if a.set else ''}")
    ceilings = rounds[0][1]  # the JSON's "ceilings": the first round's (every round's in "ceilings_by_round")
    for r, (_, c) in enumerate(rounds):
        if not (c and c.get("read_GBps")):
            continue
        when = f"before round {r + 1}" if len(rounds) > 1 else "in this run"
        print(f"ceilings, measured {when}: read {c['read_1thread_GBps']:.1f} GB/s with 1 thread, "
              f"{c['read_GBps']:.1f} GB/s with {c['threads']} (1 GiB); fp32 GEMM "
              f"{c['gemm_GFLOPs']:.0f} GFLOP/s ({params / 1e6:.1f}M weights: the floor of a decode step is "
              f"one read of them, at the read rate of their size)")
        at = c.get("read_at_GBps") or {}
        llc = c.get("llc_bytes")
        if at:
            print("  read at the weights' size, " + ", ".join(f"{int(b) / 1e6:.0f} MB: {v:.1f} GB/s" for b, v in at.items())
                  + (f" (last-level cache {llc / 2**20:.0f} MiB)" if llc else ""))
    print_tables(rows, size, a.runs, ref, a.throughput_runs, first)
    print_rounds(rows)
    first = next((r["load_to_first_token_s"] for r in rows if "load_to_first_token_s" in r), None)
    if first is not None:
        print(f"\nRuntime() to first token (converted model): {first:.2f} s")
    print(f"{len(jobs)} engine runs in {seconds:.0f} s" + "".join(f"\nFAILED: {e}" for e in errors))
    load = os.getloadavg()
    if max(load_start[0], load[1]) > a.threads + 1:  # this run alone keeps it near --threads
        print(f"WARNING: load average {load_start[0]:.1f} at the start, {load[1]:.1f} over the last 5 minutes "
              f"with {a.threads} threads here: another process was running, so the timings are not reliable")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(
            model=model.name, threads=a.threads, date=str(date.today()), machine=platform.machine(), cpu=cpu_name(),
            cpu_gemm=kernel, ceilings=ceilings, ceilings_by_round=[c for _, c in rounds], weight_params=params, size=a.size, sizes=size, workloads=selected, args=vars(a), seconds=seconds, errors=errors,
            loadavg_start=load_start, loadavg_end=load, rows=rows),
            indent=2))
    if a.plot and importlib.util.find_spec("matplotlib"):
        plot(rows, a.plot)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
