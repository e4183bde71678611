"""Continuous batching end to end on a tiny model: 32 concurrent requests of
mixed lengths give the same greedy tokens as each request run alone, with a
pool small enough that preemption happens, chunked prefill on and off, prefix
caching on and off; and admission with a watermark (kv_watermark), exactly,
through the engine's scheduler without a model (the _testing._Scheduler hook)."""
from __future__ import annotations

import time

import numpy as np
import pytest

import pagedrt
from conftest import finished_events

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
    out, preempted = {i: [] for i in ids}, {}
    for ev in finished_events(rt, ids):
        out[ev.request_id] += ev.token_ids
        preempted[ev.request_id] = ev.num_preemptions
        if ev.finished:
            assert ev.finish_reason == "length", ev.error
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
    out, errors = {i: {} for i in ids}, {i: "" for i in ids}
    for ev in finished_events(rt, ids, deadline_s=120):
        out[ev.request_id].setdefault(ev.index, []).extend(ev.token_ids)
        errors[ev.request_id] = errors[ev.request_id] or (ev.error or "")
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


# ---- admission with a watermark (kv_watermark) ----------------------------------------------
#
# The exact tests drive the engine's own Scheduler, KvCacheManager and BlockPool
# through the _testing._Scheduler hook: no model, no engine thread, so every
# step is deterministic. Its step() does to the block tables what the engine's
# output processing does (tokens computed and cached, n > 1 forked, one token
# sampled, sequences ended at max_tokens). Pools of 20 blocks of 4 tokens.

def scheduler(**kw):
    from pagedrt import _testing
    return _testing._Scheduler(20, BLOCK, **kw)


def steps(s, arrivals, limit=1000):
    """Runs `s` until nothing is left; arrivals {step: [(id, prompt, max_tokens, n)]}
    are added before that step (1-based). Returns, per step, (scheduled
    [(id, tokens)], preempted, finished, free blocks after it)."""
    log = []
    for k in range(1, limit + 1):
        for rid, prompt, max_tokens, n in arrivals.get(k, []):
            s.add(rid, prompt, max_tokens, n=n)
        r = s.step()
        log.append(([(rid, t) for rid, _, t in r.scheduled], r.preempted, r.finished, s.num_free))
        if not s.running and s.num_waiting == 0 and k >= max(arrivals):
            return log
    raise AssertionError(f"requests still running or waiting after {limit} steps")


def ids(log):
    """The request ids each step computed tokens for (each once)."""
    return [sorted({rid for rid, _ in sched}) for sched, *_ in log]


def test_watermark_holds_back_a_request_until_blocks_free():
    """a: 38 prompt tokens (10 blocks), b: 30 (8 blocks), 10 tokens each; both
    grow to 22 blocks together, more than the pool. Without a watermark both
    are admitted at once (8 <= 10 free) and b is preempted when the pool runs
    dry. With 0.15 (3 blocks) b would leave 10 - 8 = 2 free: it waits while
    a runs, and starts the step after a finishes; nothing is preempted."""
    a, b = ("a", list(range(3, 41)), 10, 1), ("b", list(range(100, 130)), 10, 1)
    s = scheduler(kv_watermark=0.0)
    log = steps(s, {1: [a, b]})
    assert s.watermark_blocks == 0
    assert log[0] == ([("a", 38), ("b", 30)], [], [], 2)   # the old admission: its blocks fit
    assert [p for _, p, _, _ in log] == [[]] * 7 + [["b"]] + [[]] * 5 and s.preemptions == 1
    s = scheduler(kv_watermark=0.15)
    log = steps(s, {1: [a, b]})
    assert s.watermark_blocks == 3
    assert log[0] == ([("a", 38)], [], [], 10)
    assert ids(log) == [["a"]] * 10 + [["b"]] * 10
    assert log[9][2] == ["a"] and log[10][0] == [("b", 30)]   # b starts the step after a ends
    assert s.preemptions == 0


def test_watermark_is_waived_while_nothing_runs():
    """0.4 of 20 blocks keeps 8 free; a's prompt takes 15. Held back, it could
    never run: with nothing running it is admitted, alone; b (one block)
    then waits, as 5 - 1 < 8, until a ends."""
    s = scheduler(kv_watermark=0.4)
    log = steps(s, {1: [("a", list(range(3, 63)), 4, 1), ("b", [5, 6, 7, 8], 2, 1)]})
    assert s.watermark_blocks == 8
    assert log[0] == ([("a", 60)], [], [], 5)
    assert ids(log) == [["a"]] * 4 + [["b"]] * 2 and s.preemptions == 0


def test_prefix_hits_on_running_requests_blocks_lower_the_need():
    """a (a 32-token system prompt + 4, 9 blocks) runs; b arrives with the same
    system prompt + 8 tokens. Cached, its first 8 blocks are a's: it needs 2
    more, 11 - 2 >= 3, and runs beside a. Without the prefix cache it needs
    10: 11 - 10 < 3, and it waits for a."""
    system = list(range(200, 232))
    a, b = ("a", system + [3, 4, 5, 6], 8, 1), ("b", system + list(range(10, 18)), 2, 1)
    s = scheduler(kv_watermark=0.15, enable_prefix_caching=True)
    log = steps(s, {1: [a], 2: [b]})
    assert log[1] == ([("a", 1), ("b", 8)], [], [], 8)
    s = scheduler(kv_watermark=0.15, enable_prefix_caching=False)
    log = steps(s, {1: [a], 2: [b]})
    assert ids(log) == [["a"]] * 8 + [["b"]] * 2 and log[8][0] == [("b", 40)]


def test_chunked_prefill_admission_counts_the_whole_prompt():
    """A budget of 8 tokens a step. b's 68-token prompt (17 blocks) arrives
    with a (one block, 20 tokens to come). Without a watermark b is admitted
    for its first chunk and, as both grow, preempted twice (its chunks
    computed again each time). With 0.15 its whole prompt counts, 19 - 17 < 3:
    it waits for a, then prefills in chunks of 8, and nothing is preempted."""
    a, b = ("a", [3, 4, 5, 6], 20, 1), ("b", list(range(10, 78)), 2, 1)
    s = scheduler(kv_watermark=0.0, max_num_batched_tokens=8)
    log = steps(s, {1: [a, b]})
    assert log[0][0] == [("a", 4), ("b", 4)]
    assert [k + 1 for k, (_, p, _, _) in enumerate(log) if p] == [10, 19] and s.preemptions == 2
    s = scheduler(kv_watermark=0.15, max_num_batched_tokens=8)
    log = steps(s, {1: [a, b]})
    assert ids(log) == [["a"]] * 20 + [["b"]] * 10 and s.preemptions == 0
    assert [t for sched, *_ in log[20:] for _, t in sched] == [8] * 8 + [4, 1]


def test_parallel_samples_count_the_blocks_their_forks_write():
    """b's 20-token prompt takes 5 blocks; with n = 4 its three forks each
    write their first token into a block of their own (a copy of the shared
    last one): 8 blocks, and 10 - 8 < 3 holds it back while a runs. With
    n = 1 it needs 5 and runs beside a."""
    a = ("a", list(range(3, 41)), 3, 1)
    s = scheduler(kv_watermark=0.15)
    log = steps(s, {1: [a], 2: [("b", list(range(50, 70)), 2, 4)]})
    assert ids(log) == [["a"]] * 3 + [["b"]] * 2
    assert log[4][0] == [("b", 1)] * 4 and log[3][3] == 15   # after the prefill: 20 - 5
    s = scheduler(kv_watermark=0.15)
    log = steps(s, {1: [a], 2: [("b", list(range(50, 70)), 2, 1)]})
    assert ids(log) == [["a"], ["a", "b"], ["a", "b"]]


def test_watermark_rounds_up_to_whole_blocks():
    """At least watermark x num_blocks blocks stay free: rounded up, but a
    product that is whole but for floating point (0.07 x 100) is not."""
    from pagedrt import _testing
    got = {(w, n): _testing._Scheduler(n, BLOCK, kv_watermark=w).watermark_blocks
           for w, n in [(0.0, 20), (0.01, 20), (0.05, 20), (0.1, 20), (0.15, 20), (0.07, 100), (0.29, 100),
                        (0.01, 728), (0.49, 3)]}
    assert got == {(0.0, 20): 0, (0.01, 20): 1, (0.05, 20): 1, (0.1, 20): 2, (0.15, 20): 3, (0.07, 100): 7,
                   (0.29, 100): 29, (0.01, 728): 8, (0.49, 3): 2}


def random_arrivals(seed, n_max=3):
    """20 requests arriving over the first 15 steps: random prompts (every
    other one with a shared 8-token prefix), 1-15 tokens, n in 1..n_max."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, 300, size=8).tolist()
    arrivals = {}
    for i in range(20):
        body = rng.integers(3, 300, size=int(rng.integers(1, 30))).tolist()
        arrivals.setdefault(int(rng.integers(1, 16)), []).append(
            (f"r{i}", shared + body if i % 2 else body, int(rng.integers(1, 16)), int(rng.integers(1, n_max + 1))))
    return arrivals


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("chunk", [2048, 8], ids=["whole-prefill", "chunked-prefill"])
@pytest.mark.parametrize("prefix", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_watermark_holds_whenever_a_request_enters_beside_others(mode, chunk, prefix):
    """40 random workloads (n up to 3) in a 24-block pool with 0.1 (3 blocks):
    after every step in which a request entered the running set (new, back
    after recompute, or swapped in) while another was running, at least 3
    blocks are free; every request ends (nothing waits forever); and the
    preemptions are fewer than without the watermark."""
    from pagedrt import _testing
    total, resumed = {}, 0
    for wm in (0.0, 0.1):
        total[wm] = 0
        for seed in range(40):
            s = _testing._Scheduler(24, BLOCK, max_num_seqs=16, max_num_batched_tokens=chunk, kv_watermark=wm,
                                    enable_prefix_caching=prefix, preemption_mode=mode, swap_slots=12)
            arrivals, running, was_preempted, finished = random_arrivals(seed), [], set(), set()
            for k in range(1, 2000):
                for rid, prompt, max_tokens, n in arrivals.get(k, []):
                    s.add(rid, prompt, max_tokens, n=n)
                r = s.step()
                finished.update(r.finished + r.unfit)   # unfit: n > 1 recomputed, too large unshared (an error)
                entered = (set(s.running) | set(r.finished)) - set(running)
                if wm and entered and (running or len(entered) > 1):
                    assert s.num_free >= s.watermark_blocks == 3, (seed, k, entered)
                    resumed += len(entered & was_preempted)
                was_preempted.update(r.preempted)
                running = s.running
                if k > 15 and not running and s.num_waiting == 0:
                    break
            assert len(finished) == 20, (seed, sorted(finished))
            total[wm] += s.preemptions
    assert resumed > 0   # preempted requests came back under the watermark too
    assert total[0.1] < total[0.0], total


def test_watermark_lowers_preemptions_of_the_thrashing_workload(workload):
    """The 32 requests above, all at once, in 20 blocks with chunked prefill
    (16 tokens a step): without a watermark long prompts are admitted chunk by
    chunk and preempted again and again; one block of watermark (the default
    0.01, rounded up) ends that."""
    from pagedrt import _testing
    got = {}
    for mode in ("recompute", "swap"):
        for wm in (0.0, 0.01, 0.1, 0.2):
            s = _testing._Scheduler(20, BLOCK, max_num_batched_tokens=16, kv_watermark=wm, preemption_mode=mode,
                                    swap_slots=20)
            log = steps(s, {1: [(str(i), p, m, 1) for i, (p, m) in enumerate(workload)]})
            got[mode, wm] = (s.preemptions, len(log))
    assert got == {("recompute", 0.0): (70, 304), ("recompute", 0.01): (4, 311), ("recompute", 0.1): (3, 313),
                   ("recompute", 0.2): (2, 330), ("swap", 0.0): (64, 297), ("swap", 0.01): (4, 308),
                   ("swap", 0.1): (3, 310), ("swap", 0.2): (2, 327)}


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_watermark_keeps_outputs_and_preempts_less(model, workload, alone, mode):
    """Through the Runtime: the same workload in 20 blocks, chunked prefill,
    with and without the watermark. The greedy tokens are the roomy pool's
    either way, and nothing leaks. Preemptions: 70 (swap 64) without, 4 with
    0.01, as in the exact test above, in every run checked (17 by recompute,
    8 by swap, most of them on 2 cores busy with other work); only "fewer" is
    asserted, as the engine thread may start on the first requests before the
    others arrive (without chunked prefill the counts did move with the load:
    7 or 6 without a watermark, 2 or 3 with 0.2)."""
    counts = {}
    for wm in (0.0, 0.01):
        with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=20 * block_bytes(model),
                             max_num_batched_tokens=16, enable_prefix_caching=False, preemption_mode=mode,
                             kv_watermark=wm) as rt:
            got, _ = run_all(rt, workload)
            s = rt.stats()
        assert got == alone, wm
        assert s.blocks_used == 0 and s.swap_blocks_used == 0
        counts[wm] = s.num_preemptions
    assert 0 < counts[0.01] < counts[0.0], counts


def test_request_too_large_for_the_watermark_runs_alone(model):
    """0.4 of a 20-block pool keeps 8 free; a request of 15 blocks still
    runs (alone), and gives the roomy pool's tokens."""
    prompt = np.random.default_rng(5).integers(3, 320, size=57).tolist()
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=20 * block_bytes(model),
                         kv_watermark=0.4) as rt:
        out = rt.generate([prompt, prompt[:3]], max_tokens=4, ignore_eos=True, temperature=0)
        s = rt.stats()
    with pagedrt.Runtime(model, device="cpu", block_size=BLOCK) as rt:
        ref = rt.generate([prompt, prompt[:3]], max_tokens=4, ignore_eos=True, temperature=0)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert s.peak_blocks_used == 15 and s.num_preemptions == 0


def test_kv_watermark_is_checked(model):
    assert pagedrt.RuntimeConfig().kv_watermark == 0.01
    for bad in (-0.1, 0.5, 1, float("nan")):
        with pytest.raises(pagedrt.InvalidArgument, match=r"kv_watermark must be in \[0, 0.5\)"):
            pagedrt.Runtime(model, device="cpu", kv_watermark=bad)
    with pytest.raises(pagedrt.InvalidArgument, match="kv_watermark"):
        pagedrt.Runtime(model, device="cpu", kv_watermark="high")


# ---- an elastic pool whose device memory is taken (elastic_kv) ------------------------------

def test_elastic_pool_that_cannot_grow_waits_then_ends_a_request_alone():
    """Pools of 20 blocks in chunks of 4 (block_pool.hpp), the device able to
    map 2 chunks (8 blocks) between them. a (6 blocks at most) runs; b (its
    24-token prompt: 6 blocks) cannot be mapped for beside it and waits, not
    ended, while a runs; once a ends, b runs in a's blocks. c, alone and too
    large for what can be mapped (40 tokens: 10 blocks), ends at admission
    (SchedulerOutput::unmapped) once a map is tried and fails, rather than
    waiting unseen (a failed map is tried again half a second later; until
    then a request waits). With the memory back (map_limit raised), the same
    request waits out that half second and runs."""
    from pagedrt import _testing
    s = _testing._Scheduler(20, BLOCK, chunk_blocks=4)
    s.map_limit = 2
    a, b = ("a", list(range(3, 19)), 8, 1), ("b", list(range(100, 124)), 2, 1)
    log = steps(s, {1: [a], 2: [b]})
    assert ids(log)[:8] == [["a"]] * 8 and all(rid == "b" for step in ids(log)[8:] for rid in step)
    assert log[7][2] == ["a"] and sum(p != [] for _, p, _, _ in log) == 0
    c = ("c", list(range(200, 240)), 1)
    time.sleep(0.55)
    s.add(*c)
    r = s.step()
    assert r.unmapped == ["c"] and r.scheduled == [] and s.num_waiting == 0
    s.map_limit = 5
    s.add(*c)
    r = s.step()
    assert r.unmapped == [] and r.scheduled == [] and s.num_waiting == 1  # the failed map's half second
    time.sleep(0.55)
    r = s.step()
    assert r.unmapped == [] and r.scheduled == [("c", 0, 40)]
