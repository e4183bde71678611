"""The C++ sampler against exact target distributions and a Python reference
of the logits processing (through the _testing._sample_counts and
_testing._process_logits test hooks, which call the engine's own Sampler)."""
from __future__ import annotations

import numpy as np
import pytest

import pagedrt
from pagedrt import _testing

LOGITS = np.array([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, 1.0, 0.9, -3.0, 0.2, 1.45], np.float32)
DRAWS = 200_000
TV_BOUND = 0.01  # sampling noise is about sqrt(12 / 200k) / 2 = 0.004


def target(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution pagedrt's documentation defines, computed independently."""
    x = logits.astype(np.float64) / temperature
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    keep = order[:top_k] if 0 < top_k < len(x) else order
    p = np.exp(x[keep] - x[keep].max())
    p /= p.sum()
    if top_p < 1.0:
        cum, n = 0.0, 0
        while n < len(keep):
            cum += p[n]
            n += 1
            if cum >= top_p:
                break
        keep, p = keep[:n], p[:n]
    if min_p > 0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
    out = np.zeros(len(x))
    out[keep] = p / p.sum()
    return out


def counts(logits, **kw):
    params = pagedrt.SamplingParams(seed=1234, **kw)._to_core()
    return np.array(_testing._sample_counts(logits, params, DRAWS), np.float64)


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0),
    dict(top_k=3),
    dict(top_k=5, temperature=0.7),
    dict(top_p=0.6),
    dict(top_p=0.9, temperature=1.3),
    dict(min_p=0.3),
    dict(top_k=6, top_p=0.8, min_p=0.5),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_empirical_distribution_matches_target(kw):
    want = target(LOGITS, **kw)
    got = counts(LOGITS, **kw) / DRAWS
    assert 0.5 * np.abs(got - want).sum() < TV_BOUND
    assert np.all(got[want == 0] == 0)  # filtered tokens are never drawn


def test_top_p_nucleus_past_the_first_band():
    """top_p sorts only the nucleus: the most likely 64 candidates, then 256
    more, ... until the running sum reaches top_p. A 3,000-token row with 150
    tied leaders (ids scattered) and a tail 20 nats down: top_p 0.49 keeps
    exactly the 74 leaders of lowest id (74 / 150 is the first share past
    0.49; ties go to the lower id, across the bands), top_p 0.999 exactly
    the 150; every kept token is drawn."""
    rng = np.random.default_rng(8)
    x = np.full(3000, -20.0, np.float32)
    leaders = np.sort(rng.choice(3000, size=150, replace=False))
    x[leaders] = 0.0
    for top_p, kept in ((0.49, leaders[:74]), (0.999, leaders)):
        got = np.array(_testing._sample_counts(x, pagedrt.SamplingParams(seed=5, top_p=top_p)._to_core(), 30_000))
        assert set(np.nonzero(got)[0].tolist()) == set(kept.tolist()), top_p


def test_greedy_and_ties():
    assert counts(LOGITS, temperature=0.0)[0] == DRAWS
    tie = np.array([0.0, 3.0, 3.0, 1.0], np.float32)
    assert counts(tie, temperature=0.0)[1] == DRAWS  # ties go to the lowest id


def test_cpu_backend_argmax_rows():
    """The CPU backend's greedy pick (CpuBackend::argmax: backend/cpu/argmax.hpp's
    first_argmax, the Sampler's too) against numpy's rule (argmax_cases.py):
    ties, NaN beside numbers, all NaN, all -inf but one; a vocabulary that is
    not a multiple of 16; with allowed-token masks (structured output), rows
    sharing a mask, one allowed token, allowed tokens all -inf."""
    import argmax_cases
    cpu = _testing._Ops("cpu")
    x, want = argmax_cases.unmasked_rows()
    assert cpu.argmax(x) == want
    small = np.random.default_rng(4).standard_normal((3, 37)).astype(np.float32)  # a 5-value tail
    assert cpu.argmax(small) == [int(np.argmax(r)) for r in small]
    x, masks, mask_of_row, want = argmax_cases.masked_rows()
    assert cpu.argmax(x, masks, mask_of_row) == want
    assert cpu.argmax(x) == [int(np.argmax(r)) for r in x]


@pytest.mark.parametrize("case", ["plain", "tie", "nan", "all_nan", "neg_inf", "tail"])
def test_greedy_long_rows(case):
    """Greedy over a vocabulary-sized row (the vectorized scan and its scalar
    tail): the first index of the largest value, NaN never chosen over a
    number, an all-NaN row gives 0."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(49_157).astype(np.float32)  # not a multiple of 16: a 5-value tail
    if case == "tie":
        x[[20_001, 30_000]] = 9.0
    elif case == "nan":
        x[:100] = np.nan
        x[40_000] = 7.0
    elif case == "all_nan":
        x[:] = np.nan
    elif case == "neg_inf":
        x[:] = -np.inf
        x[[7, 49_150]] = np.nan
        x[33] = -np.inf
    elif case == "tail":
        x[49_155] = 8.0
    want = 0 if np.isnan(x).all() else int(np.nanargmax(x))
    got = np.nonzero(np.array(_testing._sample_counts(x, pagedrt.SamplingParams(temperature=0.0)._to_core(), 3)))[0]
    assert got.tolist() == [want]


def test_seeded_streams_repeat_and_differ():
    p = lambda s: pagedrt.SamplingParams(seed=s)._to_core()
    a = _testing._sample_counts(LOGITS, p(7), 1000)
    assert a == _testing._sample_counts(LOGITS, p(7), 1000)
    assert a != _testing._sample_counts(LOGITS, p(8), 1000)


def reference_process(logits, tokens, prompt_len, eos, *, logit_bias=None, min_tokens=0, ignore_eos=False,
                      stop_token_ids=(), repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
    x = logits.astype(np.float32).copy()
    for t, b in (logit_bias or {}).items():
        x[t] += np.float32(b)
    if len(tokens) - prompt_len < min_tokens:
        for t in ([] if ignore_eos else list(eos)) + list(stop_token_ids):
            x[t] = -np.inf
    if repetition_penalty != 1.0:
        for t in set(tokens):
            x[t] = x[t] / np.float32(repetition_penalty) if x[t] > 0 else x[t] * np.float32(repetition_penalty)
    out = tokens[prompt_len:]
    for t in set(out):
        x[t] -= np.float32(frequency_penalty) * np.float32(out.count(t)) + np.float32(presence_penalty)
    return x


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8),
    dict(frequency_penalty=0.5),
    dict(presence_penalty=-0.7),
    dict(frequency_penalty=0.4, presence_penalty=1.1, repetition_penalty=1.2),
    dict(logit_bias={3: 5.0, 7: -100.0}),
    dict(min_tokens=10, stop_token_ids=[4]),
    dict(min_tokens=10, ignore_eos=True, stop_token_ids=[4]),  # eos stays allowed
    dict(min_tokens=7),                                         # 6 generated: eos banned
])
def test_penalties_and_biases_match_reference(kw):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    tokens = rng.integers(0, 50, size=12).tolist() + [5, 5, 9, 5, 20, 9]  # prompt 12, output 6
    eos = [2, 11]
    params = pagedrt.SamplingParams(**kw)._to_core()
    got = np.array(_testing._process_logits(logits, params, tokens, 12, eos), np.float32)
    want = reference_process(logits, tokens, 12, eos, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(got, logits)  # each case changes something
    if kw.get("ignore_eos"):
        assert got[2] == logits[2] and got[11] == logits[11]


def apply_edits(x, edits):
    """A row processed by the device's edits (backend.hpp's LogitEdit), in numpy
    fp32: bias, ban, repetition, then frequency / presence (f * c + p exact
    in float64 for these values, so one rounding, as the device's fma)."""
    tok, flags, bias, count, (rep, freq, pres) = edits
    tok, flags, count = np.array(tok, np.int64), np.array(flags, np.int64), np.array(count, np.int64)
    v = x[tok].copy()
    v = np.where(flags & 1, v + np.array(bias, np.float32), v).astype(np.float32)
    v = np.where(flags & 2, np.float32(-np.inf), v).astype(np.float32)
    rep = np.float32(rep)
    v = np.where(flags & 4, np.where(v > 0, v / rep, v * rep), v).astype(np.float32)
    pen = (np.float64(freq) * count + np.float64(pres)).astype(np.float32)
    v = np.where(count > 0, v - pen, v).astype(np.float32)
    y = x.copy()
    y[tok] = v
    return y


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.3),
    dict(frequency_penalty=0.6, presence_penalty=-0.4),
    dict(logit_bias={3: 2.5, 50: -7.0}, min_tokens=9, stop_token_ids=[4, 50]),
    dict(repetition_penalty=0.8, frequency_penalty=1.1, presence_penalty=0.3, logit_bias={7: 1.0}, min_tokens=3),
], ids=lambda kw: ",".join(kw))
def test_device_edits_process_as_the_host(kw):
    """The edits with which CUDA's sampling processes a row
    (Sampler::device_edits: sorted, one a token) give the host's processed
    row (Sampler::process) bit for bit, at every length of a growing
    sequence, through one TokenHistory extended as it grows (no pass over
    the whole sequence a step)."""
    rng = np.random.default_rng(4)
    vocab = 300
    prompt = rng.integers(0, 60, 40).tolist()
    out = rng.integers(0, 60, 30).tolist()  # a small id range: repeats in and across prompt and output
    snapshots = [prompt + out[:i] for i in range(0, 31, 3)]
    params = pagedrt.SamplingParams(**kw)._to_core()
    eos = [2, 50]
    got = _testing._device_edits(params, snapshots, len(prompt), eos)
    assert len(got) == len(snapshots)
    for toks, edits in zip(snapshots, got):
        assert list(edits[0]) == sorted(set(edits[0]))
        x = (3 * rng.standard_normal(vocab)).astype(np.float32)
        want = np.array(_testing._process_logits(x, params, toks, len(prompt), eos), np.float32)
        assert np.array_equal(apply_edits(x, edits), want)


def test_min_tokens_reached_changes_nothing():
    logits = np.linspace(-1, 1, 20).astype(np.float32)
    params = pagedrt.SamplingParams(min_tokens=2)._to_core()
    got = np.array(_testing._process_logits(logits, params, [1, 2, 3, 4, 5], 2, [7]), np.float32)
    assert np.array_equal(got, logits)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature must be >= 0"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("top_k", -2, "top_k"),
    ("min_p", 1.2, "min_p"),
    ("n", 0, "n must be >= 1"),
    ("max_tokens", 0, "max_tokens must be >= 1"),
    ("min_tokens", 50, "min_tokens"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("presence_penalty", 3.0, "presence_penalty"),
    ("frequency_penalty", -2.5, "frequency_penalty"),
    ("logprobs", 50, "logprobs must be in [0, 20]"),
    ("logprobs", 21, "logprobs must be in [0, 20]"),
    ("logprobs", -1, "logprobs must be in [0, 20] (or unset), got -1"),
    ("beam_width", 0, "beam_width"),
    ("early_stopping", "sometimes", "early_stopping"),
    ("seed", -1, "seed"),
    ("temperature", "hot", "temperature must be a number"),
    ("stop", [""], "stop must be non-empty"),
])
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(pagedrt.InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        pagedrt.SamplingParams(**{field: value})._to_core()


def test_unknown_field_is_rejected():
    with pytest.raises(pagedrt.InvalidArgument, match="unknown sampling parameter"):
        pagedrt.SamplingParams().replace(temprature=0.5)
