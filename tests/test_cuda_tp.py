"""Tensor parallelism on CUDA, a GPU a rank over NCCL (issue 24,
docs/tensor_parallel.md). Marked `cuda` and skipped where fewer than two GPUs
are visible (CI, the single-GPU machine); tools/gpu_check.sh's `tp` stage
runs it on a multi-GPU machine.

Tolerances: the fp32 validation mode (dtype="float32") sums the ranks' fp32
partials, so TP = N gives TP = 1's greedy tokens and logits within 1e-4
(relative); bf16 rounds each rank's partial sums before the all-reduce, so
the 8B shape's prompt logits are compared at 2e-2."""
from __future__ import annotations

import os

import numpy as np
import pytest

import pagedrt
from conftest import run_all
from pagedrt import _core
from test_cuda import rel_err

GPUS = _core.cuda_device_count()

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(GPUS < 2, reason=f"tensor parallelism on CUDA needs 2+ GPUs ({GPUS} visible)")]

SIZES = [n for n in (2, 4, 8) if n <= GPUS]


@pytest.mark.parametrize("tp", SIZES)
def test_fp32_tokens_and_logits_equal_tp1(tiny_llama, tp):
    path, _ = tiny_llama(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512,
                         vocab_size=330)
    rng = np.random.default_rng(tp)
    prompts = [rng.integers(3, 330, size=int(n)).tolist() for n in (7, 40, 90, 150)]
    got = {}
    for size in (1, tp):
        with pagedrt.Runtime(path, device="cuda", dtype="float32", tensor_parallel_size=size) as rt:
            assert rt.model_info.tensor_parallel_size == size
            got[size] = run_all(rt, prompts, max_tokens=24, ignore_eos=True, return_logits=True)
            assert rt.stats().blocks_used == 0
    for (t1, l1), (tn, ln) in zip(got[1], got[tp]):
        assert tn == t1
        assert rel_err(ln, l1) <= 1e-4


def test_bf16_batch_and_preemption(tiny_llama):
    """bf16 with CUDA graphs (decode steps recorded with their NCCL calls),
    64 requests in a pool small enough to preempt: every request finishes
    with max_tokens tokens and the pool is whole after."""
    path, _ = tiny_llama(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 320, size=int(rng.integers(10, 120))).tolist() for _ in range(64)]
    with pagedrt.Runtime(path, device="cuda", tensor_parallel_size=2, kv_cache_bytes=2 << 20) as rt:
        outs = run_all(rt, prompts, max_tokens=32, ignore_eos=True)
        stats = rt.stats()
    assert all(len(t) == 32 for t, _ in outs)
    assert stats.num_preemptions > 0 and stats.blocks_used == 0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PAGEDRT_LLAMA8B_DIR"), reason="PAGEDRT_LLAMA8B_DIR not set")
def test_llama3_8b_shape_tp2_logits():
    path = os.environ["PAGEDRT_LLAMA8B_DIR"]
    rng = np.random.default_rng(8)
    prompt = rng.integers(0, 128000, size=200).tolist()
    got = {}
    for size in (1, 2):
        with pagedrt.Runtime(path, device="cuda", tensor_parallel_size=size, kv_cache_bytes=4 << 30) as rt:
            [(_, logits)] = run_all(rt, [prompt], max_tokens=1, ignore_eos=True, return_logits=True)
            got[size] = logits
    assert rel_err(got[2], got[1]) <= 2e-2


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PAGEDRT_LLAMA70B_DIR"), reason="PAGEDRT_LLAMA70B_DIR not set")
@pytest.mark.skipif(GPUS < 4, reason="the 70B shape (141 GB of bf16) needs 4+ GPUs")
def test_llama3_70b_shape_loads_and_runs():
    path = os.environ["PAGEDRT_LLAMA70B_DIR"]
    tp = 8 if GPUS >= 8 else 4
    rng = np.random.default_rng(70)
    with pagedrt.Runtime(path, device="cuda", tensor_parallel_size=tp, max_num_seqs=64) as rt:
        outs = run_all(rt, [rng.integers(0, 128000, size=128).tolist() for _ in range(16)], max_tokens=8,
                       ignore_eos=True)
        assert all(len(t) == 8 for t, _ in outs)
        assert rt.stats().blocks_used == 0


def test_devices_choose_the_ranks_gpus(tiny_llama):
    """devices=[...]: the ranks run on the GPUs named, in that order; a GPU
    not visible or named twice is an error naming it."""
    path, _ = tiny_llama(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512)
    pick = [GPUS - 1, 0]
    with pagedrt.Runtime(path, device="cuda", dtype="float32", tensor_parallel_size=2, devices=pick) as rt:
        assert rt.model_info.devices == pick
        [(toks, _)] = run_all(rt, [[5, 6, 7, 8]], max_tokens=8, ignore_eos=True)
    with pagedrt.Runtime(path, device="cuda", dtype="float32") as rt:
        assert rt.model_info.devices == [0]
        [(ref, _)] = run_all(rt, [[5, 6, 7, 8]], max_tokens=8, ignore_eos=True)
    assert toks == ref
    with pagedrt.Runtime(path, device="cuda", dtype="float32", devices=[GPUS - 1]) as rt:  # one rank, not GPU 0
        assert rt.model_info.devices == [GPUS - 1]
        [(one, _)] = run_all(rt, [[5, 6, 7, 8]], max_tokens=8, ignore_eos=True)
    assert one == ref
    with pytest.raises(pagedrt.InvalidArgument, match=f"devices\\[1\\] is GPU {GPUS}; {GPUS} visible"):
        pagedrt.Runtime(path, device="cuda", tensor_parallel_size=2, devices=[0, GPUS])
    with pytest.raises(pagedrt.InvalidArgument, match="devices names GPU 0 twice"):
        pagedrt.Runtime(path, device="cuda", tensor_parallel_size=2, devices=[0, 0])


@pytest.mark.skipif(GPUS >= 8, reason="every size up to 8 has its GPUs here")
def test_more_ranks_than_gpus(tiny_llama):
    path, _ = tiny_llama(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512)
    with pytest.raises(pagedrt.InvalidArgument, match=f"tensor_parallel_size 8 needs 8 GPUs; {GPUS} visible"):
        pagedrt.Runtime(path, device="cuda", tensor_parallel_size=8)
