#!/usr/bin/env python3
"""pagedrt's KV-cache workloads for tools/bench.py: mixed (with waste at its
peak), sharing and shared prefix. Run them through bench.py; this file as a
command is a shortcut for

    python tools/bench.py --workloads mixed,waste,sharing,prefix --peers "" [more bench.py options]

mixed/waste: all requests at once; while the engine runs its stats are
sampled, and at the sample where KV blocks in use peak we take pagedrt's waste
(1 - token slots in use / slots in allocated blocks) and, for the same running
requests at that instant, what a contiguous allocator would waste reserving
prompt + max_tokens per request (the best a pre-allocating system can do) and
max_model_len per request (what the vLLM paper calls prior systems' practice).

sharing: n = 1, n = 4 parallel samples (forked after the prompt), the same
outputs as 4 independent requests per prompt (no fork, no prefix cache), and
beam width 4. "Without sharing" is the peak of the live sequences' block
tables summed (each sequence owning its blocks); the saving is 1 - physical /
logical, the figure the PagedAttention paper reports (6-30% for parallel
sampling, 37-66% for beam search).

prefix: the first request runs alone (a warm cache, as in a long-running
service), then the others at once; prefix cache on and off.
"""
from __future__ import annotations

import sys
import time

import pagedrt

KV = ("sharing", "prefix", "waste")  # the workloads that depend on the KV cache, not on the weights


_last = [0.0]


def progress(msg, end=False):
    """One updating status line on a terminal; elsewhere a line every 10 s and each run's last."""
    if sys.stderr.isatty():
        print(f"\r\x1b[K{msg}", end="\n" if end else "", file=sys.stderr, flush=True)
    elif end or time.monotonic() - _last[0] > 10:
        _last[0] = time.monotonic()
        print(msg, file=sys.stderr, flush=True)


def watermarks(a):
    """--kv-watermark's values: [None] (the engine's default) when not given."""
    text = getattr(a, "kv_watermark", None)
    return [float(w) for w in text.split(",")] if text else [None]


def runtime(model, dtype, a, **kw):
    kw.setdefault("kv_watermark", watermarks(a)[0])  # None: the engine's default
    return pagedrt.Runtime(model, device=getattr(a, "device", "cpu"), dtype=dtype, num_threads=a.threads,
                           kv_cache_bytes=a.kv_cache_mib << 20, max_num_seqs=a.max_num_seqs, **kw)


def drain(rt, ids, label, on_events=None):
    """Polls until every request in `ids` finished; returns the output tokens seen."""
    left, tokens, t0 = set(ids), 0, time.perf_counter()
    while left:
        evs = rt.poll(timeout=0.05)
        for ev in evs:
            tokens += len(ev.token_ids)
            if ev.request_finished:
                left.discard(ev.request_id)
        if on_events:
            on_events(evs)
        s = rt.stats()
        progress(f"  {label}: {len(ids) - len(left)}/{len(ids)} requests, {s.blocks_used}/{s.num_blocks} "
                 f"blocks, {time.perf_counter() - t0:.0f} s")
    progress(f"  {label}: {len(ids)} requests, {tokens} tokens in {time.perf_counter() - t0:.1f} s", end=True)
    return tokens


def kv_fields(s):
    """The memory columns every pagedrt row carries."""
    return dict(kv_blocks_peak=s.peak_blocks_used, kv_slots_reserved=s.peak_blocks_used * s.block_size,
                waste_at_peak=s.waste_at_peak, preemptions=s.num_preemptions)


def mixed(model, dtype, prompts, news, a, meter, engine, with_waste):
    """Workload 3 row (one per --kv-watermark value), plus workload 6's rows
    (from the first) when `with_waste`."""
    rows = []
    for i, wm in enumerate(watermarks(a)):
        rows += mixed_run(model, dtype, prompts, news, a, meter, engine, with_waste and i == 0, wm)
    return rows


def mixed_run(model, dtype, prompts, news, a, meter, engine, with_waste, watermark):
    # one function per Runtime, as sharing_mode
    meter.reset()
    variant = None if watermark is None else f"kv_watermark {watermark:g}"
    with runtime(model, dtype, a, kv_watermark=watermark) as rt:
        max_len = rt.model_info.max_model_len
        t0 = time.perf_counter()
        reqs = {rt.submit(p, max_tokens=n, ignore_eos=True, temperature=0): [len(p), n, 0, False]
                for p, n in zip(prompts, news)}   # prompt, max_tokens, generated, finished
        best = {}

        def sample(evs):
            for ev in evs:
                r = reqs[ev.request_id]
                r[2] += len(ev.token_ids)
                r[3] = r[3] or ev.finished
            s = rt.stats()
            if s.blocks_used > best.get("blocks_used", -1):
                live = [r for r in reqs.values() if r[2] > 0 and not r[3]]
                used = sum(r[0] + r[2] - 1 for r in live)  # tokens holding K/V
                best.update(blocks_used=s.blocks_used, running=len(live),
                            reserve=1 - used / max(1, sum(r[0] + r[1] for r in live)),
                            max_len=1 - used / max(1, len(live) * max_len))

        tokens = drain(rt, list(reqs), f"{engine} mixed" + (f" ({variant})" if variant else ""), sample)
        secs = time.perf_counter() - t0
        s = rt.stats()
    row = dict(engine=engine, workload="mixed", variant=variant, output_tok_s=tokens / secs, seconds=secs,
               output_tokens=tokens, peak_rss_mb=meter.peak(), **kv_fields(s))
    if not with_waste:
        return [row]
    def waste(who, variant, w, slots=None):
        return dict(engine=who, workload="waste", variant=variant, waste_at_peak=w, kv_slots_reserved=slots,
                    peak_rss_mb=row["peak_rss_mb"])
    return [row, waste(engine, "paged, blocks on demand", s.waste_at_peak, s.peak_blocks_used * s.block_size),
            # what a pre-allocating runtime would waste for the same running requests at pagedrt's peak
            waste("contiguous allocator", "prompt + max_tokens reserved", best.get("reserve", 0.0)),
            waste("contiguous allocator", f"max_model_len ({max_len}) reserved", best.get("max_len", 0.0))]


def sharing(model, dtype, prompts, news, a, meter, engine):
    """Workload 4: four modes on the same prompts; peak blocks against n = 1."""
    common = dict(max_tokens=news[0], ignore_eos=True)
    modes = [("n=1", 1, dict(n=1, temperature=1.0, seed=0), True),
             ("n=4, forked after the prompt", 1, dict(n=4, temperature=1.0, seed=0), True),
             ("n=4 as 4 requests, no prefix cache", 4, dict(temperature=1.0, seed=0), False),
             ("beam width 4", 1, dict(beam_width=4, n=4), True)]
    rows = [sharing_mode(model, dtype, prompts, a, meter, engine, variant, per_prompt, {**params, **common}, cache)
            for variant, per_prompt, params, cache in modes]
    for r in rows:
        r["vs_n1"] = r["kv_blocks_peak"] / max(1, rows[0]["kv_blocks_peak"])
    return rows


def sharing_mode(model, dtype, prompts, a, meter, engine, variant, per_prompt, params, prefix_cache):
    # one function per Runtime: its memory is freed when the frame goes (close() only stops the engine)
    meter.reset()
    with runtime(model, dtype, a, enable_prefix_caching=prefix_cache) as rt:
        t0 = time.perf_counter()
        ids = [rt.submit(p, **params) for p in prompts for _ in range(per_prompt)]
        tokens = drain(rt, ids, f"{engine} sharing {variant}")
        secs = time.perf_counter() - t0
        s = rt.stats()
    return dict(engine=engine, workload="sharing", variant=variant, output_tok_s=tokens / secs, seconds=secs,
                output_tokens=tokens, peak_rss_mb=meter.peak(), kv_blocks_logical_peak=s.peak_blocks_logical,
                copies=s.num_copies, saving=1 - s.peak_blocks_used / max(1, s.peak_blocks_logical), **kv_fields(s))


def prefix(model, dtype, prompts, news, a, meter, engine):
    """Workload 5: the same requests with the prefix cache on and off."""
    return [prefix_mode(model, dtype, prompts, news[0], a, meter, engine, enable) for enable in (True, False)]


def prefix_mode(model, dtype, prompts, new, a, meter, engine, enable):
    meter.reset()
    with runtime(model, dtype, a, enable_prefix_caching=enable) as rt:
        t0 = time.perf_counter()
        params = dict(max_tokens=new, ignore_eos=True, temperature=0)
        rt.generate([prompts[0]], **params)      # warms the cache, as a long-running service's would
        ids = [rt.submit(p, **params) for p in prompts[1:]]
        drain(rt, ids, f"{engine} prefix cache {'on' if enable else 'off'}")
        secs = time.perf_counter() - t0
        s = rt.stats()
    return dict(engine=engine, workload="prefix", variant=f"cache {'on' if enable else 'off'}",
                output_tok_s=len(prompts) * new / secs, seconds=secs, output_tokens=len(prompts) * new,
                peak_rss_mb=meter.peak(), prompt_tokens_computed=s.prompt_tokens,
                hit_rate=s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0, **kv_fields(s))


if __name__ == "__main__":
    import bench
    bench.main(["--workloads", "mixed,waste,sharing,prefix", "--peers", "", *sys.argv[1:]])
