"""The elastic KV pool (RuntimeConfig::elastic_kv; backend/kv_memory.hpp,
engine/block_pool.hpp) through a whole Runtime on the CPU, where its chunks
are anonymous pages handed back with madvise: the same tokens as a pool taken
whole, memory mapped as blocks are needed and given back after
kv_idle_release_s without work. (The block-id equivalence itself:
test_block_manager.py; the CUDA pool: test_cuda.py.)"""
from __future__ import annotations

import time

import numpy as np
import pytest

import pagedrt


def _generate(rt, prompts):
    outs = rt.generate(prompts, pagedrt.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def test_elastic_pool_matches_a_whole_pool_and_gives_memory_back(tiny_llama, monkeypatch):
    """A 4 MiB pool in 256 KiB chunks: it starts with one chunk mapped, maps
    more as 16 long requests run (the same greedy tokens as elastic_kv=False),
    and 0.3 s after the work ends holds one chunk again; a second round maps
    again and gives the same tokens."""
    path, _ = tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 320, size=int(rng.integers(20, 90))).tolist() for _ in range(16)]
    monkeypatch.setenv("PAGEDRT_KV_CHUNK_BYTES", str(256 << 10))
    opts = dict(device="cpu", kv_cache_bytes=4 << 20, block_size=4, enable_prefix_caching=False)
    with pagedrt.Runtime(path, elastic_kv=False, **opts) as rt:
        want = _generate(rt, prompts)
        assert rt.stats().kv_mapped_bytes == rt.stats().kv_cache_bytes
    with pagedrt.Runtime(path, elastic_kv=True, kv_idle_release_s=0.3, **opts) as rt:
        s = rt.stats()
        first = s.kv_mapped_bytes
        assert 0 < first <= (256 << 10) * 2 and s.kv_cache_bytes >= 4 * first
        assert _generate(rt, prompts) == want
        grown = rt.stats().kv_mapped_bytes
        assert grown >= 3 * first
        deadline = time.monotonic() + 5.0
        while rt.stats().kv_mapped_bytes != first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.stats().kv_mapped_bytes == first
        assert rt.stats().blocks_free == rt.stats().num_blocks  # unmapped blocks count as free
        assert _generate(rt, prompts) == want
        # mapped again (how far ahead of the peak depends on how the requests met in steps: map_ahead)
        assert rt.stats().kv_mapped_bytes >= 3 * first


def test_elastic_pool_options_are_checked(tiny_llama):
    path, _ = tiny_llama()
    with pytest.raises(pagedrt.InvalidArgument, match="kv_idle_release_s must be in \\[0, 1e6\\]"):
        pagedrt.Runtime(path, device="cpu", kv_idle_release_s=-1.0)
    with pagedrt.Runtime(path, device="cpu", kv_cache_bytes=1 << 20, kv_idle_release_s=0.0) as rt:
        assert rt.stats().kv_mapped_bytes == rt.stats().kv_cache_bytes  # one chunk: the whole pool


def test_every_feature_on_a_pool_of_many_small_chunks(tiny_llama, monkeypatch):
    """Prefix hits, n = 3 forks (copy-on-write), beam search, n-gram
    speculation (rolled-back slots) and preemption by swap and by recompute,
    in a 128 KiB pool (64 blocks) of 16 KiB chunks given back between rounds: the same
    tokens as the pool taken whole. An unmapped chunk is PROT_NONE on the CPU,
    so a read or write of a block the pool has not mapped would fault here."""
    path, _ = tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(9)
    system = rng.integers(3, 320, size=24).tolist()
    prompts = [system + rng.integers(3, 320, size=int(rng.integers(5, 30))).tolist() for _ in range(10)]
    reqs = [
        (prompts, pagedrt.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)),  # ~10 x 20 blocks
        (prompts[4:6], pagedrt.SamplingParams(max_tokens=20, n=3, temperature=0.9, seed=3, ignore_eos=True)),
        (prompts[6:7], pagedrt.SamplingParams(max_tokens=12, beam_width=3, ignore_eos=True)),
        (prompts[7:10], pagedrt.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                               speculative="ngram", num_speculative_tokens=4)),
    ]

    def run(rt):
        outs = []
        for _ in range(2):
            for p, params in reqs:
                outs.append([[c.token_ids for c in o.outputs] for o in rt.generate(p, params)])
            time.sleep(0.3)  # an elastic pool gives its chunks back in between
        return outs, rt.stats()

    monkeypatch.setenv("PAGEDRT_KV_CHUNK_BYTES", str(16 << 10))
    for mode in ("swap", "recompute"):
        opts = dict(device="cpu", kv_cache_bytes=128 << 10, block_size=4, preemption_mode=mode, kv_idle_release_s=0.2)
        with pagedrt.Runtime(path, elastic_kv=False, **opts) as rt:
            want, _ = run(rt)
        with pagedrt.Runtime(path, elastic_kv=True, **opts) as rt:
            got, stats = run(rt)
        assert got == want
        assert stats.num_preemptions > 0 and stats.prefix_hits > 0 and stats.num_blocks == 64
        assert stats.kv_mapped_bytes == stats.kv_cache_bytes // 8  # given back to its first chunk


def test_elastic_pool_maps_a_step_ahead(tiny_llama, monkeypatch):
    """After each launch the engine maps chunks until a full step's blocks
    (max_num_batched_tokens / block_size) are mapped and free, so that the
    next prompt's blocks are there when it comes (BlockPool::map_ahead;
    PAGEDRT_KV_MAP_AHEAD=0 turns it off): one short request leaves that many
    blocks mapped beyond its own, none without; the same tokens either way."""
    path, _ = tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setenv("PAGEDRT_KV_CHUNK_BYTES", str(64 << 10))
    opts = dict(device="cpu", kv_cache_bytes=8 << 20, block_size=4, enable_prefix_caching=False,
                max_num_batched_tokens=512, kv_idle_release_s=0.0)
    prompt = np.random.default_rng(3).integers(3, 320, size=10).tolist()
    got = {}
    for ahead in ("1", "0"):
        monkeypatch.setenv("PAGEDRT_KV_MAP_AHEAD", ahead)
        with pagedrt.Runtime(path, **opts) as rt:
            s = rt.stats()
            per_block = s.kv_cache_bytes // s.num_blocks
            first = s.kv_mapped_bytes
            assert first < 128 * per_block  # one chunk of the pool mapped at start
            got[ahead] = (_generate(rt, [prompt]), rt.stats().kv_mapped_bytes)
    assert got["1"][0] == got["0"][0]
    assert got["1"][1] >= (512 // 4) * per_block, (got["1"][1], per_block)  # a step's 128 blocks at least
    assert got["0"][1] < 128 * per_block
