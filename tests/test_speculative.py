"""Speculative decoding by prompt lookup and by a draft model (issue 23,
docs/speculative.md), on the CPU: greedy output with speculation is the
output without it, token for token and logprob for logprob (the CPU's results
are batch-invariant, so the verify step's rows equal the decode steps');
sampled output keeps its distribution (a chi-square test); rolled-back
proposals leave no blocks behind, in the model's pool and the draft's, under
preemption too. A draft model that is the model itself has every proposal
accepted; a random one has almost none accepted, and the output is exact all
the same."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

import pagedrt
from conftest import finished_events

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from workloads import speculative_prompts  # noqa: E402


# deterministic=True throughout: on a processor with AMX the CPU's default is
# False, and a verify step's rows (5 tokens or more: AMX tiles) would then sum
# in another order than a plain decode step's, so a near-tie could part them.
@pytest.fixture(scope="module")
def rt(smol):
    with pagedrt.Runtime(smol, device="cpu", progress=False, deterministic=True) as r:
        yield r


@pytest.fixture(scope="module")
def prompts(rt):
    return speculative_prompts(rt)


def assert_each_equals_plain(rt, ids, variants, plain):
    """Waits for the requests `ids` (submitted together) and checks each
    sequence's tokens against its plain run's."""
    tokens = {rid: {} for rid in ids}
    for ev in finished_events(rt, ids):
        assert ev.error is None
        tokens[ev.request_id].setdefault(ev.index, []).extend(ev.token_ids)
    for kw, want, rid in zip(variants, plain, ids):
        got = tokens[rid]
        assert [got[i] for i in sorted(got)] == [o.token_ids for o in want.outputs], kw


def test_greedy_equals_plain_decoding(rt, prompts):
    """Every workload's prompts, greedy, with logprobs: the same tokens, the
    same logprobs (top 3 too), and the copying prompts accept proposals."""
    all_prompts = [p for ps in prompts.values() for p in ps]
    common = dict(max_tokens=48, temperature=0.0, logprobs=3)
    plain = rt.generate(all_prompts, **common)
    spec = rt.generate(all_prompts, speculative="ngram", **common)
    for i, (a, b) in enumerate(zip(plain, spec)):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids, i
        assert b.outputs[0].logprobs == a.outputs[0].logprobs, i
        assert a.outputs[0].spec_proposed == 0
        assert 0 <= b.outputs[0].spec_accepted <= b.outputs[0].spec_proposed
    copied = [c.outputs[0] for c in spec[:2]]  # the two "rewrite" prompts
    assert all(o.spec_accepted >= 10 for o in copied), [(o.spec_proposed, o.spec_accepted) for o in copied]


def test_mixed_batch_stops_limits_and_forks(rt, prompts):
    """Speculative and plain requests in one batch, n = 2 greedy forks, a stop
    string, a max_tokens that caps the proposals, num_speculative_tokens 1 and
    16, ngram_min 2: each equals its plain run."""
    p = prompts["rewrite"][0]
    variants = [dict(max_tokens=40), dict(max_tokens=3), dict(max_tokens=30, n=2),
                dict(max_tokens=40, stop=["Gutenberg"]), dict(max_tokens=30, num_speculative_tokens=1),
                dict(max_tokens=30, num_speculative_tokens=16, ngram_min=2, ngram_max=6)]
    plain = [rt.generate([p], temperature=0.0, **{k: v for k, v in kw.items()
                                                  if k not in ("num_speculative_tokens", "ngram_min", "ngram_max")})[0]
             for kw in variants]
    ids = [rt.submit(p, by_id=True, temperature=0.0, speculative="ngram", **kw) for kw in variants]
    ids.append(rt.submit(prompts["open_ended"][0], by_id=True, temperature=0.0, max_tokens=20))
    assert_each_equals_plain(rt, ids, variants, plain)
    assert rt.stats().blocks_used == 0


def test_tight_token_budget_with_forks(smol, prompts):
    """A step budget of 6 tokens shared by n = 3 greedy forks of a copying
    prompt: the proposals are sized to what is left of the budget (later forks
    get fewer or none, and wait for the next step), each verified whole; the
    tokens equal the plain run and every block comes back."""
    p = prompts["rewrite"][0]
    with pagedrt.Runtime(smol, device="cpu", progress=False, deterministic=True, max_num_batched_tokens=6) as tight:
        want = tight.generate([p], max_tokens=30, temperature=0.0, n=3)[0]
        got = tight.generate([p], max_tokens=30, temperature=0.0, n=3, speculative="ngram")[0]
        assert tight.stats().blocks_used == 0
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]
    assert sum(o.spec_accepted for o in got.outputs) > 0


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_rollback_frees_blocks_under_preemption(smol, prompts, spec):
    """A KV pool of 16 blocks (with a draft model, the model itself: a draft
    pool of 16 more) and six copying requests of 107..147 prompt tokens:
    preemptions happen, proposals are rolled back (a preempted request's
    draft shadow is freed and later rebuilt), and every token equals the
    plain run; at the end neither pool holds a block."""
    reqs = [p for ps in prompts.values() for p in ps][:6]
    block_bytes = 30 * 2 * 3 * 64 * 16 * 2  # SmolLM2, bf16: the model's, and as much again for the draft's
    draft = dict(draft_model=smol) if spec == "draft" else {}
    with pagedrt.Runtime(smol, device="cpu", progress=False, deterministic=True, kv_cache_bytes=(2 if draft else 1) * 16 * block_bytes,
                         max_num_batched_tokens=96, **draft) as small:
        assert small.stats().num_blocks == 16
        want = [c.outputs[0].token_ids for c in small.generate(reqs, max_tokens=40, temperature=0.0)]
        before = small.stats().num_preemptions
        got = small.generate(reqs, max_tokens=40, temperature=0.0, speculative=spec)
        stats = small.stats()
    assert [c.outputs[0].token_ids for c in got] == want
    assert stats.num_preemptions > before
    assert stats.blocks_used == 0 and stats.blocks_free == stats.num_blocks and stats.draft_blocks_used == 0
    assert 0 < stats.spec_accepted <= stats.spec_proposed


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_seeded_sampling_equals_plain_sampling(smol, prompts, spec):
    """Seeded sampling (temperature; top-k with a repetition penalty; top-p
    with n = 2) with speculation gives exactly the tokens it gives without,
    alone and in a 16-block pool where requests are preempted and proposals
    are dropped for want of blocks: each position takes the one draw plain
    sampling takes (Sampler::verify_draft), so what is proposed, and how
    much, changes no token. The rule it replaced (accept with probability
    p(d), else a second draw) parts from plain sampling at the first
    rejected proposal."""
    reqs = [p for ps in prompts.values() for p in ps][:6]
    block_bytes = 30 * 2 * 3 * 64 * 16 * 2  # SmolLM2, bf16 (as above)
    draft = dict(draft_model=smol) if spec == "draft" else {}
    settings = [dict(temperature=0.8), dict(temperature=1.0, top_k=20, repetition_penalty=1.1),
                dict(temperature=0.9, top_p=0.9, n=2)]
    preempted = 0
    with pagedrt.Runtime(smol, device="cpu", progress=False, deterministic=True,
                         kv_cache_bytes=(2 if draft else 1) * 16 * block_bytes, max_num_batched_tokens=96,
                         **draft) as small:
        for s in settings:
            kw = dict(max_tokens=40, seed=7, **s)
            alone = [small.generate([p], **kw)[0] for p in reqs[:2]]
            want = small.generate(reqs, **kw)
            before = small.stats().num_preemptions
            got = small.generate(reqs, speculative=spec, **kw)
            preempted += small.stats().num_preemptions - before  # how many: the engine's timing decides
            for i, (a, b) in enumerate(zip(want, got)):
                assert [o.token_ids for o in b.outputs] == [o.token_ids for o in a.outputs], (s, i)
            for a, b in zip(alone, got):
                assert [o.token_ids for o in b.outputs] == [o.token_ids for o in a.outputs], s
            proposed = sum(o.spec_proposed for c in got for o in c.outputs)
            accepted = sum(o.spec_accepted for c in got for o in c.outputs)
            assert 0 < accepted < proposed, (s, proposed, accepted)
        stats = small.stats()
    assert preempted > 0, "the pool was meant to be small enough to preempt"
    assert stats.blocks_used == 0 and stats.draft_blocks_used == 0


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_forks_after_a_chunked_prompt(smol, spec):
    """n = 2 requests whose chunked prefill leaves one prompt token for a
    step of its own (33 and 65 tokens, 32 a step), a prompt that repeats
    (so n-grams match): the prompt's sequence is then at its decode point
    while running, and is forked at its first token as without speculation;
    each sample equals its plain run. Proposing for it before the fork made
    its verify step skip the fork, and once that one sequence ended the
    request ran on with none, never finishing (found by a stress run)."""
    draft = dict(draft_model=smol) if spec == "draft" else {}
    with pagedrt.Runtime(smol, device="cpu", progress=False, deterministic=True, max_num_batched_tokens=32,
                         enable_prefix_caching=False, **draft) as r:
        for length in (33, 65):
            prompt = ([412, 1530, 3281, 288, 5725] * 20)[:length]
            kw = dict(max_tokens=24, n=2, temperature=0.9, seed=3)
            want = r.generate([prompt], **kw)[0]
            rid = r.submit(prompt, by_id=True, speculative=spec, **kw)
            got = {}
            for ev in finished_events(r, [rid], timeout=0.2, deadline_s=60):  # fails, not hangs, if it never ends
                assert ev.error is None
                got.setdefault(ev.index, []).extend(ev.token_ids)
            assert [got.get(i) for i in range(2)] == [o.token_ids for o in want.outputs], length
        stats = r.stats()
        assert stats.blocks_used == 0 and stats.draft_blocks_used == 0 and stats.num_running == 0
        assert stats.spec_proposed > 0


def chi2_critical(df: int, alpha_z: float = 3.0902) -> float:
    """Wilson–Hilferty: the chi-square quantile at 1 - alpha (z = 3.0902: alpha = 0.001)."""
    return df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_sampling_keeps_the_distribution(tiny_llama, spec):
    """On a tiny random model whose prompt repeats (so every step proposes by
    n-grams, from a single matching token up), with logit_bias making the proposed tokens likely (so proposals
    are both accepted and rejected; the draft model is the tiny model itself,
    with weights 3x the default scale so that its unbiased greedy picks are
    accepted about a third of the time), the joint distribution of the 2nd and
    3rd sampled tokens over 1,500 seeds, with and without speculation, for
    temperature, top-k and top-p: a chi-square test of homogeneity at
    significance 0.001 over the pairs seen at least 10 times in total."""
    path, _ = tiny_llama(vocab_size=64, initializer_range=0.3 if spec == "draft" else 0.1)
    prompt = [5, 6, 7, 8] * 6 + [5, 6]
    bias = {7: 4.0, 8: 3.5, 5: 3.0, 6: 2.0}
    settings = [dict(temperature=1.0), dict(temperature=0.8, top_k=6), dict(temperature=1.0, top_p=0.8)]
    draft = dict(draft_model=path) if spec == "draft" else {}
    with pagedrt.Runtime(path, device="cpu", progress=False, deterministic=True, max_num_seqs=256, **draft) as trt:
        for s in settings:
            counts = []
            proposed = accepted = 0
            for mode in (None, spec):
                ids = [trt.submit(prompt, by_id=True, max_tokens=4, ignore_eos=True, logit_bias=bias,
                                  seed=1000 * (mode is not None) + k, speculative=mode, num_speculative_tokens=2,
                                  ngram_min=1, **s)
                       for k in range(1500)]
                toks = {rid: [] for rid in ids}
                for ev in finished_events(trt, ids):
                    toks[ev.request_id] += ev.token_ids
                    if ev.request_finished:
                        proposed += ev.spec_proposed
                        accepted += ev.spec_accepted
                pairs = {}
                for t in toks.values():
                    pairs[(t[1], t[2])] = pairs.get((t[1], t[2]), 0) + 1
                counts.append(pairs)
            assert proposed > 1000, f"{s}: the repeating prompt was meant to make most requests propose ({proposed})"
            assert 0.05 * proposed < accepted < 0.95 * proposed, f"{s}: {accepted} of {proposed} accepted"
            keys = [k for k in set(counts[0]) | set(counts[1]) if counts[0].get(k, 0) + counts[1].get(k, 0) >= 10]
            table = np.array([[c.get(k, 0) for k in keys] for c in counts], dtype=float)
            expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
            chi2 = float(((table - expected) ** 2 / expected).sum())
            df = len(keys) - 1
            assert df >= 3, s
            assert chi2 < chi2_critical(df), f"{s}: chi2 {chi2:.1f} over {df} degrees of freedom"
        assert trt.stats().draft_blocks_used == 0


def test_errors_name_the_problem(rt):
    with pytest.raises(pagedrt.InvalidArgument, match="draft_model"):
        rt.submit([1, 2, 3], speculative="draft")
    with pytest.raises(pagedrt.InvalidArgument, match="speculative must be"):
        rt.submit([1, 2, 3], speculative="lookahead")
    with pytest.raises(pagedrt.InvalidArgument, match="num_speculative_tokens"):
        rt.submit([1, 2, 3], speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(pagedrt.InvalidArgument, match="ngram_min"):
        rt.submit([1, 2, 3], speculative="ngram", ngram_min=3, ngram_max=2)
    with pytest.raises(pagedrt.Unsupported, match="beam search"):
        rt.submit([1, 2, 3], speculative="ngram", beam_width=2)
    with pytest.raises(pagedrt.Unsupported, match="return_logits"):
        rt.submit([1, 2, 3], speculative="ngram", return_logits=True)


# ---- draft models ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rt_self(smol):
    """SmolLM2 with itself as the draft model: every proposal is the model's own pick."""
    with pagedrt.Runtime(smol, device="cpu", progress=False, deterministic=True, draft_model=smol) as r:
        yield r


def test_draft_model_itself_is_accepted_in_full(rt_self, prompts):
    """Every workload's prompts, greedy, with logprobs: the same tokens and
    logprobs as plain decoding, every proposal accepted (the CPU's draft
    forwards, one token at a time, give the bits the verify step gives), and
    both KV pools empty at the end."""
    all_prompts = [p for ps in prompts.values() for p in ps]
    common = dict(max_tokens=40, temperature=0.0, logprobs=3)
    plain = rt_self.generate(all_prompts, **common)
    spec = rt_self.generate(all_prompts, speculative="draft", **common)
    for i, (a, b) in enumerate(zip(plain, spec)):
        o = b.outputs[0]
        assert o.token_ids == a.outputs[0].token_ids, i
        assert o.logprobs == a.outputs[0].logprobs, i
        assert o.spec_proposed >= 20 and o.spec_accepted == o.spec_proposed, (i, o.spec_proposed, o.spec_accepted)
    stats = rt_self.stats()
    assert stats.blocks_used == 0 and stats.draft_blocks_used == 0
    assert stats.draft_kv_cache_bytes > 0
    assert rt_self.model_info.draft_num_layers == rt_self.model_info.num_layers


def test_draft_mixed_batch_with_ngram_and_plain(rt_self, prompts):
    """Draft-model, n-gram and plain requests in one batch: n = 2 forks (the
    second fork's shadow starts from the first's cached prompt blocks), a stop
    string, max_tokens 3 (proposals capped), 1 and 16 proposals a step: each
    equals its plain run."""
    p = prompts["open_ended"][0]
    variants = [dict(max_tokens=40, speculative="draft"), dict(max_tokens=3, speculative="draft"),
                dict(max_tokens=30, n=2, speculative="draft"),
                dict(max_tokens=40, stop=[" the"], speculative="draft"),
                dict(max_tokens=30, num_speculative_tokens=1, speculative="draft"),
                dict(max_tokens=30, num_speculative_tokens=16, speculative="draft"),
                dict(max_tokens=30, speculative="ngram"), dict(max_tokens=30)]
    plain_kw = [{k: v for k, v in kw.items() if k not in ("num_speculative_tokens", "speculative")} for kw in variants]
    plain = [rt_self.generate([p], temperature=0.0, **kw)[0] for kw in plain_kw]
    ids = [rt_self.submit(p, by_id=True, temperature=0.0, **kw) for kw in variants]
    assert_each_equals_plain(rt_self, ids, variants, plain)
    stats = rt_self.stats()
    assert stats.blocks_used == 0 and stats.draft_blocks_used == 0


def test_random_draft_model_is_rejected_and_exact(smol, tiny_llama, prompts):
    """A tiny random model with SmolLM2's vocabulary as the draft: almost
    nothing is accepted, each sequence pauses after 8 steps in a row without
    an accepted proposal (8 + 4 + 2 + 1 x 5 = 19 proposals), proposes nothing
    for 16 steps, then one proposal and a pause of 32: 20 at most in 40
    tokens; the output is exactly plain decoding's."""
    draft, _ = tiny_llama(vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=2048)
    reqs = [p for ps in prompts.values() for p in ps][:4]
    with pagedrt.Runtime(smol, device="cpu", progress=False, deterministic=True, draft_model=draft) as r:
        want = r.generate(reqs, max_tokens=40, temperature=0.0)
        got = r.generate(reqs, max_tokens=40, temperature=0.0, speculative="draft")
        stats = r.stats()
    for a, b in zip(want, got):
        o = b.outputs[0]
        assert o.token_ids == a.outputs[0].token_ids
        assert 8 <= o.spec_proposed <= 20 and o.spec_accepted <= 0.1 * o.spec_proposed, (o.spec_proposed, o.spec_accepted)
    assert stats.draft_blocks_used == 0


def test_draft_model_errors(smol, tiny_llama, tmp_path):
    """A draft model of another vocabulary, a folder that is no model, and
    speculative="draft" without a draft model: each error names it."""
    other, _ = tiny_llama(vocab_size=320)
    with pytest.raises(pagedrt.InvalidArgument, match="vocab_size 320 differs"):
        pagedrt.Runtime(smol, device="cpu", progress=False, deterministic=True, draft_model=other)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        pagedrt.Runtime(smol, device="cpu", progress=False, deterministic=True, draft_model=tmp_path)


def test_spec_bound_replays_the_engines_rule(rt, prompts):
    """tools/spec_bound.py replays an answer under the engine's proposal rule
    (without its pauses and adaptive draft length, so it may only take fewer
    steps): the engine's decode steps with speculative="ngram" are at least
    the replay's and within a tenth of them on copying prompts (a replay
    that proposed otherwise than engine/ngram.cpp would part from it), and
    the oracle never takes more steps than the engine's rule."""
    from spec_bound import PROPOSERS, tokens_per_step
    for kind in ("rewrite", "extract"):
        for ids in prompts[kind]:
            rid = rt.submit(ids, by_id=True, max_tokens=48, temperature=0.0, speculative="ngram",
                            num_speculative_tokens=8)
            answer, steps = [], -1  # decode steps: the token events after the prompt's
            for ev in finished_events(rt, [rid]):
                steps += bool(ev.token_ids)
                answer += ev.token_ids
            replay, _ = tokens_per_step(list(ids), answer, 8, **PROPOSERS["engine"])
            oracle, _ = tokens_per_step(list(ids), answer, 8, **PROPOSERS["oracle"])
            assert replay - 1 <= steps <= 1.1 * (replay - 1) + 1, (kind, steps, replay)
            assert oracle <= replay < len(answer), (kind, oracle, replay, len(answer))
