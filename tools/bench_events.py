#!/usr/bin/env python3
"""The Python event path against the engine alone: what turning core events into
pagedrt.Event objects (detokenization, stop strings, completions) costs per event.

    python tools/bench_events.py                        # 512 requests, 16-token prompts, 64 tokens out
    python tools/bench_events.py --tokenizer sentencepiece  # tokenizer.model instead of tokenizer.json
    python tools/bench_events.py --hidden 320           # an engine step as long as an 8B model's on an H200
    python tools/bench_events.py --profile 25           # and cProfile's top 25 of one generate()

A random one-layer Llama (tests/conftest.py's make_tiny_llama; hidden 32 by
default) so that an engine step is cheap and the host's work shows; --hidden 320
makes a step about as long as an 8B model's at batch 512 on an H200 (20-25 ms). The same greedy,
ignore_eos workload runs three ways on one Runtime, round after round:

    core      rt._rt (the nanobind core): submit every request, then poll()
              until the last final event, reading only request_finished: the
              engine and the binding's event objects, no Python per event
    generate  Runtime.generate(prompts)
    stream    Runtime.submit() each, then a poll() loop that reads every
              event's text and token ids (what pagedrt-serve's dispatcher does)

For each: wall seconds, and the polling thread's CPU time (time.thread_time:
the waits inside poll release the GIL and take none) per event. "host us/event"
is that CPU time over the events; "over core" subtracts the core run's; "of it
gc" is the garbage collector's share (gc.callbacks). The engine runs on its own
thread(s) meanwhile (--threads, default 1: one core each for the engine and the
host on a 2-core machine).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pagedrt


def make_model(folder: Path, tokenizer: str, hidden: int) -> Path:
    """A random one-layer Llama with a tiny byte-level BPE tokenizer.json (the
    tokenizers backend, as Llama-3's; vocab 367), a tiny sentencepiece model
    (vocab 400, byte fallback) or SmolLM2's tokenizer.json (vocab 49,152).
    Run in a child process (--make-model): torch and transformers, which make
    it, would otherwise stay in this one and every garbage collection here
    would walk their objects."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_llama, train_byte_level_bpe, train_sentencepiece

    tok = folder.parent / "tokenizer"
    if tokenizer == "bpe":
        train_byte_level_bpe(tok)
    elif tokenizer == "sentencepiece":
        train_sentencepiece(tok)
    else:
        tok = pagedrt.default_model(progress=False)
    path, _ = make_tiny_llama(folder, vocab_size=pagedrt.Tokenizer.from_model_dir(tok).vocab_size,
                              hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                              num_attention_heads=max(1, hidden // 16), num_key_value_heads=max(1, hidden // 16),
                              max_position_embeddings=256)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (tok / name).is_file():
            (path / name).write_bytes((tok / name).read_bytes())
    return path


class GcClock:
    """Seconds spent in the garbage collector since the last read()."""

    def __init__(self):
        self.total, self.start = 0.0, 0.0
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if phase == "start":
            self.start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self.start

    def read(self) -> float:
        t, self.total = self.total, 0.0
        return t


def timed(fn, gc_clock):
    """(wall seconds, this thread's CPU seconds, seconds in the collector, fn's result)."""
    gc_clock.read()
    w, c = time.perf_counter(), time.thread_time()
    out = fn()
    return time.perf_counter() - w, time.thread_time() - c, gc_clock.read(), out


def run_core(rt, prompts, params) -> int:
    core = params._to_core()
    for p in prompts:
        rt._rt.submit(p, core, "", False)
    events, left = 0, len(prompts)
    while left:
        evs = rt._rt.poll(0.1)
        events += len(evs)
        left -= sum(e.request_finished for e in evs)
    return events


def run_generate(rt, prompts, params) -> int:
    outs = rt.generate(prompts, params)
    # one event per generated token here (greedy, no speculation): the count the others see
    return sum(len(o.token_ids) for o in outs)


def run_stream(rt, prompts, params) -> int:
    texts = {rt.submit(p, params): [] for p in prompts}
    events, left = 0, len(texts)
    while left:
        for ev in rt.poll(timeout=0.1):
            texts[ev.request_id].append(ev.text)
            events += len(ev.token_ids) > 0
            left -= ev.request_finished
    return events


MODES = {"core": run_core, "generate": run_generate, "stream": run_stream}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up); medians reported")
    ap.add_argument("--threads", type=int, default=1, help="engine threads")
    ap.add_argument("--tokenizer", default="bpe", choices=["bpe", "sentencepiece", "smollm2"])
    ap.add_argument("--hidden", type=int, default=32,
                    help="the model's width (32: a step of about 1 ms at batch 512 on one core of the 2-core VM; "
                         "320: about 20 ms, an 8B model's step at batch 512 on an H200)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also run generate() once under cProfile and print the top N by own time")
    ap.add_argument("--json", default=None)
    ap.add_argument("--make-model", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.make_model:
        return make_model(Path(a.make_model), a.tokenizer, a.hidden)

    tmp = tempfile.TemporaryDirectory()
    model = Path(tmp.name) / "tiny"
    subprocess.run([sys.executable, __file__, "--make-model", str(model), "--tokenizer", a.tokenizer,
                    "--hidden", str(a.hidden)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gc_clock = GcClock()
    rng = np.random.default_rng(0)
    params = pagedrt.SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    with pagedrt.Runtime(model, device="cpu", num_threads=a.threads, max_num_seqs=a.requests,
                         max_num_batched_tokens=max(2048, a.requests * a.prompt_len),
                         kv_cache_bytes=256 << 20, progress=False) as rt:
        vocab = rt.tokenizer.vocab_size

        def prompts():
            return [rng.integers(3, vocab, size=a.prompt_len).tolist() for _ in range(a.requests)]

        res = {m: [] for m in MODES}
        for r in range(a.rounds + 1):
            for name, fn in MODES.items():
                s0 = rt.stats()
                wall, cpu, gc_s, events = timed(lambda: fn(rt, prompts(), params), gc_clock)
                s1 = rt.stats()
                engine = (s1.forward_seconds - s0.forward_seconds) + (s1.output_seconds - s0.output_seconds)
                if r:  # round 0 warms up
                    res[name].append(dict(wall_s=wall, host_cpu_s=cpu, gc_s=gc_s, events=events, engine_s=engine,
                                          steps=s1.num_steps - s0.num_steps))
        if a.profile:
            prof = cProfile.Profile()
            prof.runcall(run_generate, rt, prompts(), params)
    med = {m: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for m, rows in res.items()}
    base = med["core"]
    print(f"{a.requests} requests x {a.prompt_len}-token prompts, {a.max_tokens} tokens out, greedy; "
          f"tokenizer {a.tokenizer}; engine threads {a.threads}; median of {a.rounds} rounds")
    print(f"{'mode':<10}{'wall s':>8}{'engine s':>10}{'steps':>7}{'events':>8}{'host us/event':>15}"
          f"{'over core':>11}{'of it gc':>10}{'wall / core':>13}")
    for m, x in med.items():
        per = 1e6 * x["host_cpu_s"] / x["events"]
        over = per - 1e6 * base["host_cpu_s"] / base["events"]
        print(f"{m:<10}{x['wall_s']:8.3f}{x['engine_s']:10.3f}{x['steps']:7.0f}{x['events']:8.0f}{per:15.2f}"
              f"{over:11.2f}{1e6 * x['gc_s'] / x['events']:10.2f}{x['wall_s'] / base['wall_s']:13.3f}")
        x.update(host_us_per_event=per, over_core_us_per_event=over, wall_over_core=x["wall_s"] / base["wall_s"])
    if a.profile:
        print(f"\ncProfile of one generate() (own time, top {a.profile}; poll's includes its waits):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.profile)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(args=vars(a), rounds=res, median=med), indent=1))


if __name__ == "__main__":
    main()
