"""The host's ceilings for CPU speed figures, measured in the run that reports
them (PERFORMANCE.md: a figure holds as a fraction of the ceiling measured
with it): read bandwidth from one thread and from the run's thread count (a
streaming probe: a sum over far more memory than the caches hold), and the
fp32 GEMM rate, with torch's CPU kernels (torch is a test extra; without it
the ceilings are None). In a process of their own: torch's thread pool, left
spinning in the benchmark's process, halved pagedrt's decode rate there.

    from cpu_ceilings import measure
    c = measure(threads=2)  # {"read_GBps": (2 threads), "read_1thread_GBps": ..., "gemm_GFLOPs": ..., "threads": 2}
    python tools/cpu_ceilings.py [THREADS]   # the same, as JSON (THREADS: every core)
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time


def _median_s(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


UNMEASURED = {"read_GBps": None, "read_1thread_GBps": None, "gemm_GFLOPs": None, "threads": None}


def measure(threads: int | None = None) -> dict:
    """The ceilings at `threads` threads (None: torch's default, every core),
    measured in a child process."""
    out = subprocess.run([sys.executable, __file__, *([str(threads)] if threads else [])], capture_output=True,
                         text=True, timeout=300)
    return json.loads(out.stdout) if out.returncode == 0 else {**UNMEASURED, "error": out.stderr[-500:]}


def _measure_here(threads: int | None = None, read_bytes: int = 1 << 30, gemm_n: int = 2048, reps: int = 5) -> dict:
    """Read bandwidth: a sum over `read_bytes` of fp32 (far past the caches),
    with 1 thread and with `threads`. GEMM rate: an n x n x n fp32 product
    with `threads`. Medians of `reps` after a warm-up."""
    try:
        import torch
    except ImportError:
        return UNMEASURED
    if threads:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    x = torch.ones(read_bytes // 4, dtype=torch.float32)
    read = read_bytes / _median_s(lambda: x.sum(), reps) / 1e9
    torch.set_num_threads(1)
    read1 = read_bytes / _median_s(lambda: x.sum(), reps) / 1e9
    torch.set_num_threads(n)
    del x
    a = torch.randn(gemm_n, gemm_n)
    b = torch.randn(gemm_n, gemm_n)
    gemm = 2 * gemm_n ** 3 / _median_s(lambda: torch.mm(a, b), reps) / 1e9
    return {"read_GBps": read, "read_1thread_GBps": read1, "gemm_GFLOPs": gemm, "threads": n}


if __name__ == "__main__":
    print(json.dumps(_measure_here(int(sys.argv[1]) if len(sys.argv) > 1 else None)))
