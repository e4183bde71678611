"""The host's ceilings for CPU speed figures, measured in the run that reports
them (PERFORMANCE.md: a figure holds as a fraction of the ceiling measured
with it): read bandwidth from one thread and from the run's thread count (a
streaming probe: a sum over far more memory than the caches hold), the same
at given working-set sizes (a model's weights, read again and again as
decode does: where they fit the last-level cache, as SmolLM2's 269 MB of bf16
do in a 300 MiB L3, decode reads them from there, not from DRAM), and the
fp32 GEMM rate, with torch's CPU kernels (torch is a test extra; without it
the ceilings are None). In a process of their own: torch's thread pool, left
spinning in the benchmark's process, halved pagedrt's decode rate there.

    from cpu_ceilings import measure
    c = measure(threads=2, working_sets=[269_000_000])
    # {"read_GBps": (2 threads, 1 GiB), "read_1thread_GBps": ..., "read_at_GBps": {"269000000": ...},
    #  "llc_bytes": ..., "gemm_GFLOPs": ..., "threads": 2}
    python tools/cpu_ceilings.py [THREADS [BYTES ...]]   # the same, as JSON (THREADS 0: every core)
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _median_s(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


UNMEASURED = {"read_GBps": None, "read_1thread_GBps": None, "read_at_GBps": {}, "llc_bytes": None,
              "gemm_GFLOPs": None, "threads": None}


def measure(threads: int | None = None, working_sets: list[int] = ()) -> dict:
    """The ceilings at `threads` threads (None: torch's default, every core),
    with the read bandwidth also at each working-set size in bytes, measured
    in a child process."""
    args = [str(threads or 0), *(str(int(b)) for b in working_sets)]
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout) if out.returncode == 0 else {**UNMEASURED, "error": out.stderr[-500:]}


def floor_GBps(ceilings: dict, weight_bytes: int) -> float | None:
    """The read rate a decode floor counts for weights of `weight_bytes`: the
    faster of the reads over 1 GiB and over a buffer of their size, where
    measured (a cache-sized probe that reads slower than the DRAM one, as on
    the H200 host's Xeon at 8 threads, is not a ceiling). None where
    unmeasured."""
    dram = (ceilings or {}).get("read_GBps")
    if not dram:
        return None
    return max(dram, (ceilings.get("read_at_GBps") or {}).get(str(int(weight_bytes)), 0.0))


def llc_bytes() -> int | None:
    """The size of CPU 0's last-level cache (Linux sysfs), or None."""
    sizes = []
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes) if sizes else None


def _measure_here(threads: int | None = None, working_sets: list[int] = (), read_bytes: int = 1 << 30,
                  gemm_n: int = 2048, reps: int = 5) -> dict:
    """Read bandwidth: a sum over `read_bytes` of fp32 (far past the caches),
    with 1 thread and with `threads`, and with `threads` over each working
    set (its sums repeated: what the caches hold of it stays there). GEMM
    rate: an n x n x n fp32 product with `threads`. Medians of `reps` after a
    warm-up."""
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
    read_at = {}
    for ws in working_sets:
        y = torch.ones(max(ws // 4, 1), dtype=torch.float32)
        read_at[str(ws)] = ws / _median_s(lambda: y.sum(), max(reps, 9)) / 1e9
        del y
    a = torch.randn(gemm_n, gemm_n)
    b = torch.randn(gemm_n, gemm_n)
    gemm = 2 * gemm_n ** 3 / _median_s(lambda: torch.mm(a, b), reps) / 1e9
    return {"read_GBps": read, "read_1thread_GBps": read1, "read_at_GBps": read_at, "llc_bytes": llc_bytes(),
            "gemm_GFLOPs": gemm, "threads": n}


if __name__ == "__main__":
    print(json.dumps(_measure_here(int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "0" else None,
                                   [int(b) for b in sys.argv[2:]])))
