#!/usr/bin/env python3
"""fp8 weights' and the fp8 KV cache's quality on real weights (issue 21):
teacher-forced top-1 agreement with the unquantized model and perplexity,
over real English text.

    fp8_quality.py [--model DIR|FILE.gguf] [--device cpu|cuda] [--positions 3000]
                   [--schemes kv,channel,tensor,block,channel+kv] [--json OUT.json]

Schemes: "kv" is the original weights with kv_cache_dtype="fp8"; "channel",
"tensor" and "block" are fp8 weights with those scales; "S+kv" is both.

The model (default: SmolLM2-135M-Instruct, converted) and its fp8 copies
(tools/make_fp8_checkpoint.py, one per scheme, in a temporary folder) each
read the same text in windows of 1,024 tokens; at every position the
argmax of the logits is compared with the unquantized model's, and the
log-probability of the text's next token is summed for the perplexity.
The text is the documentation of Python's standard library (the docstrings
of a fixed list of modules, as `inspect.getdoc` gives them): English prose
shipped with every Python, read from this machine, never a network.
Weights only: the fp8 copies are dequantized at load (pagedrt's loader) and
run in the same dtype as the original, so this measures the weights'
rounding, not fp8 activations.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_fp8_checkpoint  # noqa: E402

MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "re",
           "subprocess", "threading", "unittest", "email.message", "http.client", "urllib.parse", "csv",
           "datetime", "decimal", "textwrap", "shutil", "tempfile", "typing", "dataclasses", "asyncio",
           "contextlib", "heapq", "random", "statistics", "string", "zipfile", "tarfile")


def corpus() -> str:
    """The docstrings of MODULES and of their public classes and functions, in order."""
    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for obj in [mod] + [getattr(mod, a) for a in sorted(getattr(mod, "__all__", [])) if hasattr(mod, a)]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                         or inspect.isfunction(obj)) else None
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(parts)


def score(model_dir, ids, windows, device, dtype=None, kv_cache_dtype="auto"):
    """(argmax per position, sum of next-token log-probabilities, positions, weight dtype) over the windows."""
    import pagedrt
    tops, nll, n = [], 0.0, 0
    with pagedrt.Runtime(model_dir, device=device, dtype=dtype, max_model_len=2048, kv_cache_dtype=kv_cache_dtype,
                         max_num_batched_tokens=2048) as rt:
        dtype = rt.model_info.weight_dtype
        for a, b in windows:
            rid = rt.submit(ids[a:b], pagedrt.SamplingParams(max_tokens=1, temperature=0, return_logits=True,
                                                            ignore_eos=True))
            rows, done = [], False
            while not done:
                for ev in rt.poll(rid, timeout=1.0):
                    if ev.logits is not None:
                        rows.append(ev.logits)
                    done = done or ev.finished
            logits = np.concatenate(rows).astype(np.float64)[:b - a - 1]  # rows predicting ids[a+1 .. b-1]
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            nxt = np.asarray(ids[a + 1:b])
            nll -= float(logp[np.arange(len(nxt)), nxt].sum())
            n += len(nxt)
            tops.append(logits.argmax(axis=1))
    return np.concatenate(tops), nll, n, dtype


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--positions", type=int, default=3000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--schemes", default="kv,channel,tensor,block,channel+kv")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import pagedrt
    src = pagedrt.resolve_model(a.model)
    tok = pagedrt.Tokenizer.from_model_dir(src)
    ids = tok.encode(corpus())
    need = a.positions + a.positions // (a.window - 1) + 2
    if len(ids) < need:
        sys.exit(f"the corpus has {len(ids)} tokens, fewer than the {need} asked for")
    ids = ids[:need]
    windows = [(s, min(s + a.window, len(ids))) for s in range(0, len(ids) - 1, a.window - 1)]
    t0 = time.perf_counter()
    base_top, base_nll, n, dtype = score(src, ids, windows, a.device)
    res = {"model": str(src), "device": a.device, "positions": n, "window": a.window,
           "text": f"docstrings of {len(MODULES)} Python {sys.version.split()[0]} stdlib modules",
           "weight_dtype": dtype, "original": {"ppl": math.exp(base_nll / n)}}
    print(f"{src.name}: {n} positions, perplexity {res['original']['ppl']:.4f} ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in a.schemes.split(","):
            weights = scheme.removesuffix("+kv").removesuffix("kv")
            kv = "fp8" if scheme.endswith("kv") else "auto"
            out = src
            if weights:
                out = pathlib.Path(tmp) / weights
                if not out.exists():
                    make_fp8_checkpoint.main([str(src), str(out), "--scheme", weights])
            top, nll, _, _ = score(out, ids, windows, a.device, dtype, kv)  # the original's dtype
            ppl = math.exp(nll / n)
            r = res[f"fp8_{scheme}"] = {"ppl": ppl, "ppl_ratio": ppl / res["original"]["ppl"],
                                        "top1_agreement": float((top == base_top).mean())}
            what = " and ".join(([f"fp8 weights ({weights} scales)"] if weights else []) + (["fp8 KV"] if kv != "auto" else []))
            print(f"{what}: top-1 agreement {100 * r['top1_agreement']:.2f}%, perplexity "
                  f"{ppl:.4f} ({100 * (r['ppl_ratio'] - 1):+.2f}%)", flush=True)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
