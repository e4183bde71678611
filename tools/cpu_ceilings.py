"""The host's ceilings for CPU speed figures, measured in the run that reports
them (PERFORMANCE.md: a figure holds as a fraction of the ceiling measured
with it): read bandwidth and fp32 GEMM rate, with torch's CPU kernels on every
core (torch is a test extra; without it the ceilings are None). In a process
of their own: torch's thread pool, left spinning in the benchmark's process,
halved pagedrt's decode rate there.

    from cpu_ceilings import measure
    c = measure()   # {"read_GBps": ..., "gemm_GFLOPs": ..., "threads": ...}
    python tools/cpu_ceilings.py   # the same, as JSON
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


def measure() -> dict:
    """The ceilings, measured in a child process."""
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout) if out.returncode == 0 else {"read_GBps": None, "gemm_GFLOPs": None,
                                                               "threads": None, "error": out.stderr[-500:]}


def _measure_here(read_bytes: int = 1 << 30, gemm_n: int = 2048, reps: int = 5) -> dict:
    """Read bandwidth: a sum over `read_bytes` of fp32 (far past the caches).
    GEMM rate: an n x n x n fp32 product. Medians of `reps` after a warm-up."""
    try:
        import torch
    except ImportError:
        return {"read_GBps": None, "gemm_GFLOPs": None, "threads": None}
    x = torch.ones(read_bytes // 4, dtype=torch.float32)
    read = read_bytes / _median_s(lambda: x.sum(), reps) / 1e9
    del x
    a = torch.randn(gemm_n, gemm_n)
    b = torch.randn(gemm_n, gemm_n)
    gemm = 2 * gemm_n ** 3 / _median_s(lambda: torch.mm(a, b), reps) / 1e9
    return {"read_GBps": read, "gemm_GFLOPs": gemm, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    print(json.dumps(_measure_here()))
