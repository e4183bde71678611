"""Deterministic results (issue 22, docs/determinism.md), on the CPU and, where
a GPU is visible, on CUDA: with deterministic=True (the CPU's default; asked
for on CUDA) a request's logits rows have the same bits whatever else runs in
its steps, however its prompt is chunked or found in the prefix cache, after
preemption by recompute, with n > 1, with any number of threads (CPU) and
with CUDA graphs on or off. Reference: the request alone in a fresh Runtime.
The rows compared are those of its generated positions (the engine reports
each position's row once: the last max_tokens rows), bit for bit.

deterministic=False keeps the summation orders that differ between a decode
step and a prefill tile; the tests that can fail show it does fail there.
The CUDA cases are skipped without a GPU (CI has none); tools/gpu_check.sh
det runs them on the GPU machine, with the 8B shape's end-to-end case."""
from __future__ import annotations

import os

import numpy as np
import pytest

import pagedrt
from pagedrt import _testing
from pagedrt import _core
from conftest import finished_events

MAX_TOKENS = 12
# SmolLM2's KV bytes a block (30 layers, K and V, 3 kv heads x 64, 16 tokens) per activation byte
BLOCK_BYTES_PER_ELEM = 30 * 2 * 3 * 64 * 16


def prompts_for(seed: int, count: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 40000, size=int(n)).tolist() for n in rng.integers(20, 70, size=count)]


def gather(rt, requests, target: int) -> tuple[list[np.ndarray], list[list[int]], object]:
    """Submits every (prompt, params) at once; returns the target's logits rows
    of its generated positions and its tokens, per choice index, and the
    Runtime's stats. (Forks report from the position after the prompt: the
    prompt's last row, which sampled their first tokens, is choice 0's.)"""
    ids = [rt.submit(p, by_id=True, **params) for p, params in requests]
    rows: dict[int, list] = {}
    tokens: dict[int, list] = {}
    for ev in finished_events(rt, ids):
        assert ev.error is None, ev.error
        if ev.request_id == ids[target]:
            if ev.logits is not None:
                rows.setdefault(ev.index, []).append(np.asarray(ev.logits))
            tokens.setdefault(ev.index, []).extend(ev.token_ids)
    out = [np.concatenate(rows[i])[-MAX_TOKENS:] for i in sorted(rows)]
    return out, [tokens[i] for i in sorted(tokens)], rt.stats()


def target_params(**kw):
    return {"max_tokens": MAX_TOKENS, "ignore_eos": True, "return_logits": True, **kw}


def neighbour_params(rng):
    if rng.random() < 0.5:
        return dict(max_tokens=int(rng.integers(1, 20)), ignore_eos=True, temperature=0.0)
    return dict(max_tokens=int(rng.integers(1, 20)), ignore_eos=True, temperature=1.0, seed=int(rng.integers(1 << 30)))


def in_company(rt, prompt, params, seed: int, neighbours: int = 7, prefix_of_target: bool = False):
    """The target among random neighbours, submitted in a random order; with
    prefix_of_target one neighbour shares the target's first 48 tokens (three
    cached blocks for the target when it comes later)."""
    rng = np.random.default_rng(seed)
    reqs = [(p, neighbour_params(rng)) for p in prompts_for(seed + 1, neighbours)]
    if prefix_of_target:
        reqs[0] = (prompt[:48] + reqs[0][0][:10], reqs[0][1])
    pos = int(rng.integers(1 if prefix_of_target else 0, len(reqs) + 1))
    reqs.insert(pos, (prompt, params))
    return gather(rt, reqs, pos)


_CUDA = pytest.mark.skipif(not _core.cuda_available(), reason="no CUDA GPU visible")
DEVICES = ["cpu", pytest.param("cuda", marks=_CUDA)]


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def dtype(request):
    return request.param


def runtime(smol, dtype, device="cpu", **kw):
    kw.setdefault("deterministic", True)  # CUDA's default is False
    return pagedrt.Runtime(smol, device=device, dtype=dtype, activation_dtype=dtype, progress=False, **kw)


@pytest.mark.parametrize("sampled", [False, True])
def test_logits_rows_do_not_depend_on_the_batch(smol, device, dtype, sampled):
    """Neighbours, a chunk budget of 8 tokens, a small KV pool that forces
    preemptions, a cached prefix, one thread (CPU) or no CUDA graphs (CUDA):
    each against the request alone."""
    prompt = prompts_for(7, 1)[0] + prompts_for(8, 1)[0]  # 40 .. 140 tokens
    params = target_params(temperature=0.8, seed=1234) if sampled else target_params(temperature=0.0)
    with runtime(smol, dtype, device, enable_prefix_caching=False) as rt:
        alone, alone_tokens, _ = gather(rt, [(prompt, params)], 0)
    elem = 2 if dtype == "bfloat16" else 4
    cases = {
        "neighbours": (dict(), {}),
        "chunks of 8": (dict(max_num_batched_tokens=8), {}),
        "preemption": (dict(kv_cache_bytes=14 * BLOCK_BYTES_PER_ELEM * elem, max_num_batched_tokens=64), {}),
        "one thread": (dict(num_threads=1), {}),
    }
    if device == "cuda":  # threads split no reduction on the GPU; graphs replay the same kernels, or should
        del cases["one thread"]
        cases["no CUDA graphs"] = (dict(), {"PAGEDRT_CUDA_GRAPHS": "0"})
    for name, (options, env) in cases.items():
        with pytest.MonkeyPatch.context() as mp:  # the CUDA backend reads PAGEDRT_CUDA_GRAPHS when it starts
            for name_, value in env.items():
                mp.setenv(name_, value)
            rt = runtime(smol, dtype, device, **options)
        with rt:
            rows, tokens, stats = in_company(rt, prompt, params, seed=len(name),
                                             neighbours=11 if name == "preemption" else 7)
            if name == "preemption":
                assert stats.num_preemptions > 0, "the pool was meant to force preemptions"
        assert tokens == alone_tokens, name
        assert np.array_equal(rows[0], alone[0]), f"{name}: {np.count_nonzero(rows[0] != alone[0])} logits differ"
    with runtime(smol, dtype, device) as rt:  # the first request leaves three blocks of the target's prompt cached
        rows, tokens, _ = in_company(rt, prompt, params, seed=99, prefix_of_target=True)
        assert tokens == alone_tokens
        assert np.array_equal(rows[0], alone[0]), "prefix cache hit"


def test_forks_match_the_request_alone(smol, device, dtype):
    """n = 3 greedy choices share the prompt's blocks (copy-on-write): each
    choice's rows equal the single request's."""
    prompt = prompts_for(11, 1)[0]
    with runtime(smol, dtype, device) as rt:
        alone, _, _ = gather(rt, [(prompt, target_params(temperature=0.0))], 0)
        forks, _, _ = in_company(rt, prompt, target_params(temperature=0.0, n=3), seed=5)
    assert len(forks) == 3
    assert np.array_equal(forks[0], alone[0])
    for i in (1, 2):
        assert len(forks[i]) == MAX_TOKENS - 1
        assert np.array_equal(forks[i], alone[0][1:]), f"choice {i}"


@pytest.mark.parametrize("deterministic", [True, False])
def test_decode_row_equals_prefill_row(smol, device, deterministic):
    """The logits of a position computed in a decode step (one token a
    sequence) against the same position computed as the last row of a prompt
    (a prefill tile): equal bits with deterministic=True; with False the
    prefill tile sums each score in another order (and on CUDA another
    kernel runs each GEMM of one row), and some rows differ (the comparison
    can fail)."""
    prompt = prompts_for(3, 1)[0]
    differ = 0
    with runtime(smol, "bfloat16", device, enable_prefix_caching=False, deterministic=deterministic) as rt:
        assert rt.model_info.deterministic is deterministic
        rows, tokens, _ = gather(rt, [(prompt, target_params(temperature=0.0))], 0)
        for j in range(1, 6):
            again, _, _ = gather(rt, [(prompt + tokens[0][:j], target_params(temperature=0.0, max_tokens=1))], 0)
            differ += not np.array_equal(again[0][-1], rows[0][j])
    if deterministic:
        assert differ == 0
    else:
        assert differ > 0, "deterministic=False was expected to give different bits somewhere"


def test_deterministic_defaults_and_refusals(smol):
    """The CPU's default is on, but off for bf16 where the processor has AMX
    (deterministic=False multiplies larger steps on AMX tiles); CUDA's off, on
    where asked. CUDA refuses it with fp8 weights, an fp8 cache and tensor
    parallelism, naming each (checked before any GPU is touched, so a CPU-only
    build says so too)."""
    amx = _testing._gemm_amx_for_large_steps()
    for dtype, on in (("float32", True), ("bfloat16", not amx)):
        with pagedrt.Runtime(smol, device="cpu", dtype=dtype, activation_dtype=dtype, progress=False) as rt:
            assert rt.model_info.deterministic is on, dtype
    with pagedrt.Runtime(smol, device="cpu", dtype="bfloat16", deterministic=True, progress=False) as rt:
        assert rt.model_info.deterministic is True
    for options, named in ((dict(quantization="fp8"), "quantization 'fp8'"),
                           (dict(kv_cache_dtype="fp8"), "kv_cache_dtype 'fp8'"),
                           (dict(tensor_parallel_size=2), "tensor_parallel_size 2")):
        with pytest.raises(pagedrt.Unsupported, match=f"deterministic=True with {named} on device 'cuda'"):
            pagedrt.Runtime(smol, device="cuda", deterministic=True, progress=False, **options)
    if _core.cuda_available():
        with pagedrt.Runtime(smol, device="cuda", progress=False) as rt:
            assert rt.model_info.deterministic is False
        with pagedrt.Runtime(smol, device="cuda", deterministic=True, progress=False) as rt:
            assert rt.model_info.deterministic is True


def concurrent_against_alone(model, device, dtype, kv_cache_bytes, count=18, max_tokens=16):
    """count greedy requests at once in a pool of kv_cache_bytes (small enough
    to preempt): the tokens each gives, and each one's tokens alone."""
    prompts = prompts_for(21, count)
    with runtime(model, dtype, device, enable_prefix_caching=False) as rt:
        alone = [rt.generate([p], max_tokens=max_tokens, ignore_eos=True, temperature=0.0)[0].outputs[0].token_ids
                 for p in prompts]
    with runtime(model, dtype, device, kv_cache_bytes=kv_cache_bytes, max_num_batched_tokens=128) as rt:
        together = rt.generate(prompts, max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        assert rt.stats().num_preemptions > 0, "the pool was meant to force preemptions"
    return [c.outputs[0].token_ids for c in together], alone


def test_concurrent_greedy_requests_under_preemption_match_alone(smol, device, dtype):
    """18 greedy requests at once in a pool small enough to preempt: each gives
    exactly the tokens it gives alone (issue 22's end-to-end check)."""
    elem = 2 if dtype == "bfloat16" else 4
    together, alone = concurrent_against_alone(smol, device, dtype, 20 * BLOCK_BYTES_PER_ELEM * elem)
    assert together == alone


@_CUDA
@pytest.mark.skipif(not os.environ.get("PAGEDRT_LLAMA8B_DIR"), reason="PAGEDRT_LLAMA8B_DIR not set")
def test_concurrent_greedy_requests_on_the_8b_shape_match_alone():
    """The same on the Llama-3-8B shape (random bf16 weights: tools/make_random_llama.py;
    32 layers, 8 kv heads of 128, 16-token blocks), on the GPU: 18 requests in 24 blocks."""
    block_bytes = 32 * 2 * 8 * 128 * 16 * 2
    together, alone = concurrent_against_alone(os.environ["PAGEDRT_LLAMA8B_DIR"], "cuda", "bfloat16",
                                               24 * block_bytes)
    assert together == alone


_PROCESS_SCRIPT = """
import hashlib, sys
import numpy as np
import pagedrt
model, threads, order, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = np.random.default_rng(5)
prompts = [rng.integers(100, 40000, size=int(n)).tolist() for n in rng.integers(20, 70, size=6)]
if order == "reversed":
    prompts = prompts[::-1]
with pagedrt.Runtime(model, device=device, num_threads=threads, deterministic=True, progress=False) as rt:
    outs = rt.generate(prompts, max_tokens=10, ignore_eos=True, temperature=0.0, logprobs=5)
by_prompt = {tuple(c.prompt_token_ids): c.outputs[0] for c in outs}
h = hashlib.sha256()
for p in sorted(by_prompt):
    o = by_prompt[p]
    h.update(np.array(o.token_ids, np.int32).tobytes())
    h.update(np.array([lp.logprob for lp in o.logprobs], np.float32).tobytes())
print(h.hexdigest())
"""


def test_results_reproduce_across_processes(smol, device):
    """The greedy tokens and logprobs of six requests, computed in four
    processes (2 threads; 1 thread; the requests in reverse order; 2 threads
    on libgomp's regions instead of pagedrt's own team, PAGEDRT_CPU_TEAM=omp):
    the same sha256 each time."""
    import os
    import subprocess
    import sys
    digests = set()
    for threads, order, team in ((2, "given", "team"), (1, "given", "team"), (2, "reversed", "team"),
                                 (2, "given", "omp")):
        out = subprocess.run([sys.executable, "-c", _PROCESS_SCRIPT, str(smol), str(threads), order, device],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "PAGEDRT_CPU_TEAM": team})
        assert out.returncode == 0, out.stderr[-2000:]
        digests.add(out.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests
