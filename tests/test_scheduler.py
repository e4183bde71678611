"""Continuous batching end to end on a tiny model: 32 concurrent requests of
mixed lengths give the same greedy tokens as each request run alone, with a
pool small enough that preemption happens, chunked prefill on and off, prefix
caching on and off."""
from __future__ import annotations

import numpy as np
import pytest

import pagedrt

BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import make_tiny_llama
    path, _ = make_tiny_llama(tmp_path_factory.mktemp("sched") / "m", num_key_value_heads=2,
                              num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    return path


def block_bytes(rt_path):
    """Bytes of one KV block of this model (fp32, K and V, all layers)."""
    import json
    cfg = json.loads((rt_path / "config.json").read_text())
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    return BLOCK * cfg["num_key_value_heads"] * d * 4 * 2 * cfg["num_hidden_layers"]


@pytest.fixture(scope="module")
def workload():
    rng = np.random.default_rng(7)
    shared = rng.integers(3, 320, size=12).tolist()  # a prefix several requests share
    reqs = []
    for i in range(32):
        n = int(rng.integers(3, 40))
        body = rng.integers(3, 320, size=n).tolist()
        prompt = shared + body if i % 3 == 0 else body
        reqs.append((prompt, int(rng.integers(1, 24))))
    return reqs


def run_all(rt, reqs):
    ids = [rt.submit(p, max_tokens=m, ignore_eos=True, temperature=0) for p, m in reqs]
    out, done, preempted = {i: [] for i in ids}, set(), {}
    while len(done) < len(ids):
        for ev in rt.poll(timeout=1.0):
            out[ev.request_id] += ev.token_ids
            preempted[ev.request_id] = ev.num_preemptions
            if ev.finished:
                assert ev.finish_reason == "length", ev.error
                done.add(ev.request_id)
    return [out[i] for i in ids], preempted


@pytest.fixture(scope="module")
def alone(model, workload):
    """Each request on its own, in a roomy pool: the reference."""
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, enable_prefix_caching=False) as rt:
        return [run_all(rt, [r])[0][0] for r in workload]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prefill", "chunked-prefill"])
@pytest.mark.parametrize("prefix", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_concurrent_equals_alone_under_preemption(model, workload, alone, chunked, prefix):
    # 20 blocks of 4 tokens: far less than 32 requests need at once, more than any one needs.
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=20 * block_bytes(model),
                         max_num_batched_tokens=16 if chunked else 2048,
                         enable_prefix_caching=prefix) as rt:
        assert rt.stats().num_blocks == 20
        got, preempted = run_all(rt, workload)
        stats = rt.stats()
    assert got == alone
    assert stats.num_preemptions > 0 and max(preempted.values()) > 0
    assert stats.blocks_used == 0 and stats.blocks_free == 20   # nothing leaked
    if prefix:
        assert stats.prefix_hits > 0 and stats.blocks_cached_free > 0
    else:
        assert stats.prefix_hits == 0 and stats.blocks_cached_free == 0


def test_shared_prefix_is_computed_once(model):
    rng = np.random.default_rng(3)
    system = rng.integers(3, 320, size=40).tolist()                # 10 full blocks
    prompts = [system + rng.integers(3, 320, size=5).tolist() for _ in range(6)]
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK) as rt:
        first = rt.generate([prompts[0]], max_tokens=4, ignore_eos=True, temperature=0)[0]
        rest = rt.generate(prompts[1:], max_tokens=4, ignore_eos=True, temperature=0)
        s = rt.stats()
    assert s.prefix_hits == 5 * 40              # every later request found the 40 system tokens
    assert s.prompt_tokens == 45 + 5 * 5        # and computed only its own 5
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, enable_prefix_caching=False) as rt:
        ref = rt.generate(prompts, max_tokens=4, ignore_eos=True, temperature=0)
    assert [first.token_ids] + [r.token_ids for r in rest] == [r.token_ids for r in ref]


def test_request_that_can_never_fit_is_rejected(model):
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=5 * block_bytes(model)) as rt:
        with pytest.raises(pagedrt.InvalidArgument, match="needs 6 KV blocks"):
            rt.submit(list(range(3, 20)), max_tokens=8)
        ok = rt.generate([list(range(3, 10))], max_tokens=8, ignore_eos=True, temperature=0)[0]
        assert len(ok.token_ids) == 8 and ok.finish_reason == "length"


def test_stats_waste_and_counts(model):
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK) as rt:
        rid = rt.submit(list(range(3, 13)), max_tokens=30, ignore_eos=True, temperature=0)  # 10 prompt tokens
        seen = []
        while not seen or not seen[-1].finished:
            seen += rt.poll(rid, timeout=1.0)
        s = rt.stats()
    assert s.generated_tokens == 30 and s.prompt_tokens == 10
    assert s.peak_blocks_used == 10           # 39 tokens hold K/V at the end: ceil(39 / 4)
    assert abs(s.waste_at_peak - (1 - 37 / 40)) < 1e-9  # the 10th block first held 37
    assert s.blocks_used == 0 and s.tokens_per_s > 0
