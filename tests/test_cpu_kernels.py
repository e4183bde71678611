"""Every CPU GEMM variant this build can run (scalar, avx2, avx512, avx512bf16)
against a float64 reference, over odd sizes (not multiples of the vector width,
tiny and large), with fp32 x fp32, fp32 x bf16 and bf16 x bf16 operands.
Tolerance: relative error <= 1e-5 (fp32 sums); for bf16 x bf16 also the
fp32-summation bound per element (see test_gemm_bf16_bf16_matches_reference)."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pagedrt
from pagedrt import _testing

VARIANTS = _testing._gemm_variants()
KNOWN = ["scalar", "avx2", "avx512", "avx512bf16", "amx"]  # narrowest first
SIZES = [(1, 1, 1), (1, 7, 5), (3, 33, 9), (5, 100, 15), (4, 16, 64), (17, 65, 130), (2, 300, 577), (33, 70, 8)]


def bf16_bits(x):
    """Round-to-nearest-even float32 -> bf16 bit patterns (uint16), and their float32 values."""
    u = x.astype(np.float32).view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def test_the_scalar_variant_is_always_there():
    assert "scalar" in VARIANTS and _testing._gemm_variant() in VARIANTS


@pytest.fixture(params=["l1", "l2"])
def prefetch(request):
    """The decode kernels' prefetch hint (backend/cpu/gemm.hpp: calibrated per
    process in the engine; set here in the test module's copy): a hint, so
    the results must not depend on it."""
    _testing._set_prefetch(request.param)
    yield request.param
    _testing._set_prefetch("l1")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,m,k", SIZES)
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_gemm_matches_reference(variant, n, m, k, weights, prefetch):
    rng = np.random.default_rng(n * 1000 + m * 10 + k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = rng.standard_normal((m, k)).astype(np.float32)
    if weights == "bfloat16":
        w_arg, w_val = bf16_bits(w)
    else:
        w_arg, w_val = w, w
    ref = x.astype(np.float64) @ w_val.astype(np.float64).T
    for threads in (1, 2):
        y = _testing._gemm(x, w_arg, variant, threads)
        assert y.shape == (n, m)
        err = np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)
        assert err <= 1e-5, (variant, weights, threads, err)


def test_variants_agree_closely():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 257)).astype(np.float32)
    w = rng.standard_normal((129, 257)).astype(np.float32)
    outs = [_testing._gemm(x, w, v, 2) for v in VARIANTS]
    for a, b in itertools.combinations(outs, 2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_variant_is_an_error():
    x = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="not available"):
        _testing._gemm(x, x, "avx9000", 1)


# n: every token-tile remainder (the dpbf16 tile is 4 tokens) and more than one tile;
# k: below, at and above the 16 and 32 element vector widths, and the model's 576, 1536 + 8.
BF16_N = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 33]
BF16_MK = [(1, 1), (5, 7), (3, 31), (7, 33), (9, 100), (13, 576), (35, 1544)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", BF16_N)
@pytest.mark.parametrize("m,k", BF16_MK)
def test_gemm_bf16_bf16_matches_reference(variant, n, m, k, prefetch):
    """bf16 x and W: every product of two bf16 values is exact in fp32 (8 + 8
    significand bits), so the only error is that of the fp32 additions, in any
    order: |y - ref| <= k * 2**-24 * (|x| @ |W|^T) per element (the gamma_k
    bound, a little slack for the (1 - k u) denominator). VDPBF16PS (avx512bf16)
    rounds to nearest even like FMA and flushes denormals, which these inputs do
    not have. On top, the relative error of the whole output is <= 1e-5 as for
    the other GEMMs (typical fp32 error grows like sqrt(k) * 2**-24)."""
    rng = np.random.default_rng(n * 100003 + m * 101 + k)
    x_bits, x_val = bf16_bits(rng.standard_normal((n, k)))
    w_bits, w_val = bf16_bits(rng.standard_normal((m, k)))
    x64, w64 = x_val.astype(np.float64), w_val.astype(np.float64)
    ref = x64 @ w64.T
    bound = 1.01 * k * 2.0**-24 * (np.abs(x64) @ np.abs(w64).T)
    for threads in (1, 2):
        y = _testing._gemm(x_bits, w_bits, variant, threads)
        assert y.shape == (n, m) and y.dtype == np.float32
        assert np.all(np.abs(y - ref) <= bound), (variant, threads, np.max(np.abs(y - ref) - bound))
        err = np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)
        assert err <= 1e-5, (variant, threads, err)


def test_gemm_bf16_bf16_equals_the_fp32_path_on_widened_x():
    """The converting variants widen x exactly, so they give bit for bit what
    their fp32-activation GEMM gives on the widened x."""
    rng = np.random.default_rng(7)
    x_bits, x_val = bf16_bits(rng.standard_normal((6, 130)))
    w_bits, _ = bf16_bits(rng.standard_normal((37, 130)))
    for variant in VARIANTS:
        if variant in ("avx512bf16", "amx"):
            continue  # their own kernels: other summation orders
        np.testing.assert_array_equal(_testing._gemm(x_bits, w_bits, variant, 1), _testing._gemm(x_val, w_bits, variant, 1))


@pytest.mark.parametrize("m,k", [(960, 576), (13, 64), (5, 32), (577, 1536), (1, 96)])  # rows: whole tasks, tails
def test_packed_weights_give_the_kernels_bits(m, k):
    """Linear weights packed at load (pack_bf16_rows: each task's 6 rows k
    chunk by k chunk, read front to back) multiply in the avx512bf16
    kernel's order: bit for bit its output on the unpacked rows, for steps of
    1 to 33 tokens (every token tile and tail), row counts off the 6-row
    task, on 1 and 2 threads. Where the processor's kernel does not pack,
    packs_bf16_rows says so and the hook refuses."""
    rng = np.random.default_rng(m * 7 + k)
    w_bits, _ = bf16_bits(rng.standard_normal((m, k)))
    if not _testing._packs_bf16_rows(k):
        assert _testing._gemm_variant() != "avx512bf16" or _testing._gemm_amx_for_large_steps() or \
            os.environ.get("PAGEDRT_CPU_PACK") == "0", "avx512bf16 alone, yet nothing packed"
        with pytest.raises(RuntimeError, match="packed"):
            _testing._gemm(bf16_bits(np.ones((1, k)))[0], w_bits, "packed", 1)
        pytest.skip(f"the {_testing._gemm_variant()} kernel packs no weights here")
    assert not _testing._packs_bf16_rows(k + 16), "k off the 32-element chunk packed"
    for n in (1, 2, 3, 4, 5, 8, 9, 33):
        x_bits, _ = bf16_bits(rng.standard_normal((n, k)))
        for threads in (1, 2):
            np.testing.assert_array_equal(_testing._gemm(x_bits, w_bits, "packed", threads),
                                          _testing._gemm(x_bits, w_bits, "avx512bf16", threads),
                                          err_msg=f"n={n} m={m} k={k} threads={threads}")


@pytest.mark.parametrize("tied", [False, True])
def test_a_model_with_packed_weights_gives_the_same_logits(tiny_llama, monkeypatch, tied):
    """A bf16 model's linear weights packed at load (the default where the
    avx512bf16 kernel runs without AMX) give bit for bit the logits of the
    same weights as stored (PAGEDRT_CPU_PACK=0): prompt and decode steps of
    several requests, qkv (128 rows), o (64), gate_up (160) and the lm head
    (320 rows, untied or the embedding's table: gathered from the packed
    order too, a row off its task's start among them) off the 6-row task,
    down's k = 80 not packed (off the 32-element chunk). deterministic=True:
    the same bits whatever the step's size."""
    from conftest import run_all
    if not _testing._packs_bf16_rows(64):
        pytest.skip(f"the {_testing._gemm_variant()} kernel packs no weights here")
    path, _ = tiny_llama(dtype="bfloat16", hidden_size=64, intermediate_size=80, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied)
    prompts = [[5, 9, 17, 33, 65, 129, 257, 6], [3, 40, 11] * 5, [300, 2, 77]]
    runs = {}
    for pack in ("1", "0"):
        monkeypatch.setenv("PAGEDRT_CPU_PACK", pack)
        with pagedrt.Runtime(path, device="cpu", dtype="bfloat16", num_threads=2, deterministic=True) as rt:
            runs[pack] = run_all(rt, prompts, max_tokens=6, ignore_eos=True, return_logits=True)
        assert _testing._packs_bf16_rows(64) == (pack == "1")
    for (tp, lp), (tu, lu) in zip(runs["1"], runs["0"]):
        assert tp == tu and lp.shape == lu.shape and lp.shape[1] == 320
        np.testing.assert_array_equal(lp, lu)


def test_bf16_activations_need_bf16_weights():
    x_bits, _ = bf16_bits(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="bf16 w"):
        _testing._gemm(x_bits, np.ones((3, 8), np.float32), "scalar", 1)


@pytest.mark.parametrize("variant", [v for v in KNOWN if v not in VARIANTS] + ["avx9000"])
def test_a_variant_that_is_not_available_raises(variant):
    x_bits, _ = bf16_bits(np.ones((1, 4), np.float32))
    for x, w in ((x_bits, x_bits), (np.ones((1, 4), np.float32), x_bits)):
        with pytest.raises(ValueError, match="not available"):
            _testing._gemm(x, w, variant, 1)


def test_the_widest_variant_is_chosen_and_the_environment_forces_one():
    """The widest variant but amx (its batch-1 decode is slower; gemm_amx.cpp)
    unless the environment names one."""
    assert VARIANTS == [v for v in KNOWN if v in VARIANTS]
    code = "from pagedrt import _testing; print(_testing._gemm_variant())"
    env = {k: v for k, v in os.environ.items() if k != "PAGEDRT_CPU_KERNEL"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == [v for v in VARIANTS if v != "amx"][-1]
    for forced in ["scalar"] + [v for v in VARIANTS if v == "amx"]:
        out = subprocess.run([sys.executable, "-c", code], env={**env, "PAGEDRT_CPU_KERNEL": forced},
                             capture_output=True, text=True, check=True)
        assert out.stdout.split()[-1] == forced


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_rows_bits_do_not_depend_on_the_batch(variant):
    """bf16 x bf16 (the model's GEMMs): each row of y is bitwise the same
    computed alone, in a batch of 2 .. 40 rows, at any place in it, with 1 or
    2 threads; at shapes amx tiles (k % 32 == 0, m % 16 == 0) and shapes it
    leaves to avx512bf16."""
    rng = np.random.default_rng(11)
    for m, k in [(64, 576), (48, 1536), (40, 96), (33, 100)]:
        x_bits, _ = bf16_bits(rng.standard_normal((40, k)))
        w_bits, _ = bf16_bits(rng.standard_normal((m, k)) * 0.05)
        alone = np.concatenate([_testing._gemm(x_bits[i:i + 1].copy(), w_bits, variant, 1) for i in range(40)])
        for n in (2, 5, 16, 17, 33, 40):
            for threads in (1, 2):
                start = (n * 7) % (40 - n + 1)
                y = _testing._gemm(x_bits[start:start + n].copy(), w_bits, variant, threads)
                np.testing.assert_array_equal(y, alone[start:start + n], err_msg=f"{variant} m={m} k={k} n={n}")


def test_any_order_gemm_takes_amx_tiles_from_five_tokens():
    """deterministic=False's bf16 GEMM: steps of 1-4 tokens give the chosen
    variant's bits, larger ones amx's where this processor has AMX (and the
    shape is one amx tiles), the chosen variant's elsewhere; amx's bits differ
    from avx512bf16's somewhere, so the comparison can tell them apart."""
    rng = np.random.default_rng(12)
    chosen = _testing._gemm_variant()
    tiles = _testing._gemm_amx_for_large_steps()
    assert tiles == ("amx" in VARIANTS and chosen == "avx512bf16")
    differ = 0
    for m, k in [(64, 576), (40, 96)]:
        x_bits, _ = bf16_bits(rng.standard_normal((33, k)))
        w_bits, _ = bf16_bits(rng.standard_normal((m, k)) * 0.05)
        for n in (1, 4, 5, 16, 33):
            y = _testing._gemm(x_bits[:n].copy(), w_bits, "any_order", 2)
            amx = tiles and n >= 5 and k % 32 == 0 and m % 16 == 0
            want = _testing._gemm(x_bits[:n].copy(), w_bits, "amx" if amx else chosen, 2)
            np.testing.assert_array_equal(y, want, err_msg=f"m={m} k={k} n={n}")
            if amx:
                differ += not np.array_equal(y, _testing._gemm(x_bits[:n].copy(), w_bits, chosen, 2))
    if tiles:
        assert differ > 0, "amx was expected to sum in another order than " + chosen


@pytest.mark.skipif("amx" not in VARIANTS, reason="no AMX-BF16 here (or Linux refused this process the tile state)")
def test_amx_runtime_gives_a_requests_logits_whatever_the_batch(tmp_path):
    """PAGEDRT_CPU_KERNEL=amx, a bf16 model whose shapes amx tiles: a request's
    logits alone and beside seven others (its prefill and decode steps then
    hold 8 rows, its own in other tiles) are bitwise the same, as they are
    with avx512bf16 (deterministic=True: on a processor with AMX the default
    is False, which takes amx for the larger steps only)."""
    from conftest import make_tiny_llama
    path, _ = make_tiny_llama(tmp_path / "m", dtype="bfloat16", hidden_size=64, intermediate_size=128,
                              num_attention_heads=2, num_key_value_heads=1)
    code = ("import json, pagedrt, numpy as np\n"
            f"with pagedrt.Runtime({str(path)!r}, device='cpu', num_threads=2, deterministic=True) as rt:\n"
            "    kw = dict(max_tokens=6, temperature=0, ignore_eos=True, return_logits=True, by_id=True)\n"
            "    def run(others):\n"
            "        ids = [rt.submit([5, 9, 17, 33, 65, 129, 257, 6], **kw)]\n"
            "        ids += [rt.submit([3 + i, 40 + 7 * i, 11] * (i + 1), **kw) for i in range(others)]\n"
            "        rows, pending = [], set(ids)\n"
            "        while pending:\n"
            "            for ev in rt.poll(list(pending), timeout=1.0):\n"
            "                if ev.request_id == ids[0] and ev.logits is not None: rows.append(ev.logits)\n"
            "                if ev.request_finished: pending.discard(ev.request_id)\n"
            "        return np.concatenate(rows)\n"
            "    alone, busy = run(0), run(7)\n"
            "    same = alone.shape == busy.shape and bool(np.array_equal(alone, busy))\n"
            "    print(json.dumps([pagedrt._core.cpu_gemm_info().split(',')[0].split()[0], same, len(alone)]))\n")
    env = {k: v for k, v in os.environ.items() if k != "PAGEDRT_CPU_KERNEL"}
    runs = {}
    for kernel in ("amx", "avx512bf16"):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "PAGEDRT_CPU_KERNEL": kernel},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        runs[kernel] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["amx"][0] == "amx" and runs["amx"][1] and runs["amx"][2] > 8, runs["amx"]  # prompt and decode rows
    assert runs["avx512bf16"][1]


def _gemm_info_after_a_runtime(path, env):
    """_core.cpu_gemm_info() in a fresh process that made one CPU Runtime."""
    code = ("import pagedrt\n"
            f"with pagedrt.Runtime({str(path)!r}, device='cpu', num_threads=2): pass\n"
            "print(pagedrt._core.cpu_gemm_info())\n")
    clean = {k: v for k, v in os.environ.items() if k != "PAGEDRT_CPU_PREFETCH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**clean, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_prefetch_hint_is_calibrated_once_per_process(tmp_path):
    """The first CPU Runtime times the decode kernel with each hint over 64 MiB
    of weights and keeps the faster: the info line names both rates and the
    faster one's hint, and says "packed rows" where the kernel it timed was
    the packed one (the layout the weights will take: with PAGEDRT_CPU_PACK=0
    not); PAGEDRT_CPU_PREFETCH sets the hint without timing."""
    import re

    from conftest import make_tiny_llama
    path, _ = make_tiny_llama(tmp_path / "m")
    variant = _testing._gemm_variant()
    info = _gemm_info_after_a_runtime(path, {})
    packed = " (packed weights)" if _testing._packs_bf16_rows(32) else ""
    assert info.startswith(variant + packed + ", prefetch "), info
    if variant == "scalar":
        return
    calibrated = r"prefetch (l1|l2) \(calibrated: l2 ([0-9.]+) GB/s, l1 ([0-9.]+) GB/s, 2 threads(, packed rows)?\)"
    m = re.search(calibrated, info)
    assert m, info
    l2, l1 = float(m.group(2)), float(m.group(3))
    assert (m.group(1) == ("l2" if l2 > l1 else "l1") or l1 == l2) and min(l1, l2) > 0
    assert bool(m.group(4)) == bool(packed), info
    if packed:
        unpacked = _gemm_info_after_a_runtime(path, {"PAGEDRT_CPU_PACK": "0"})
        m = re.search(calibrated, unpacked)
        assert m and not m.group(4), unpacked
    for hint in ("l1", "l2"):
        assert _gemm_info_after_a_runtime(path, {"PAGEDRT_CPU_PREFETCH": hint}).endswith(
            f"prefetch {hint} (PAGEDRT_CPU_PREFETCH)")


def test_the_prefetch_hint_is_re_tuned_on_decode_calls(tmp_path):
    """After calibrating, the decode GEMMs are timed in windows of 256 calls
    and the other hint tried now and then (backend/cpu/prefetch_tuner.hpp;
    its choices are checked on simulated rates in
    cpp/tests/test_prefetch_tuner.cpp): a process that decoded 64 tokens of a
    tiny model (a few GEMMs a token) has counted windows; PAGEDRT_CPU_PREFETCH_RETUNE=0
    keeps the calibrated hint untimed; =1 re-tunes from a hint that was set."""
    import re

    from conftest import make_tiny_llama
    if _testing._gemm_variant() == "scalar":
        pytest.skip("the scalar kernel has no prefetch hint")
    path, _ = make_tiny_llama(tmp_path / "m")
    code = ("import pagedrt\n"
            f"with pagedrt.Runtime({str(path)!r}, device='cpu', num_threads=2) as rt:\n"
            "    rt.generate([[5, 9, 17]], max_tokens=64, ignore_eos=True, temperature=0)\n"
            "print(pagedrt._core.cpu_gemm_info())\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAGEDRT_CPU_PREFETCH")}

    def info(env):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**clean, **env})
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    m = re.search(r"\(calibrated: .*\); re-tuned ([0-9]+) times in ([0-9]+) windows, now (l1|l2)$", info({}))
    assert m and int(m.group(2)) >= 2 and int(m.group(1)) <= int(m.group(2)), m
    off = info({"PAGEDRT_CPU_PREFETCH_RETUNE": "0"})
    assert "(calibrated: " in off and "re-tuned" not in off, off
    forced = info({"PAGEDRT_CPU_PREFETCH": "l1", "PAGEDRT_CPU_PREFETCH_RETUNE": "1"})
    assert re.search(r"prefetch l1 \(PAGEDRT_CPU_PREFETCH\); re-tuned [0-9]+ times in [0-9]+ windows, now (l1|l2)$",
                     forced), forced
    assert info({"PAGEDRT_CPU_PREFETCH": "l2"}).endswith("prefetch l2 (PAGEDRT_CPU_PREFETCH)")


def test_default_threads_follow_the_affinity_mask():
    """The CPU backend's default thread count is the processors the process
    may run on (its affinity mask, as a container or taskset sets it), not
    the machine's: a process restricted to one core runs its ops on one
    thread, one on every core on them all (backend/team.hpp's host_processors)."""
    code = ("import os, sys\n"
            "if sys.argv[1] == '1': os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "from pagedrt import _testing\n"
            "print(_testing._Ops('cpu').host_threads(), len(os.sched_getaffinity(0)))\n")
    for one in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", code, one], capture_output=True, text=True, check=True).stdout
        threads, allowed = map(int, out.split())
        assert threads == allowed and (allowed == 1 or one == "0"), (one, out)
    assert allowed == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("case", ["v2", "v2_nested", "v2_parent", "v1", "v1_unlimited", "v1_container_root",
                                  "hybrid", "none"])
def test_cgroup_cpu_quota_caps_the_cores(tmp_path, case):
    """A cgroup CPU quota caps the cores the backend counts (host_processors:
    a container run with --cpus 2 on a large machine gets 2 threads, not one
    per core): quota / period rounded up, the smallest over the process's
    cgroup and its ancestors, v2 (cpu.max) or v1 (cpu.cfs_quota_us /
    cpu.cfs_period_us under the cpu controller's hierarchy), on fake
    /proc/self/cgroup files and cgroup trees."""
    def put(rel, text):
        f = tmp_path / "fs" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    proc, want = {
        "v2": ("0::/\n", 2), "v2_nested": ("0::/a/b\n", 1), "v2_parent": ("0::/a/c\n", 3),
        "v1": ("5:cpuacct,cpu:/docker/x\n", 3), "v1_unlimited": ("5:cpu,cpuacct:/docker/y\n", 0),
        "v1_container_root": ("5:cpu:/docker/z\n", 4), "hybrid": ("4:memory:/m\n3:cpu:/\n0::/\n", 2),
        "none": ("0::/\n", 0)}[case]
    if case == "v2":
        put("cpu.max", "200000 100000\n")
    elif case in ("v2_nested", "v2_parent"):
        put("a/cpu.max", "250000 100000\n")  # 2.5 CPUs: 3
        put("a/b/cpu.max", "50000 100000\n")
        put("a/c/cpu.max", "max 100000\n")
    elif case == "v1":
        put("cpuacct,cpu/docker/x/cpu.cfs_quota_us", "300000\n")
        put("cpuacct,cpu/docker/x/cpu.cfs_period_us", "100000\n")
    elif case == "v1_unlimited":
        put("cpu,cpuacct/docker/y/cpu.cfs_quota_us", "-1\n")
        put("cpu,cpuacct/docker/y/cpu.cfs_period_us", "100000\n")
    elif case == "v1_container_root":  # no cgroup namespace: the host's path, the container's cgroup at the mount
        put("cpu/cpu.cfs_quota_us", "400000\n")
        put("cpu/cpu.cfs_period_us", "100000\n")
    elif case == "hybrid":  # v2 mounted beside v1 without the cpu controller; v1's cpu hierarchy has the quota
        put("unified/cgroup.procs", "")
        put("cpu/cpu.cfs_quota_us", "150000\n")
        put("cpu/cpu.cfs_period_us", "100000\n")
    put("proc_cgroup", proc)
    assert _testing.cgroup_cpu_limit(str(tmp_path / "fs" / "proc_cgroup"), str(tmp_path / "fs")) == want
    if case == "none":
        assert _testing.cgroup_cpu_limit(str(tmp_path / "missing"), str(tmp_path)) == 0
        quota = _testing.cgroup_cpu_limit("/proc/self/cgroup", "/sys/fs/cgroup")  # this machine's own
        cores = len(os.sched_getaffinity(0))
        assert _testing.host_processors() == (min(cores, quota) if quota else cores)


def test_lent_threads_leave_cores_to_the_masks():
    """Backend::lend_threads (structured output's masks, filled beside the
    forward): a CPU backend on every core runs its ops on the cores less those
    lent, at least one, and on all of them again once lent 0; a negative lend
    counts as none."""
    cores = len(os.sched_getaffinity(0))
    ops = _testing._Ops("cpu")  # every core
    assert ops.host_threads() == cores
    ops.lend_threads(1)
    assert ops.host_threads() == max(1, cores - 1)
    ops.lend_threads(cores + 5)
    assert ops.host_threads() == 1
    ops.lend_threads(-3)
    assert ops.host_threads() == cores
    ops.lend_threads(0)
    assert ops.host_threads() == cores


def test_a_tensor_parallel_rank_lends_from_its_share_of_the_cores():
    """Backend::share_host: a rank of 2 counts half the cores as its own, so
    a lend shrinks its team within that half (without it, a team of half the
    cores would never shrink: the other half looks idle)."""
    cores = len(os.sched_getaffinity(0))
    ops = _testing._Ops("cpu")
    ops.share_host(2)
    half = max(1, cores // 2)
    assert ops.host_threads() == half
    ops.lend_threads(1)
    assert ops.host_threads() == max(1, half - 1)
    ops.lend_threads(0)
    assert ops.host_threads() == half
    ops.share_host(2)  # a share of all the cores, not of the share
    assert ops.host_threads() == half
