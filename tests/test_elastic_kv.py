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
        assert rt.stats().kv_mapped_bytes == grown


def test_elastic_pool_options_are_checked(tiny_llama):
    path, _ = tiny_llama()
    with pytest.raises(pagedrt.InvalidArgument, match="kv_idle_release_s must be in \\[0, 1e6\\]"):
        pagedrt.Runtime(path, device="cpu", kv_idle_release_s=-1.0)
    with pagedrt.Runtime(path, device="cpu", kv_cache_bytes=1 << 20, kv_idle_release_s=0.0) as rt:
        assert rt.stats().kv_mapped_bytes == rt.stats().kv_cache_bytes  # one chunk: the whole pool
