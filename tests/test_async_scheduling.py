"""Async scheduling on the CPU (RuntimeConfig::async_scheduling "on"): the engine
launches a step before processing the one ahead of it, counts its sequences
one token further with placeholder tokens, and feeds the picked ids into the
next step (engine/engine.hpp). The CPU runs its steps as they are launched,
so this gains nothing here; these tests pin the engine's logic, which CUDA
shares (tests/test_cuda.py runs the same comparisons on the GPU). Reference:
the same requests with async_scheduling "off" (exact: the CPU's results do
not depend on the batch)."""
from __future__ import annotations

import numpy as np
import pytest

import pagedrt

BLOCK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("async") / "m", num_key_value_heads=2)


def run_all(path, prompts, params, mode, **kw):
    """Every request's events by sample index: (token ids, finish reason, logprobs)."""
    with pagedrt.Runtime(path, device="cpu", block_size=BLOCK, async_scheduling=mode, **kw) as rt:
        ids = [rt.submit(p, sp) for p, sp in zip(prompts, params)]
        got = {rid: {} for rid in ids}
        finished = set()
        while len(finished) < len(ids):
            for ev in rt.poll(timeout=5.0):
                toks, _, lps = got[ev.request_id].setdefault(ev.index, ([], [None], []))
                toks.extend(ev.token_ids)
                lps.extend((lp.token_id, lp.logprob) for lp in ev.logprobs or [])
                if ev.finished:
                    got[ev.request_id][ev.index][1][0] = ev.finish_reason
                if ev.request_finished:
                    assert ev.request_id not in finished, "two final events"
                    finished.add(ev.request_id)
        stats = rt.stats()
        assert stats.blocks_used == 0
        return [got[rid] for rid in ids], stats


def greedy_mix(rng, n):
    prompts = [rng.integers(3, 250, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]
    params = []
    for i in range(n):
        stops = [int(t) for t in rng.integers(3, 250, size=12)] if i % 3 == 0 else []
        params.append(pagedrt.SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=0.0,
                                             stop_token_ids=stops))
    return prompts, params


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_greedy_requests_pipelined_give_the_tokens_of_steps_one_at_a_time(tiny, preemption_mode):
    """40 greedy requests of 1-29 tokens (a third with stop tokens, so some end
    early) over a pool of ~48 blocks: requests are preempted, end while the
    step after their last token is already launched, and come back. Every
    token and finish reason equals the synchronous run; nearly every step is
    launched ahead (all rows greedy); nothing is counted twice."""
    path, _ = tiny
    prompts, params = greedy_mix(np.random.default_rng(3), 40)
    kw = dict(kv_cache_bytes=200_000, preemption_mode=preemption_mode)
    want, st_off = run_all(path, prompts, params, "off", **kw)
    got, st_on = run_all(path, prompts, params, "on", **kw)
    assert got == want
    assert st_off.async_steps == 0
    assert st_on.async_steps >= 0.9 * st_on.num_steps
    assert st_on.num_preemptions > 0
    assert st_on.generated_tokens == st_off.generated_tokens == sum(len(v[0][0]) for v in want)


def test_shared_prefixes_and_chunked_prefill_pipelined(tiny):
    """Prompts sharing long prefixes (prefix-cache hits while their first
    requests are in flight: blocks enter the cache only once their token ids
    are known) and prompts longer than the step's token budget (chunked
    prefill alongside pipelined decodes): the synchronous run's tokens."""
    path, _ = tiny
    rng = np.random.default_rng(5)
    base = rng.integers(3, 250, size=48).tolist()
    prompts = [base[: int(rng.integers(20, 48))] + rng.integers(3, 250, size=int(rng.integers(1, 8))).tolist()
               for _ in range(16)]
    prompts += [rng.integers(3, 250, size=90).tolist() for _ in range(3)]
    params = [pagedrt.SamplingParams(max_tokens=int(rng.integers(2, 20)), temperature=0.0) for _ in prompts]
    kw = dict(max_num_batched_tokens=32)
    want, _ = run_all(path, prompts, params, "off", **kw)
    got, st = run_all(path, prompts, params, "on", **kw)
    assert got == want
    assert st.async_steps > 0 and st.prefix_hits > 0


def test_steps_that_need_the_host_interleave_with_pipelined_ones(tiny):
    """Seeded sampling (the CPU draws on the host), n = 2 with logprobs, a
    repetition penalty and beam search run one step at a time between
    pipelined greedy steps, in a pool small enough to preempt: the tokens,
    finish reasons and logprobs of the synchronous run."""
    path, _ = tiny
    rng = np.random.default_rng(9)
    prompts, params = greedy_mix(rng, 24)
    for i in range(0, 24, 4):
        params[i] = pagedrt.SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=0.8, seed=i)
    params[1] = pagedrt.SamplingParams(max_tokens=12, temperature=0.7, n=2, seed=3, logprobs=2)
    params[5] = pagedrt.SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3)
    params[9] = pagedrt.SamplingParams(max_tokens=8, temperature=0.0, beam_width=2)
    kw = dict(kv_cache_bytes=300_000)
    want, _ = run_all(path, prompts, params, "off", **kw)
    got, st = run_all(path, prompts, params, "on", **kw)
    assert got == want
    assert 0 < st.async_steps < st.num_steps


def test_aborted_requests_end_once_and_the_rest_are_unchanged(tiny):
    """Aborts arrive while pipelined steps are in flight: each aborted request
    gets one final event with a prefix of its tokens run alone; the others
    give the synchronous run's tokens; no block stays in use."""
    path, _ = tiny
    rng = np.random.default_rng(13)
    prompts = [rng.integers(3, 250, size=int(rng.integers(3, 30))).tolist() for _ in range(12)]
    params = pagedrt.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want, _ = run_all(path, prompts, [params] * len(prompts), "off")
    with pagedrt.Runtime(path, device="cpu", block_size=BLOCK, async_scheduling="on") as rt:
        ids = [rt.submit(p, params) for p in prompts]
        got = {rid: [] for rid in ids}
        finals = {rid: 0 for rid in ids}
        aborted = set()
        while sum(finals.values()) < len(ids):
            for ev in rt.poll(timeout=5.0):
                got[ev.request_id].extend(ev.token_ids)
                finals[ev.request_id] += ev.request_finished
                if len(got[ev.request_id]) >= 5 and ev.request_id in ids[::3] and ev.request_id not in aborted:
                    aborted.add(ev.request_id)
                    rt.abort(ev.request_id)
        assert rt.stats().blocks_used == 0
    assert all(n == 1 for n in finals.values())
    assert aborted
    for rid, w in zip(ids, want):
        if rid in aborted:
            assert got[rid] == w[0][0][: len(got[rid])]
        else:
            assert got[rid] == w[0][0]


def test_async_scheduling_option_is_checked(tiny):
    path, _ = tiny
    with pytest.raises(pagedrt.InvalidArgument, match="async_scheduling 'sometimes'"):
        pagedrt.Runtime(path, device="cpu", async_scheduling="sometimes")
    with pagedrt.Runtime(path, device="cpu") as rt:  # "auto": the CPU launches one step at a time
        rt.generate([[5, 6, 7]], max_tokens=4, temperature=0.0)
        assert rt.stats().async_steps == 0
