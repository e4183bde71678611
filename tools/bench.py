#!/usr/bin/env python3
"""pagedrt against its peers on the CPU, in one run, on the same prompts.

    python tools/bench.py                          # SmolLM2-135M, 2 threads, every peer installed
    python tools/bench.py --tiny --json out.json   # CI: a tiny random model, pagedrt only, checks its schema

Workloads (tools/workloads.py): "latency" (batch 1, 32-token prompt, 128 new,
greedy, eos ignored: prefill tok/s, TTFT, decode tok/s) and "batched" (32
prompts of 64-200 tokens, 128 new each, all at once: output tok/s). Peers run
when installed (pip install llama-cpp-python ctranslate2): llama.cpp on the
shipped Q4_1 GGUF (batch 1 only: llama-cpp-python has no multi-sequence
generate), CTranslate2 float32 and int8 (converted from the same safetensors),
transformers fp32. Results: a table on the terminal, a JSON file, a PNG plot
(with matplotlib). Other workloads: tools/bench_kv.py (waste, shared prefix),
tools/bench_sharing.py (n = 4, beams).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402

import pagedrt  # noqa: E402

SCHEMA = {"engine": str, "workload": str, "output_tok_s": float, "decode_tok_s": (float, type(None)),
          "prefill_tok_s": (float, type(None)), "ttft_ms": (float, type(None)), "peak_rss_mb": float}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def row(engine, workload, out_tokens, secs, decode=None, prefill=None, ttft=None):
    return dict(engine=engine, workload=workload, output_tok_s=out_tokens / secs, decode_tok_s=decode,
                prefill_tok_s=prefill, ttft_ms=ttft, peak_rss_mb=rss_mb())


# ---- pagedrt ---------------------------------------------------------------------------
def pagedrt_runs(model, prompts_lat, new_lat, prompts_b, new_b, a):
    rows = []
    for dtype in a.dtypes.split(","):
        t0 = time.perf_counter()
        with pagedrt.Runtime(model, device="cpu", dtype=dtype, num_threads=a.threads) as rt:
            load = time.perf_counter() - t0
            first_token = None
            lat = []
            for r in range(a.runs + 1):
                start = time.monotonic()  # events carry the engine's time on this clock
                rid = rt.submit(prompts_lat[0], max_tokens=new_lat[0], ignore_eos=True, temperature=0)
                first, n, done, end = None, 0, False, None
                while not done:
                    for ev in rt.poll(rid, timeout=1.0):
                        n += len(ev.token_ids)
                        first = first or (ev.time if ev.token_ids else None)
                        done, end = ev.request_finished, ev.time
                if first_token is None:
                    first_token = load + (first - start)
                if r:
                    lat.append((len(prompts_lat[0]) / (first - start), (n - 1) / (end - first), (first - start) * 1e3))
                log(f"  pagedrt {dtype} latency run {r}: decode {(n - 1) / (end - first):.1f} tok/s")
            med = [statistics.median(x[i] for x in lat) for i in range(3)]
            rows.append(row(f"pagedrt {dtype}", "latency", new_lat[0], new_lat[0] / med[1], med[1], med[0], med[2]))
            rows[-1]["load_to_first_token_s"] = first_token
            t0 = time.perf_counter()
            outs = rt.generate(prompts_b, max_tokens=new_b[0], ignore_eos=True, temperature=0)
            secs = time.perf_counter() - t0
            n = sum(len(o.token_ids) for o in outs)
            log(f"  pagedrt {dtype} batched: {n / secs:.1f} tok/s")
            rows.append(row(f"pagedrt {dtype}", "batched", n, secs))
    return rows


# ---- peers -----------------------------------------------------------------------------
def transformers_runs(model, prompts_lat, new_lat, prompts_b, new_b, a):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(a.threads)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    rows, lat = [], []
    with torch.inference_mode():
        for r in range(a.runs + 1):
            start = time.perf_counter()
            res = m(torch.tensor([prompts_lat[0]]), use_cache=True)
            past, tok = res.past_key_values, res.logits[0, -1].argmax()
            first = time.perf_counter()
            for _ in range(new_lat[0] - 1):
                res = m(tok.view(1, 1), past_key_values=past, use_cache=True)
                past, tok = res.past_key_values, res.logits[0, -1].argmax()
            end = time.perf_counter()
            if r:
                lat.append((len(prompts_lat[0]) / (first - start), (new_lat[0] - 1) / (end - first), (first - start) * 1e3))
            log(f"  transformers latency run {r}: decode {(new_lat[0] - 1) / (end - first):.1f} tok/s")
        med = [statistics.median(x[i] for x in lat) for i in range(3)]
        rows.append(row("transformers float32", "latency", new_lat[0], new_lat[0] / med[1], med[1], med[0], med[2]))
        # batched: left-padded greedy generate over all prompts at once
        width = max(len(p) for p in prompts_b)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts_b])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_b])
        t0 = time.perf_counter()
        m.generate(ids, attention_mask=mask, max_new_tokens=new_b[0], min_new_tokens=new_b[0], do_sample=False,
                   pad_token_id=0)
        secs = time.perf_counter() - t0
        log(f"  transformers batched: {len(prompts_b) * new_b[0] / secs:.1f} tok/s")
        rows.append(row("transformers float32", "batched", len(prompts_b) * new_b[0], secs))
    return rows


def ctranslate2_runs(model, prompts_lat, new_lat, prompts_b, new_b, a):
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    rows = []
    tok = pagedrt.Tokenizer.from_model_dir(model)
    to_str = lambda ids: [tok._tok.id_to_token(i) if hasattr(tok, "_tok") else str(i) for i in ids]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ct2"
        TransformersConverter(str(model)).convert(str(out), quantization="float32")
        for ctype in ("float32", "int8"):
            gen = ctranslate2.Generator(str(out), device="cpu", compute_type=ctype, intra_threads=a.threads)
            toks = [to_str(p) for p in prompts_lat]
            lat = []
            for r in range(a.runs + 1):
                t0 = time.perf_counter()
                gen.generate_batch(toks, max_length=1, include_prompt_in_result=False, sampling_topk=1)
                ttft = time.perf_counter() - t0
                t0 = time.perf_counter()
                gen.generate_batch(toks, max_length=new_lat[0], min_length=new_lat[0],
                                   include_prompt_in_result=False, sampling_topk=1)
                total = time.perf_counter() - t0
                if r:
                    lat.append((len(prompts_lat[0]) / ttft, (new_lat[0] - 1) / max(total - ttft, 1e-9), ttft * 1e3))
            med = [statistics.median(x[i] for x in lat) for i in range(3)]
            log(f"  ctranslate2 {ctype} latency: decode {med[1]:.1f} tok/s")
            rows.append(row(f"ctranslate2 {ctype}", "latency", new_lat[0], new_lat[0] / med[1], med[1], med[0], med[2]))
            t0 = time.perf_counter()
            gen.generate_batch([to_str(p) for p in prompts_b], max_length=new_b[0], min_length=new_b[0],
                               include_prompt_in_result=False, sampling_topk=1, max_batch_size=len(prompts_b))
            secs = time.perf_counter() - t0
            log(f"  ctranslate2 {ctype} batched: {len(prompts_b) * new_b[0] / secs:.1f} tok/s")
            rows.append(row(f"ctranslate2 {ctype}", "batched", len(prompts_b) * new_b[0], secs))
    return rows


def llamacpp_runs(gguf, prompts_lat, new_lat, a, label):
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_threads=a.threads, n_ctx=1024, verbose=False)
    lat = []
    for r in range(a.runs + 1):
        llm.reset()
        start = time.perf_counter()
        first, n = None, 0
        for tok in llm.generate(prompts_lat[0], temp=0.0, top_k=1, reset=True):
            n += 1
            first = first or time.perf_counter()
            if n == new_lat[0]:
                break
        end = time.perf_counter()
        if r:
            lat.append((len(prompts_lat[0]) / (first - start), (n - 1) / (end - first), (first - start) * 1e3))
        log(f"  llama.cpp {label} latency run {r}: decode {(n - 1) / (end - first):.1f} tok/s")
    med = [statistics.median(x[i] for x in lat) for i in range(3)]
    return [row(f"llama.cpp {label}", "latency", new_lat[0], new_lat[0] / med[1], med[1], med[0], med[2])]


# ---- report ----------------------------------------------------------------------------
def check_schema(rows):
    for r in rows:
        for k, t in SCHEMA.items():
            assert k in r and isinstance(r[k], t), (k, r)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (wl, key, title) in zip(axes, [("latency", "decode_tok_s", "batch-1 decode tok/s"),
                                          ("batched", "output_tok_s", "batched output tok/s")]):
        rs = [r for r in rows if r["workload"] == wl]
        ax.barh([r["engine"] for r in rs], [r[key] for r in rs],
                color=["tab:blue" if r["engine"].startswith("pagedrt") else "tab:gray" for r in rs])
        ax.set_title(title)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--peers", default="llama.cpp,ctranslate2,transformers")
    p.add_argument("--gguf-types", default="q4_1,f16,bf16", help="llama.cpp weights to run")
    p.add_argument("--tiny", action="store_true", help="a tiny random model, small workloads, pagedrt only")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG path")
    a = p.parse_args(argv)
    tmp = None
    if a.tiny:
        tmp = tempfile.TemporaryDirectory()
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_llama, train_sentencepiece
        model, _ = make_tiny_llama(Path(tmp.name) / "tiny", vocab_size=400)
        train_sentencepiece(model)
        a.peers, a.runs = "", 1
    else:
        model = pagedrt.resolve_model(a.model)
    tok = pagedrt.Tokenizer.from_model_dir(model)
    pl, nl = workloads.latency(tok, 32, 16 if a.tiny else 128)
    pb, nb = workloads.batched(tok, tok.vocab_size, 4 if a.tiny else 32, 64, 200, 8 if a.tiny else 128)
    log(f"model {model.name}, {a.threads} threads")
    rows = pagedrt_runs(model, pl, nl, pb, nb, a)
    peers = set(filter(None, a.peers.split(",")))
    if "transformers" in peers and importlib.util.find_spec("transformers"):
        rows += transformers_runs(model, pl, nl, pb, nb, a)
    if "ctranslate2" in peers and importlib.util.find_spec("ctranslate2"):
        rows += ctranslate2_runs(model, pl, nl, pb, nb, a)
    if "llama.cpp" in peers and importlib.util.find_spec("llama_cpp") and a.model is None:
        from pagedrt.models import _default_gguf, cache_root
        import make_gguf
        for t in a.gguf_types.split(","):
            gguf_path = _default_gguf()
            if t != "q4_1":  # the shipped weights re-encoded unquantized (tools/make_gguf.py), once
                gguf_path = cache_root().parent / "gguf" / f"SmolLM2-135M-Instruct-{t}.gguf"
                if not gguf_path.is_file():
                    gguf_path.parent.mkdir(parents=True, exist_ok=True)
                    make_gguf.main(["--type", t, "--out", str(gguf_path)])
            rows += llamacpp_runs(gguf_path, pl, nl, a, t.upper())
    check_schema(rows)

    print(f"\n{model.name} on {platform.machine()}, {a.threads} threads, {date.today()} (median of {a.runs})")
    print(f"{'engine':<24} {'decode tok/s':>13} {'prefill tok/s':>14} {'TTFT ms':>8} {'batched tok/s':>14}")
    engines = dict.fromkeys(r["engine"] for r in rows)
    for e in engines:
        lat = next((r for r in rows if r["engine"] == e and r["workload"] == "latency"), None)
        bat = next((r for r in rows if r["engine"] == e and r["workload"] == "batched"), None)
        f = lambda v, w: f"{v:>{w}.1f}" if v is not None else f"{'-':>{w}}"
        print(f"{e:<24} {f(lat and lat['decode_tok_s'], 13)} {f(lat and lat['prefill_tok_s'], 14)} "
              f"{f(lat and lat['ttft_ms'], 8)} {f(bat and bat['output_tok_s'], 14)}")
    first = next(r.get("load_to_first_token_s") for r in rows if "load_to_first_token_s" in r)
    print(f"Runtime() to first token (converted model): {first:.2f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(model=model.name, threads=a.threads, date=str(date.today()),
                                                machine=platform.machine(), rows=rows), indent=2))
    if a.plot and importlib.util.find_spec("matplotlib"):
        plot(rows, a.plot)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
