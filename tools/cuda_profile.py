#!/usr/bin/env python3
"""Where a pagedrt CUDA step spends its GPU time, kernel by kernel.

    cuda_profile.py OUT.json MODEL_DIR [ASYNC_SCHEDULING [PHASES [OPTIONS]]]

ASYNC_SCHEDULING: the Runtime option ("auto", the default; "off": steps one at
a time, for the idle gaps before and after). PHASES: comma-separated indices
of the phases below (default: all). OPTIONS: "NAME=VALUE,..." of Runtime
options (lower-case names: "quantization=fp8,kv_cache_dtype=fp8") and
environment variables read when the backend is made (upper case:
PAGEDRT_CUDA_PDL=0 gives each kernel's own time, without programmatic
dependent launch's overlap, which makes a small kernel's span include the
wait for the kernel before it).

Runs the throughput workload of bench_cuda.py at a smaller scale (64 requests of
512 in / 32 out: prefill-heavy steps, then batch-64 decode), batch-256 decode
(256 requests of 16 in / 64 out), batch-1 decode,
one 8,000-token prompt (issue 16's time to first token) and a long mix (256
requests of 1,024 in / 128 out: issue 17's and 21's long workload, shorter) and
batch-256 decode at issue 17's 128 in (its prompts cached by the unprofiled run,
so that only their last block is prefilled; tools/peer_profile.py profiles the
torch.compile peer at that shape) under torch.profiler, whose CUPTI tracing records every kernel of the process
(pagedrt's own and cuBLASLt's, not only torch's). Prints a table per phase:
kernel, calls, total ms, share, and where the wall time goes (host time before
the first GPU event and after the last, GPU-idle gaps); writes the same to
OUT.json. Each phase runs once unprofiled first.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def kernel_table(prof, top=14):
    """(name, calls, total_ms) of the GPU kernels and copies, largest first."""
    rows = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        name = ev.name if len(ev.name) < 90 else ev.name[:87] + "..."
        calls, us = rows.get(name, (0, 0.0))
        rows[name] = (calls + 1, us + ev.device_time_total)
    out = sorted(((n, c, us / 1e3) for n, (c, us) in rows.items()), key=lambda r: -r[2])
    return out[:top], sum(r[2] for r in out)


def timeline(prof, outer="generate"):
    """Where the wall time of the `outer` record_function range goes: before the
    first GPU event (lead), after the last (tail), and GPU-idle gaps between them,
    the largest with the names of the events on either side."""
    cpu = [ev for ev in prof.events() if ev.name == outer]
    gpu = sorted((ev for ev in prof.events() if ev.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    if not cpu or not gpu:
        return {}
    t0, t1 = cpu[0].time_range.start, cpu[0].time_range.end
    gaps, end, prev = [], gpu[0].time_range.start, gpu[0].name
    for ev in gpu:
        if ev.time_range.start > end:
            gaps.append((ev.time_range.start - end, prev[:60], ev.name[:60]))
        if ev.time_range.end > end:
            end, prev = ev.time_range.end, ev.name
    gaps.sort(reverse=True)
    r = {"wall_ms": (t1 - t0) / 1e3, "lead_ms": (gpu[0].time_range.start - t0) / 1e3,
         "tail_ms": (t1 - end) / 1e3, "gaps_ms": sum(g[0] for g in gaps) / 1e3, "gaps": len(gaps),
         "largest_gaps": [{"us": g[0], "after": g[1], "before": g[2]} for g in gaps[:8]]}
    print(f"  timeline: wall {r['wall_ms']:.2f} ms = lead {r['lead_ms']:.2f} (host, before the first GPU event)"
          f" + GPU span, with {r['gaps']} idle gaps of {r['gaps_ms']:.2f} ms in all, + tail {r['tail_ms']:.2f}")
    for g in r["largest_gaps"]:
        print(f"    gap {g['us']:8.1f} us after {g['after']} before {g['before']}")
    return r


def show(title, table, total, wall_ms):
    print(f"\n{title}: GPU busy {total:.1f} ms of {wall_ms:.1f} ms wall ({100 * total / wall_ms:.0f}%)")
    print(f"{'kernel':<92}{'calls':>7}{'ms':>10}{'share':>8}")
    for name, calls, ms in table:
        print(f"{name:<92}{calls:>7}{ms:>10.2f}{100 * ms / total:>7.1f}%")


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import pagedrt

    out_path, model = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "auto"
    rng = np.random.default_rng(0)
    from bench_cuda import split_setting
    env, extra = split_setting(sys.argv[5] if len(sys.argv) > 5 else "")
    os.environ.update(env)
    rt = pagedrt.Runtime(model, device="cuda", **{"max_num_seqs": 256, "max_num_batched_tokens": 8192,
                                                  "async_scheduling": mode, **extra})
    greedy = dict(ignore_eos=True, temperature=0.0)
    rt.generate([rng.integers(0, 128000, size=64).tolist()] * 4, max_tokens=4, **greedy)  # warm-up
    result = {"device": torch.cuda.get_device_name()}
    phases = [
        ("batch-1 decode (128 in, 64 out)", [rng.integers(0, 128000, size=128).tolist()], 64),
        ("64 x (512 in / 32 out)", [rng.integers(0, 128000, size=512).tolist() for _ in range(64)], 32),
        ("batch-256 decode (16 in, 64 out)", [rng.integers(0, 128000, size=16).tolist() for _ in range(256)], 64),
        ("batch-1 prefill of 8,000 tokens (TTFT)", [rng.integers(0, 128000, size=8000).tolist()], 1),
        ("256 x (1,024 in / 128 out)", [rng.integers(0, 128000, size=1024).tolist() for _ in range(256)], 128),
        # issue 17's batch TPOT shape (bench_cuda.py batch_tpot at 256), beside peer_profile.py's table:
        # its prompts are cached by the unprofiled run, so the table is the decode steps'
        ("batch-256 decode (128 in cached, 64 out)", [rng.integers(0, 128000, size=128).tolist() for _ in range(256)],
         64),
    ]
    if len(sys.argv) > 4:
        phases = [phases[int(i)] for i in sys.argv[4].split(",")]
    result["async_scheduling"] = mode
    result["options"] = {**env, **extra}
    for title, prompts, n in phases:
        # The same shapes once unprofiled first, so that plans and buffers are made
        # (fresh tokens: no cached prefix; a "cached" phase runs its own prompts
        # first, so that the profiled run finds them in the prefix cache).
        cached = "cached" in title
        rt.generate(prompts if cached else [rng.integers(0, 128000, size=len(p)).tolist() for p in prompts],
                    max_tokens=n, **greedy)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            with record_function("generate"):
                rt.generate(prompts, max_tokens=n, **greedy)
            wall_ms = (time.perf_counter() - t0) * 1e3
        table, total = kernel_table(prof, top=int(os.environ.get("PROFILE_TOP", 14)))
        show(title, table, total, wall_ms)
        result[title] = {"wall_ms": wall_ms, "gpu_busy_ms": total,
                         "kernels": [{"name": k, "calls": c, "ms": ms} for k, c, ms in table],
                         "timeline": timeline(prof)}
        with open(out_path, "w") as f:  # after every phase: a run cut short keeps the phases it finished
            json.dump(result, f, indent=1)
    rt.close()


if __name__ == "__main__":
    main()
