"""Soak: thousands of requests from several Python threads against a KV pool
small enough to force preemption, with random prompt lengths, random sampling
parameters (greedy, temperature, top-k/p, min-p, penalties, seeds, n = 2) and
random aborts. Over repeated rounds:

- every request gets exactly one request_finished event;
- afterwards the pool is back to the start (no block used, all free);
- the process's resident memory (/proc/self/statm) stays flat;
- greedy requests give the same tokens as the same prompt run alone.

PAGEDRT_SOAK_REQUESTS (default 1200) sets the requests per round.

test_every_feature_at_once does the same on SmolLM2 with every feature of a
request at once (speculation, structured output, forks, beams, stop strings,
logprobs), each reproducible request checked against its run alone.
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


# ---- every feature at once, on SmolLM2 ------------------------------------------------

MIX_KINDS = ("greedy", "ngram", "draft", "seeded", "seeded_spec", "n2", "n2_spec", "beam", "json", "regex",
             "choice", "stop", "logprobs", "abort", "sampled")
MIX_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
MIX_REGEX = r"[a-z]{2,6}( [a-z]{2,6}){0,3}\."
MIX_PROMPTS = ("Write a short story about a cat.", "List five fruits.", "What is 12 * 7?",
               "Rewrite this: The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
               "Copy this text exactly: alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu.")


def mix_request(rng: random.Random):
    """(chat prompt, kind, submit keywords); every kind but "abort" and "sampled" is reproducible."""
    prompt = [{"role": "user", "content": rng.choice(MIX_PROMPTS) + " " * rng.randint(0, 2)}]
    kind = rng.choice(MIX_KINDS)
    seed = rng.randrange(1000)
    kw = {"greedy": dict(temperature=0), "ngram": dict(temperature=0, speculative="ngram"),
          "draft": dict(temperature=0, speculative="draft", num_speculative_tokens=rng.randint(1, 6)),
          "seeded": dict(temperature=0.8, top_p=0.9, seed=seed),
          "seeded_spec": dict(temperature=0.8, top_k=30, seed=seed, speculative=rng.choice(["ngram", "draft"])),
          "n2": dict(n=2, temperature=0.9, seed=seed),
          "n2_spec": dict(n=2, temperature=0.9, seed=seed, speculative=rng.choice(["ngram", "draft"])),
          "beam": dict(beam_width=rng.choice([2, 3]), temperature=0),
          "json": dict(json_schema=MIX_SCHEMA, temperature=rng.choice([0, 0.7]), seed=seed, max_tokens=64),
          "regex": dict(regex=MIX_REGEX, temperature=0.7, seed=seed),
          "choice": dict(choice=["red", "green", "blue"], temperature=0),
          "stop": dict(temperature=0, stop=[".", "\n"]), "logprobs": dict(temperature=0, logprobs=3),
          "abort": dict(temperature=0.5, max_tokens=100),
          "sampled": dict(temperature=1.0, top_k=20, repetition_penalty=1.1)}[kind]
    kw.setdefault("max_tokens", rng.randint(4, 40))
    return prompt, kind, kw


def test_every_feature_at_once(smol):
    """120 requests on SmolLM2 from six threads into a pool of 12 MiB shared
    with a draft model (SmolLM2 itself): greedy, n-gram and draft speculation,
    seeded sampling with and without speculation, n = 2 forks (speculating
    too), beams, JSON schema, regex and choice constraints, stop strings,
    logprobs, aborts and unseeded sampling, preempted and swapped. Each
    request ends exactly once without error; every reproducible one gives the
    tokens it gives alone without speculation (the CPU is batch-invariant, and
    a speculative position takes the draw plain sampling takes); constrained
    answers that stop parse as their constraint says; both pools end empty.
    This run found a request that never ended (n = 2 with speculation after
    a chunked prompt) and seeded speculative sampling that changed with the
    batch."""
    import json
    import re

    rng = random.Random(5)
    reqs = [mix_request(rng) for _ in range(120)]
    events, failures = {}, []
    with pagedrt.Runtime(smol, device="cpu", progress=False, kv_cache_bytes=12 << 20, draft_model=smol) as rt:
        def worker(indices):
            for i in indices:
                prompt, kind, kw = reqs[i]
                try:
                    rid, evs, deadline = rt.submit(prompt, **kw), [], time.monotonic() + 300
                    while not any(ev.request_finished for ev in evs):
                        if time.monotonic() > deadline:
                            failures.append((i, kind, "never finished"))
                            break
                        evs += rt.poll(rid, timeout=0.5)
                        if kind == "abort" and len(evs) >= 2:
                            rt.abort(rid)
                    events[i] = evs
                except Exception as e:
                    failures.append((i, kind, repr(e)))
        order = list(range(len(reqs)))
        rng.shuffle(order)
        threads = [threading.Thread(target=worker, args=(order[t::6],)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=900)
        assert not any(th.is_alive() for th in threads), "a client thread hung"
        assert not failures, failures[:5]
        busy = rt.stats()
        assert busy.num_preemptions > 0, "the pool was meant to be small enough to preempt"
        for i, evs in sorted(events.items()):
            prompt, kind, kw = reqs[i]
            assert sum(ev.request_finished for ev in evs) == 1, (i, kind)
            assert all(ev.error is None for ev in evs), (i, kind, [ev.error for ev in evs])
            tokens, text, reason = {}, {}, {}
            for ev in evs:
                tokens.setdefault(ev.index, []).extend(ev.token_ids)
                text[ev.index] = text.get(ev.index, "") + ev.text
                if ev.finished:
                    reason[ev.index] = ev.finish_reason
            if kind not in ("abort", "sampled"):
                plain = {k: v for k, v in kw.items() if k not in ("speculative", "num_speculative_tokens")}
                alone = rt.generate(prompt, **plain)[0].outputs
                if kind == "beam":  # the same beams, in the same order
                    assert [tokens[k] for k in sorted(tokens)] == [o.token_ids for o in alone], (i, kind)
                else:
                    assert [tokens.get(k) for k in range(len(alone))] == [o.token_ids for o in alone], (i, kind, kw)
            if reason.get(0) == "stop" and kind == "json":
                answer = json.loads(text[0])
                assert set(answer) == {"name", "age"} and len(answer["name"]) <= 12 and 0 <= answer["age"] <= 99
            if reason.get(0) == "stop" and kind == "regex":
                assert re.fullmatch(MIX_REGEX, text[0]), text[0]
            if reason.get(0) == "stop" and kind == "choice":
                assert text[0] in ("red", "green", "blue"), text[0]
        st = rt.stats()
        assert (st.blocks_used, st.draft_blocks_used, st.num_running, st.num_waiting) == (0, 0, 0, 0)
