"""Continuous batching end to end on a tiny model: 32 concurrent requests of
mixed lengths give the same greedy tokens as each request run alone, with a
pool small enough that preemption happens, chunked prefill on and off, prefix
caching on and off."""
from __future__ import annotations

import time

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


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prefill", "chunked-prefill"])
@pytest.mark.parametrize("prefix", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_concurrent_equals_alone_under_preemption(model, workload, alone, chunked, prefix, mode):
    """preemption_mode: recompute frees a victim's blocks and computes its
    tokens again; swap copies them to host slots and back (its K/V come back
    bit for bit); auto takes the cheaper (on the CPU a block's copy is far
    cheaper than its tokens' forward: it swaps)."""
    # 20 blocks of 4 tokens: far less than 32 requests need at once, more than any one needs.
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=20 * block_bytes(model),
                         max_num_batched_tokens=16 if chunked else 2048,
                         enable_prefix_caching=prefix, preemption_mode=mode) as rt:
        assert rt.stats().num_blocks == 20
        got, preempted = run_all(rt, workload)
        stats = rt.stats()
    assert got == alone
    assert stats.num_preemptions > 0 and max(preempted.values()) > 0
    assert stats.blocks_used == 0 and stats.blocks_free == 20   # nothing leaked
    if mode == "recompute":
        assert stats.num_swapped_out == 0 and stats.swap_space_bytes == 0 and stats.swap_out_blocks == 0
    else:  # preemptions swapped (but for a victim holding no block yet or a full swap space); every block came back
        assert stats.swap_space_bytes == 20 * block_bytes(model)
        assert 0 < stats.num_swapped_out <= stats.num_preemptions
        assert stats.swap_out_blocks == stats.swap_in_blocks > 0
        assert stats.swap_blocks_used == 0 and stats.num_swapped == 0
    if prefix:
        assert stats.prefix_hits > 0 and stats.blocks_cached_free > 0
    else:
        assert stats.prefix_hits == 0 and stats.blocks_cached_free == 0


FORK_REQS = [(np.random.default_rng(11 + i).integers(3, 320, size=5 + 2 * i).tolist(), i) for i in range(12)]


def run_forks(rt):
    """FORK_REQS at once, odd ones n = 3 seeded samples, even ones beam width
    3: {index: tokens} per request, and each request's error ("" if none)."""
    ids = []
    for prompt, i in FORK_REQS:
        kw = dict(n=3, temperature=1.0, seed=i) if i % 2 else dict(beam_width=3, temperature=0)
        ids.append(rt.submit(prompt, max_tokens=12, ignore_eos=True, **kw))
    out, errors, pending = {i: {} for i in ids}, {i: "" for i in ids}, set(ids)
    deadline = time.monotonic() + 120
    while pending:
        assert time.monotonic() < deadline, f"requests {sorted(pending)} never finished"
        for ev in rt.poll(timeout=1.0):
            out[ev.request_id].setdefault(ev.index, []).extend(ev.token_ids)
            errors[ev.request_id] = errors[ev.request_id] or (ev.error or "")
            if ev.request_finished:
                pending.discard(ev.request_id)
    return [out[i] for i in ids], [errors[i] for i in ids]


@pytest.fixture(scope="module")
def forks_roomy(model):
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, enable_prefix_caching=False) as rt:
        return run_forks(rt)


@pytest.mark.parametrize("mode", ["auto", "swap"])
def test_forks_and_beams_under_preemption_match_a_roomy_pool(model, forks_roomy, mode):
    """Requests of n = 3 seeded samples and of beam width 3 share their
    prompt's blocks between sequences; preempted by swap, a shared block goes
    out once and comes back shared (ref counts), so each request's outputs
    equal those of a pool where nothing is preempted."""
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=24 * block_bytes(model),
                         enable_prefix_caching=False, preemption_mode=mode) as rt:
        got, errors = run_forks(rt)
        s = rt.stats()
    assert errors == [""] * len(FORK_REQS)
    assert got == forks_roomy[0]
    # Some preemptions may recompute: a victim holding no block yet, a full swap space (the pool's
    # size, shared by every swapped request), and under auto a request still of one sequence (before
    # its fork) where that was cheaper. Which ones depends on when the engine's steps meet the submits.
    assert s.num_preemptions > 0 and s.num_swapped_out > 0
    assert s.swap_out_blocks == s.swap_in_blocks and s.swap_blocks_used == 0 and s.blocks_used == 0


def test_forks_preempted_by_recompute_that_cannot_fit_again_end_with_an_error(model, forks_roomy):
    """By recompute, a request's sequences no longer share their prompt's
    blocks: where they then need more than the pool, the request ends with an
    error that says what to do (it used to wait forever); the others give
    the roomy pool's outputs."""
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=24 * block_bytes(model),
                         enable_prefix_caching=False, preemption_mode="recompute") as rt:
        got, errors = run_forks(rt)
        s = rt.stats()
    failed = [i for i, e in enumerate(errors) if e]
    assert failed, "the pool was meant to be too small for some recomputed forks"
    assert all("no longer share their prompt's KV blocks" in errors[i] and 'preemption_mode "auto"' in errors[i]
               for i in failed)
    assert all(got[i] == forks_roomy[0][i] for i in range(len(FORK_REQS)) if i not in failed)
    assert s.num_swapped_out == 0 and s.blocks_used == 0


def test_sequences_stopped_while_swapped_out_give_their_host_slots_back(model):
    """n = 3 requests in a small pool under swap: once some request is swapped
    out, the host stops sequence 1 of every request. A swapped-out request's
    stopped sequence frees the host slots only it held (the others keep
    theirs): at the end no slot and no block is held."""
    rng = np.random.default_rng(21)
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=24 * block_bytes(model),
                         enable_prefix_caching=False, preemption_mode="swap") as rt:
        ids = [rt.submit(rng.integers(3, 320, size=20).tolist(), max_tokens=16, ignore_eos=True, n=3,
                         temperature=1.0, seed=i) for i in range(12)]
        pending, stops, deadline = set(ids), 0, time.monotonic() + 120
        while pending:
            assert time.monotonic() < deadline, f"requests {sorted(pending)} never finished"
            if rt.stats().num_swapped > 0:  # some request is out: stop sequence 1 of each (again: a no-op once done)
                for i in sorted(pending):
                    rt._rt.stop_sequence(i, 1)
                stops += 1
            for ev in rt.poll(timeout=0.001):
                if ev.request_finished:
                    pending.discard(ev.request_id)
        s = rt.stats()
    assert stops > 0 and s.num_swapped_out > 0
    assert s.swap_blocks_used == 0 and s.blocks_used == 0


def test_swap_space_too_small_falls_back_to_recompute(model, workload, alone):
    """With host slots for 3 blocks, a victim whose blocks do not fit there is
    preempted by recompute: both kinds happen, and the outputs stay exact."""
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=20 * block_bytes(model),
                         enable_prefix_caching=False, preemption_mode="swap",
                         swap_space_bytes=3 * block_bytes(model)) as rt:
        got, _ = run_all(rt, workload)
        s = rt.stats()
    assert got == alone
    assert s.swap_space_bytes == 3 * block_bytes(model)
    assert 0 < s.num_swapped_out < s.num_preemptions
    assert s.swap_out_blocks == s.swap_in_blocks and s.swap_blocks_used == 0


def test_preemption_options_are_checked(model):
    with pytest.raises(pagedrt.InvalidArgument, match="preemption_mode 'sometimes' is not known"):
        pagedrt.Runtime(model, device="cpu", preemption_mode="sometimes")
    with pytest.raises(pagedrt.InvalidArgument, match="swap_space_bytes must be >= 0"):
        pagedrt.Runtime(model, device="cpu", preemption_mode="swap", swap_space_bytes=-1)
    with pytest.raises(pagedrt.InvalidArgument, match="swap_space_bytes 100 holds no KV block"):
        pagedrt.Runtime(model, device="cpu", block_size=BLOCK, preemption_mode="swap", swap_space_bytes=100)


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
