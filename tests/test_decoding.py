"""Decoding end to end on tiny random Llamas: seeded determinism inside busy
batches, n > 1 on shared blocks (copy-on-write counted), beam search against
transformers' generate(num_beams=k), mixed batches, logprobs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pagedrt
from conftest import finished_events

BLOCK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("dec") / "m", num_key_value_heads=2)


def runtime(path, **kw):
    return pagedrt.Runtime(path, device="cpu", block_size=BLOCK, **kw)


def outputs(completion):
    return [o.token_ids for o in completion.outputs]


def test_seeded_request_is_the_same_alone_and_in_a_busy_batch(tiny):
    path, _ = tiny
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, 320, size=21).tolist()
    params = pagedrt.SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True, n=3)
    with runtime(path) as rt:
        alone = rt.generate([prompt], params)[0]
    others = [rng.integers(3, 320, size=int(rng.integers(2, 40))).tolist() for _ in range(12)]
    with runtime(path, max_num_batched_tokens=24) as rt:
        for p in others[:6]:  # unseeded neighbours, still running while ours decodes
            rt.submit(p, temperature=1.0, top_k=20, max_tokens=30, ignore_eos=True)
        busy = rt.generate([prompt] + others[6:], params)[0]  # and six seeded ones in the same call
    assert outputs(busy) == outputs(alone)
    assert len({tuple(t) for t in outputs(alone)}) == 3  # the three samples differ


def _unseeded_samples(path, prompt, count):
    with runtime(path) as rt:
        got = rt.generate([prompt] * count, temperature=1.0, max_tokens=12, ignore_eos=True, n=2)
    return [tuple(t) for c in got for t in outputs(c)]


def test_unseeded_requests_draw_their_own_streams(tiny):
    """Requests without a seed (and the n = 2 samples of each) draw distinct
    streams: 16 samples of 12 tokens of one prompt at temperature 1 from a
    320-token vocabulary are all different; so are those of two processes
    forked from one that drew before (the streams' entropy is read once a
    process and keyed by the process id)."""
    import multiprocessing
    path, _ = tiny
    prompt = list(range(5, 25))
    samples = _unseeded_samples(path, prompt, 8)
    assert len(set(samples)) == 16, samples
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        forked = pool.starmap(_unseeded_samples, [(path, prompt, 2), (path, prompt, 2)])
    assert not set(forked[0]) & set(forked[1]), forked


def test_n4_shares_the_prompt_blocks(tiny):
    path, _ = tiny
    prompt = list(range(10, 72))             # 62 tokens: 15 full blocks and one half-full
    with runtime(path) as rt:
        out = rt.generate([prompt], n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)[0]
        s = rt.stats()
    assert len(out.outputs) == 4 and all(len(o.token_ids) == 8 for o in out.outputs)
    prompt_blocks, out_blocks = 16, 2         # ceil(62 / 4); ceil(8 / 4) per sample
    assert s.num_copies == 3                  # the shared half-full block, copied for 3 of 4 samples
    assert s.peak_blocks_used <= prompt_blocks + 4 * out_blocks + s.num_copies
    assert s.prompt_tokens == 62              # the prompt was computed once


def hf_beams(model, prompt, k, lp, max_new, early_stopping=False):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             num_beams=k, num_return_sequences=k, do_sample=False, length_penalty=lp,
                             max_new_tokens=max_new, early_stopping=early_stopping,
                             return_dict_in_generate=True, output_scores=True)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    seqs = []
    for row in out.sequences[:, len(prompt):].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # drop padding after eos
        seqs.append(row[:cut])
    return seqs, out.sequences_scores.tolist()


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """A tiny model whose eos is a token it likes to produce, so that beams end early."""
    from transformers import LlamaForCausalLM

    from conftest import make_tiny_llama
    path, model = make_tiny_llama(tmp_path_factory.mktemp("beam") / "m", num_key_value_heads=2, seed=11)
    prompt = list(range(30, 45))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    eos = int(torch.topk(logits, 3).indices[2])  # the third most likely next token
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((path / name).read_text())
        cfg["eos_token_id"] = eos
        (path / name).write_text(json.dumps(cfg))
    return path, LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), prompt


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("lp", [1.0, 0.5, 2.0])
def test_beam_search_equals_transformers(eos_model, k, lp):
    path, model, prompt = eos_model
    want, want_scores = hf_beams(model, prompt, k, lp, 10)
    with runtime(path) as rt:
        got = rt.generate([prompt], beam_width=k, n=k, length_penalty=lp, max_tokens=10)[0]
        assert rt.stats().blocks_used == 0
    assert outputs(got) == want
    np.testing.assert_allclose([o.score for o in got.outputs], want_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("early_stopping", [True, "never"])
def test_beam_search_early_stopping_modes(eos_model, early_stopping):
    path, model, prompt = eos_model
    want, want_scores = hf_beams(model, prompt, 3, 1.0, 12, early_stopping=early_stopping)
    with runtime(path) as rt:
        got = rt.generate([prompt], beam_width=3, n=3, max_tokens=12, early_stopping=early_stopping)[0]
    assert outputs(got) == want
    np.testing.assert_allclose([o.score for o in got.outputs], want_scores, rtol=1e-4, atol=1e-5)


def test_beam_search_without_eos_in_reach(tiny):
    path, model = tiny
    prompt = list(range(50, 70))
    want, want_scores = hf_beams(model, prompt, 4, 1.0, 8)
    with runtime(path) as rt:
        got = rt.generate([prompt], beam_width=4, n=4, max_tokens=8)[0]
    assert outputs(got) == want and all(o.finish_reason in ("length", "stop") for o in got.outputs)
    np.testing.assert_allclose([o.score for o in got.outputs], want_scores, rtol=1e-4, atol=1e-5)


def test_mixed_batch_equals_alone(eos_model):
    path, _, _ = eos_model
    rng = np.random.default_rng(9)
    reqs = [
        (rng.integers(3, 320, size=17).tolist(), dict(temperature=0, max_tokens=12)),
        (rng.integers(3, 320, size=30).tolist(), dict(temperature=0.8, top_k=40, seed=7, max_tokens=12)),
        (rng.integers(3, 320, size=9).tolist(), dict(beam_width=3, n=2, max_tokens=8)),
        (rng.integers(3, 320, size=25).tolist(), dict(n=2, temperature=1.1, min_p=0.05, seed=9, max_tokens=10)),
        (rng.integers(3, 320, size=12).tolist(), dict(temperature=0.7, repetition_penalty=1.3,
                                                      frequency_penalty=0.5, seed=1, max_tokens=12)),
    ]
    alone = []
    for p, kw in reqs:
        with runtime(path) as rt:
            alone.append(outputs(rt.generate([p], **kw)[0]))
    with runtime(path, max_num_batched_tokens=20) as rt:
        ids = [rt.submit(p, **kw) for p, kw in reqs]
        got = {i: {} for i in ids}
        for ev in finished_events(rt, ids):
            got[ev.request_id].setdefault(ev.index, []).extend(ev.token_ids)
    assert [[got[i][j] for j in sorted(got[i])] for i in ids] == alone


def test_padded_decode_steps_change_no_bit(tiny, monkeypatch):
    """Decode steps of more than 64 sequences run padded to a bucket of sizes
    with sequences of one dummy token (Batch::pad; CUDA's default, so that
    nearby batch sizes share a CUDA graph; PAGEDRT_DECODE_PAD=1 turns it on
    for the CPU). The dummies write no cache slot and their rows reach no
    request: every request's tokens, logprobs and logits rows are bitwise
    those of unpadded steps (the CPU's rows do not depend on the batch),
    seeded sampling included. 70 sequences decode padded to 72, then fewer
    as requests of different lengths finish."""
    path, _ = tiny
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 320, size=int(rng.integers(2, 14))).tolist() for _ in range(70)]
    sampled = pagedrt.SamplingParams(temperature=0.8, seed=7, max_tokens=6, ignore_eos=True, return_logits=True,
                                     logprobs=2)
    greedy = pagedrt.SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, return_logits=True)

    def run():
        with runtime(path, max_num_seqs=128) as rt:
            ids = [rt.submit(p, sampled if i % 2 else greedy, by_id=True) for i, p in enumerate(prompts)]
            done = {}
            for rid in ids:
                done[rid] = list(rt._events(rid))
            return [done[rid] for rid in ids], rt.stats().padded_tokens

    plain, plain_pad = run()
    monkeypatch.setenv("PAGEDRT_DECODE_PAD", "1")
    padded, pads = run()
    assert plain_pad == 0 and pads > 0
    for a, b in zip(plain, padded):
        assert [e.token_ids for e in a] == [e.token_ids for e in b]
        assert [[(lp.token_id, lp.logprob) for lp in (e.logprobs or [])] for e in a] == \
               [[(lp.token_id, lp.logprob) for lp in (e.logprobs or [])] for e in b]
        la = [e.logits for e in a if e.logits is not None]
        lb = [e.logits for e in b if e.logits is not None]
        assert len(la) == len(lb) > 0 and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("seqs,bucket", [(2, 2), (3, 4), (5, 8), (12, 16), (63, 64)])
def test_small_decode_batches_pad_to_their_bucket(tiny, monkeypatch, seqs, bucket):
    """Decode steps of 3 to 64 sequences pad too (to 4, to 8, then to a
    multiple of 8), so that a batch shrinking as its requests end replays a
    few CUDA graphs instead of recording each size. One request of n = `seqs`
    seeded samples of 9 tokens decodes 8 steps of `seqs` sequences after its
    prefill: exactly (bucket - seqs) dummies a step, and every sample's tokens
    and logprobs bitwise those unpadded."""
    path, _ = tiny
    prompt = np.random.default_rng(seqs).integers(3, 320, size=7).tolist()

    def run():
        with runtime(path, max_num_seqs=128) as rt:
            c = rt.generate([prompt], max_tokens=9, temperature=0.8, seed=3, n=seqs, logprobs=1, ignore_eos=True)[0]
            return [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in c.outputs], rt.stats().padded_tokens

    plain, plain_pad = run()
    monkeypatch.setenv("PAGEDRT_DECODE_PAD", "1")
    padded, pads = run()
    assert plain_pad == 0 and pads == 8 * (bucket - seqs)
    assert len(padded) == seqs and padded == plain


def test_logprobs_are_log_softmax_of_the_logits(tiny):
    path, model = tiny
    prompt = list(range(100, 120))
    with runtime(path) as rt:
        out = rt.generate([prompt], temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)[0].outputs[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1:]
    ref = torch.log_softmax(logits.double(), -1)
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - ref[i, lp.token_id].item()) < 1e-4
        top = torch.topk(ref[i], 3)
        assert list(lp.top_logprobs) == top.indices.tolist()
    assert abs(out.cumulative_logprob - sum(lp.logprob for lp in out.logprobs)) < 1e-4


def test_prompt_logprobs_are_log_softmax_of_the_prompt_logits(tiny):
    """prompt_logprobs = k: every prompt token after the first gets its logprob
    under the logits at the position before it (transformers as the oracle) and
    the top k there, across chunked prefill (max_num_batched_tokens 16 < 40
    prompt tokens) and a prompt whose prefix is already cached (a request with
    prompt_logprobs computes its whole prompt)."""
    path, model = tiny
    prompt = [(7 * i) % 250 + 3 for i in range(40)]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), -1)
    with runtime(path, max_num_batched_tokens=16) as rt:
        rt.generate([prompt], temperature=0, max_tokens=2)  # its full blocks go to the prefix cache
        for _ in range(2):
            c = rt.generate([prompt], temperature=0, max_tokens=2, prompt_logprobs=2)[0]
            assert len(c.prompt_logprobs) == len(prompt) - 1
            for j, lp in enumerate(c.prompt_logprobs, start=1):
                assert lp.token_id == prompt[j]
                assert abs(lp.logprob - ref[j - 1, prompt[j]].item()) < 1e-4
                assert list(lp.top_logprobs) == torch.topk(ref[j - 1], 2).indices.tolist()
        assert rt.generate([prompt], max_tokens=2)[0].prompt_logprobs is None
        with pytest.raises(pagedrt.InvalidArgument, match="prompt_logprobs"):
            rt.submit(prompt, prompt_logprobs=21)


def test_too_wide_requests_are_rejected(tiny):
    path, _ = tiny
    with runtime(path, max_num_seqs=4) as rt:
        with pytest.raises(pagedrt.InvalidArgument, match="max_num_seqs"):
            rt.submit([5, 6, 7], n=5)
        with pytest.raises(pagedrt.InvalidArgument, match="beam_width"):
            rt.submit([5, 6, 7], beam_width=2, n=3)
        with pytest.raises(pagedrt.InvalidArgument, match="logit_bias has token 999"):
            rt.submit([5, 6, 7], logit_bias={999: 1.0})
