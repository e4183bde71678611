"""Soak: thousands of requests from several Python threads against a KV pool
small enough to force preemption, with random prompt lengths, random sampling
parameters (greedy, temperature, top-k/p, min-p, penalties, seeds, n = 2) and
random aborts. Over repeated rounds:

- every request gets exactly one request_finished event;
- afterwards the pool is back to the start (no block used, all free);
- the process's resident memory (/proc/self/statm) stays flat;
- greedy requests give the same tokens as the same prompt run alone.

PAGEDRT_SOAK_REQUESTS (default 1200) sets the requests per round.
"""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

import pagedrt

ROUNDS = 5
PER_ROUND = int(os.environ.get("PAGEDRT_SOAK_REQUESTS", "1200"))
THREADS = 6
IN_FLIGHT = 4  # requests each thread keeps open at once
BLOCK = 8
VOCAB = 320


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import make_tiny_llama
    path, _ = make_tiny_llama(tmp_path_factory.mktemp("soak") / "m", hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="module")
def greedy_refs(model):
    """A few prompts and their greedy continuations, each run alone in a roomy pool."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 60))] for _ in range(10)]
    refs = []
    with pagedrt.Runtime(model, device="cpu", num_threads=2) as rt:
        for p in prompts:
            refs.append((p, rt.generate(p, max_tokens=24, temperature=0, ignore_eos=True)[0].outputs[0].token_ids))
    return refs


def random_request(rng: random.Random, refs):
    """(prompt, params, greedy reference or None)."""
    if rng.random() < 0.25:
        prompt, ref = rng.choice(refs)
        k = rng.randint(1, 24)
        return prompt, pagedrt.SamplingParams(max_tokens=k, temperature=0, ignore_eos=True), ref[:k]
    prompt = [rng.randrange(0, VOCAB) for _ in range(rng.randint(1, 64))]
    kw = dict(max_tokens=rng.randint(1, 32), ignore_eos=rng.random() < 0.5,
              temperature=rng.choice([0.0, 0.5, 1.0, 1.5]))
    if rng.random() < 0.5:
        kw.update(top_k=rng.choice([0, 1, 5, 50]), top_p=rng.choice([1.0, 0.9, 0.5]), min_p=rng.choice([0.0, 0.1]))
    if rng.random() < 0.3:
        kw.update(repetition_penalty=rng.choice([1.0, 1.2]), presence_penalty=rng.uniform(-1, 1),
                  frequency_penalty=rng.uniform(-1, 1))
    if rng.random() < 0.3:
        kw["seed"] = rng.randrange(1 << 30)
    if rng.random() < 0.15:
        kw["n"] = 2
    if rng.random() < 0.1:
        kw["stop_token_ids"] = [rng.randrange(VOCAB)]
    return prompt, pagedrt.SamplingParams(**kw), None


def client(rt, seed: int, count: int, refs, result: dict, errors: list):
    """One thread: keeps IN_FLIGHT requests open, polls each by id, aborts some."""
    rng = random.Random(seed)
    open_reqs = {}  # id -> [greedy ref, tokens so far, abort_after_events, events seen]
    submitted = 0
    try:
        while submitted < count or open_reqs:
            while submitted < count and len(open_reqs) < IN_FLIGHT:
                prompt, params, ref = random_request(rng, refs)
                rid = rt.submit(prompt, params)
                submitted += 1
                abort_after = rng.choice([0, 1, 3]) if rng.random() < 0.15 else None
                open_reqs[rid] = [ref, [], abort_after, 0]
                if abort_after == 0:
                    rt.abort(rid)
            for rid in list(open_reqs):
                st = open_reqs[rid]
                for ev in rt.poll(rid, timeout=0.002):
                    st[1] += ev.token_ids
                    st[3] += 1
                    if ev.request_finished:
                        result.setdefault(rid, []).append(ev.finish_reason)
                        if st[0] is not None and st[2] is None:  # a greedy request left alone
                            if st[1] != st[0]:
                                errors.append(f"{rid}: greedy {st[1]} != alone {st[0]}")
                        del open_reqs[rid]
                        break
                else:
                    if st[2] and st[3] >= st[2]:
                        st[2] = -1  # abort once
                        rt.abort(rid)
    except Exception as e:  # surfaced by the main thread
        errors.append(repr(e))


def test_soak_threads_preemption_aborts(model, greedy_refs):
    t0 = time.monotonic()
    # 24 blocks of 8 tokens: a handful of the 24 requests in flight fit at once.
    probe = pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=1 << 20)
    block_bytes = probe.stats().kv_cache_bytes // probe.stats().num_blocks
    probe.close()
    rt = pagedrt.Runtime(model, device="cpu", block_size=BLOCK, kv_cache_bytes=24 * block_bytes,
                         max_num_seqs=16, num_threads=2)
    start = rt.stats()
    rss = []
    total = 0
    for rnd in range(ROUNDS):
        result, errors = {}, []
        per = PER_ROUND // THREADS
        threads = [threading.Thread(target=client, args=(rt, 100 * rnd + t, per, greedy_refs, result, errors))
                   for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=600)
        assert not any(th.is_alive() for th in threads), "a client thread hung"
        assert not errors, errors[:5]
        assert len(result) == per * THREADS, (len(result), per * THREADS)
        assert all(len(v) == 1 for v in result.values())  # exactly one final event each
        total += len(result)
        st = rt.stats()
        assert (st.blocks_used, st.blocks_free, st.num_running, st.num_waiting) == (0, start.num_blocks, 0, 0)
        assert rt.poll(timeout=0.0) == []
        rss.append(rss_bytes())
    st = rt.stats()
    rt.close()
    assert st.num_preemptions > 0, "the pool was meant to be small enough to preempt"
    # Flat memory: after a warm-up round, growth stays within allocator noise.
    growth = rss[-1] - rss[1]
    print(f"soak: {total} requests in {time.monotonic() - t0:.1f} s, {st.num_preemptions} preemptions, "
          f"{st.generated_tokens} tokens, RSS per round (MiB) {[round(r / 2**20, 1) for r in rss]}")
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over rounds 2..{ROUNDS}: {rss}"
