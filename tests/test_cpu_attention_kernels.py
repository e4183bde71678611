"""The CPU paged-attention kernel's tiles, through the whole forward, against
transformers' contiguous attention.

The kernel (cpp/src/backend/cpu/attention.cpp) takes up to 48 / G query tokens
of a sequence per work item and walks the page table 16 keys at a time; the
shapes below reach each of its paths: G = 1, 2, 3, 4, 12 and 32 (tiles of 48,
24, 16, 12, 4 and 1 tokens), head dims 64 and 128 (the vector path), 48 (a half
column block of bf16 pairs) and 40 (the portable path). Three prompts share
each step in 13-token chunks, so tiles start mid-sequence over cached context
and their causal ends fall anywhere in a 16-key chunk, with 16-token blocks
and 5-token ones (a chunk then spans up to four blocks).

Tolerances: fp32 activations, relative error of the logits <= 1e-4 against
transformers in fp32 (as tests/test_forward.py); bf16 activations, <= 8e-3
against the reference that rounds to bf16 where pagedrt stores (see
test_bf16_activations_match_a_bf16_rounding_reference).
"""
from __future__ import annotations

import numpy as np
import pytest

import pagedrt
from pagedrt import _testing
from conftest import logit_rows_attention, paged_batch, run_all
from test_forward import REL_TOL, reference_logits, reference_logits_bf16_activations, rel_err

SHAPES = {  # name: (num_attention_heads, num_key_value_heads, head_dim, hidden_size)
    "g1-d64": (2, 2, 64, 128),
    "g2-d64": (4, 2, 64, 128),
    "g3-d64": (6, 2, 64, 192),
    "g4-d128": (4, 1, 128, 128),
    "g2-d48": (4, 2, 48, 128),
    "g1-d40": (2, 2, 40, 128),
    "g12-d32": (12, 1, 32, 192),
    "g32-d16": (32, 1, 16, 128),
}


@pytest.mark.parametrize("act", ["float32", "bfloat16", "bfloat16-any-order"])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_chunked_batched_prefill_and_decode_match_contiguous_attention(tiny_llama, shape, block_size, act):
    """bfloat16-any-order: deterministic=False, whose prefill tiles take P V on
    AMX tiles where the processor has them (P rounded to bf16)."""
    H, Hkv, D, hidden = SHAPES[shape]
    path, model = tiny_llama(num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D, hidden_size=hidden)
    rng = np.random.default_rng(H * 1000 + D)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (45, 9, 70)]
    deterministic = act != "bfloat16-any-order"
    act = act.removesuffix("-any-order")
    # AMX attention (deterministic=False, D % 32 == 0) rounds P to bf16 (that it runs exactly
    # there: test_prefill_tiles_take_amx_tiles_exactly_where_allowed)
    round_p = act == "bfloat16" and not deterministic and _testing._gemm_amx_for_large_steps() and D % 32 == 0
    with pagedrt.Runtime(path, device="cpu", activation_dtype=act, block_size=block_size,
                         max_num_batched_tokens=13, num_threads=2, deterministic=deterministic) as rt:
        got = run_all(rt, prompts, max_tokens=5, ignore_eos=True, return_logits=True)
    tol = REL_TOL if act == "float32" else 8e-3
    for (tokens, logits), prompt in zip(got, prompts):
        if act == "float32":
            ref = reference_logits(model, prompt + tokens[:-1])
        else:
            ref = reference_logits_bf16_activations(model, prompt + tokens[:-1], round_p=round_p)
        assert logits.shape == ref.shape
        assert rel_err(logits, ref) <= tol, (shape, block_size, act, rel_err(logits, ref))


# ---- op level (pagedrt._testing._Ops("cpu"): fp32 activations and KV cache) -----------

@pytest.fixture(scope="module")
def cpu_ops():
    from pagedrt import _testing
    return _testing._Ops("cpu")


def set_batch(ops, rng, seqs, block_size):
    """seqs: (cached, new) tokens per sequence; blocks handed out shuffled.
    Returns the block table of each sequence and the number of blocks."""
    need = [-(-(c + n) // block_size) for c, n in seqs]
    perm = rng.permutation(sum(need) + 3)
    tables = np.split(perm[:sum(need)], np.cumsum(need)[:-1])
    set_tables(ops, seqs, tables, block_size)
    return tables, len(perm)


def set_tables(ops, seqs, tables, block_size):
    """The batch of seqs ((cached, new) tokens each) on the given block tables."""
    need = [len(t) for t in tables]
    positions = np.concatenate([np.arange(c, c + n) for c, n in seqs])
    slots = np.concatenate([t[np.arange(c, c + n) // block_size] * block_size + np.arange(c, c + n) % block_size
                            for (c, n), t in zip(seqs, tables)])
    i32 = lambda a: np.ascontiguousarray(a, np.int32)  # noqa: E731
    ops.set_batch(i32(np.zeros(len(positions))), i32(positions), np.ascontiguousarray(slots, np.int64),
                  i32(np.cumsum([0] + [n for _, n in seqs])), i32([c + n for c, n in seqs]),
                  i32(np.cumsum([0] + need)), i32(np.concatenate(tables)), i32([len(positions) - 1]))


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("G,D", [(1, 64), (2, 64), (3, 64), (4, 128), (3, 48), (2, 40), (12, 32)])
def test_paged_attention_matches_contiguous_numpy(cpu_ops, G, D, block_size):
    """fp32: max |out - float64 softmax(q k^T / sqrt(D)) v| <= 1e-5 over the rows of
    a batch with prefill tiles over cached context and single decode tokens."""
    rng = np.random.default_rng(G * 100 + D + block_size)
    Hkv = 2 if G < 12 else 1
    H = G * Hkv
    seqs = [(0, 19), (37, 1), (5, 30), (60, 9), (200, 1), (3, 70)]  # 70: full tiles and a partial one
    tables, num_blocks = set_batch(cpu_ops, rng, seqs, block_size)
    T = sum(n for _, n in seqs)
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * D)).astype(np.float32)
    k_cache = rng.standard_normal((num_blocks, block_size, Hkv, D)).astype(np.float32)
    v_cache = rng.standard_normal((num_blocks, block_size, Hkv, D)).astype(np.float32)
    scale = D ** -0.5
    out = cpu_ops.paged_attention(qkv, k_cache, v_cache, H, Hkv, D, scale)
    assert out.shape == (T, H * D)
    t = 0
    for (cached, new), table in zip(seqs, tables):
        ctx = cached + new
        k = k_cache[table].reshape(-1, Hkv, D)[:ctx].astype(np.float64)  # (ctx, Hkv, D) contiguous
        v = v_cache[table].reshape(-1, Hkv, D)[:ctx].astype(np.float64)
        q = qkv[t:t + new, :H * D].reshape(new, H, D).astype(np.float64)
        s = np.einsum("thd,shd->hts", q, np.repeat(k, G, axis=1)) * scale  # (H, new, ctx)
        s[:, np.arange(new)[:, None] + cached < np.arange(ctx)[None, :]] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), np.repeat(v, G, axis=1))
        assert np.max(np.abs(out[t:t + new] - ref.reshape(new, H * D))) <= 1e-5, (cached, new)
        t += new


@pytest.mark.parametrize("act", ["float32", "bfloat16"])
@pytest.mark.parametrize("G,D", [(1, 64), (3, 64), (4, 128), (2, 32), (3, 48)])
def test_decode_tokens_by_token_or_by_kv_head_agree_bitwise(act, G, D):
    """A decode-only step with tokens enough for every thread takes each
    token's kv heads as one item (attend_heads: a position's heads are one
    run of the block), a step of one token an item per kv head (attend): each
    token's output has the same bits either way (the batch-invariant mode
    rests on it), and is within tolerance of float64 attention on the
    gathered blocks."""
    from pagedrt import _testing
    ops = _testing._Ops("cpu", act)
    rng = np.random.default_rng(G * 1000 + D)
    Hkv, bs = 3, 16
    H = G * Hkv
    seqs = [(c, 1) for c in (0, 14, 15, 16, 90, 199, 32, 63, 4)]  # contexts crossing blocks and 16-key chunks
    need = [-(-(c + 1) // bs) for c, _ in seqs]
    perm = rng.permutation(sum(need) + 2)
    tables = np.split(perm[:sum(need)], np.cumsum(need)[:-1])
    qkv = rng.standard_normal((len(seqs), (H + 2 * Hkv) * D)).astype(np.float32)
    k_cache = rng.standard_normal((len(perm), bs, Hkv, D)).astype(np.float32)
    v_cache = rng.standard_normal((len(perm), bs, Hkv, D)).astype(np.float32)
    set_tables(ops, seqs, tables, bs)
    together = ops.paged_attention(qkv, k_cache, v_cache, H, Hkv, D, D ** -0.5)
    tol = 1e-5 if act == "float32" else 2e-2
    for i, ((cached, _), table) in enumerate(zip(seqs, tables)):
        set_tables(ops, [(cached, 1)], [table], bs)
        alone = ops.paged_attention(qkv[i:i + 1], k_cache, v_cache, H, Hkv, D, D ** -0.5)
        assert np.array_equal(alone[0], together[i]), (i, cached)
        ctx = cached + 1
        k = k_cache[table].reshape(-1, Hkv, D)[:ctx].astype(np.float64)
        v = v_cache[table].reshape(-1, Hkv, D)[:ctx].astype(np.float64)
        q = qkv[i, :H * D].reshape(H, D).astype(np.float64)
        s = np.einsum("hd,shd->hs", q, np.repeat(k, G, axis=1)) * D ** -0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("hs,shd->hd", p / p.sum(-1, keepdims=True), np.repeat(v, G, axis=1)).reshape(-1)
        assert np.max(np.abs(together[i] - ref)) <= tol * max(1.0, np.abs(ref).max()), (i, cached)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("D", [64, 48])
def test_prefill_tiles_take_amx_tiles_exactly_where_allowed(deterministic, D):
    """bf16 prefill tiles (more than 4 rows) run on AMX tiles exactly where
    deterministic=False, the processor has AMX and D % 32 == 0 (the count of
    tiles that path ran, _attention_amx_tiles: a silent fall-back to the
    VDPBF16PS path would pass the reference tests too); either way within
    bf16's tolerance of the float64 attention (2e-2 of the largest |out|)."""
    from pagedrt import _testing
    ops = _testing._Ops("cpu", "bfloat16", deterministic)
    rng = np.random.default_rng(D + deterministic)
    H, Hkv = 4, 2
    seqs = [(5, 30), (0, 19), (40, 1)]
    tables, num_blocks = set_batch(ops, rng, seqs, 16)
    T = sum(n for _, n in seqs)
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * D)).astype(np.float32)
    k_cache = rng.standard_normal((num_blocks, 16, Hkv, D)).astype(np.float32)
    v_cache = rng.standard_normal((num_blocks, 16, Hkv, D)).astype(np.float32)
    before = _testing._attention_amx_tiles()
    out = np.asarray(ops.paged_attention(qkv, k_cache, v_cache, H, Hkv, D, D ** -0.5), np.float64)
    took = _testing._attention_amx_tiles() > before
    assert took == (not deterministic and _testing._gemm_amx_for_large_steps() and D % 32 == 0)
    t = 0
    for (cached, new), table in zip(seqs, tables):
        ctx = cached + new
        k = np.repeat(k_cache[table].reshape(-1, Hkv, D)[:ctx], H // Hkv, axis=1).astype(np.float64)
        v = np.repeat(v_cache[table].reshape(-1, Hkv, D)[:ctx], H // Hkv, axis=1).astype(np.float64)
        q = qkv[t:t + new, :H * D].reshape(new, H, D).astype(np.float64)
        s = np.einsum("thd,shd->hts", q, k) * D ** -0.5
        s[:, np.arange(new)[:, None] + cached < np.arange(ctx)[None, :]] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v).reshape(new, H * D)
        assert np.max(np.abs(out[t:t + new] - ref)) <= 2e-2 * np.max(np.abs(ref)), (cached, new)
        t += new


@pytest.mark.parametrize("n,d", [(1, 576), (33, 576), (3, 61), (130, 1544)])
def test_norms_add_and_silu_mul_match_numpy(cpu_ops, n, d):
    """fp32: relative error <= 1e-6 (the vector paths sum in another order; the
    vector e^x is within 2e-7 of exp); silu_mul over |g| up to 100, where e^-g
    is near 0 or past the fp32 range."""
    rng = np.random.default_rng(n + d)
    set_batch(cpu_ops, rng, [(0, n)], 16)
    res = (rng.standard_normal((n, d)) * 3).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)
    r64 = res.astype(np.float64) + x
    norm = lambda a: w * (a / np.sqrt((a * a).mean(-1, keepdims=True) + 1e-5))  # noqa: E731
    assert rel_err(cpu_ops.rms_norm(res, w, 1e-5), norm(res.astype(np.float64))) <= 1e-6
    r, y = cpu_ops.add_rms_norm(res, x, w, 1e-5)
    assert rel_err(r, r64) <= 1e-7 and rel_err(y, norm(r64)) <= 1e-6
    assert rel_err(cpu_ops.add(res, x), r64) <= 1e-7
    g = rng.standard_normal((n, d)) * np.where(rng.random((n, d)) < 0.1, 40.0, 3.0)
    g[0, :4] = [100.0, -100.0, 88.5, -88.5][:min(4, d)]
    u = rng.standard_normal((n, d))
    gate_up = np.concatenate([g, u], axis=1).astype(np.float32)
    g64, u64 = gate_up[:, :d].astype(np.float64), gate_up[:, d:].astype(np.float64)
    assert rel_err(cpu_ops.silu_mul(gate_up), g64 / (1 + np.exp(-g64)) * u64) <= 1e-6


@pytest.fixture
def split_rule():
    """Sets the CPU attention's split rule of this module's kernels for a test
    (attention_split_rule: -1 the default, 1 wider), and puts the one before back."""
    from pagedrt import _testing
    before = _testing._attention_split_rule()
    yield _testing._set_attention_split_rule
    _testing._set_attention_split_rule(before)


@pytest.mark.parametrize("act", ["float32", "bfloat16"])
@pytest.mark.parametrize("G,D,Hkv", [(3, 64, 1), (4, 128, 1), (1, 64, 1), (3, 64, 3), (2, 128, 3), (4, 64, 5)])
@pytest.mark.parametrize("rule", [-1, 1])
def test_a_decode_token_split_across_the_team_keeps_its_bits(act, G, D, Hkv, rule, split_rule):
    """A decode step whose (token, kv head) items leave more than half the
    team idle (rule -1, the default; rule 1 also where fewer than twice the
    team's items do not divide among it) splits each token across every
    thread (attend_token_split: a thread a run of keys for Q K^T, then of
    output columns for P V), from 512 keys of context on: its output has the
    bits of one thread's (the items path, lend_threads leaving one core), and
    is within tolerance of float64 attention on the gathered blocks;
    _attention_split_tokens counts the tokens that took the split, so a
    silent fall-back, or a split where the rule says none, fails (a build
    without AVX-512, or without AVX-512 BF16 for bf16, has no such path: it
    must not count any). Needs 2 cores (CI's machine has them)."""
    import os
    from pagedrt import _testing
    if (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) < 2:
        pytest.skip("one core: no team to split across")
    ops = _testing._Ops("cpu", act)
    threads = ops.host_threads()
    if threads < 2:
        pytest.skip("the backend runs one thread here")
    split_rule(rule)
    takes = 2 * Hkv <= threads if rule == -1 else Hkv < 2 * threads and Hkv % threads != 0
    built = int(_testing._attention_split_built(act == "bfloat16") and takes)
    rng = np.random.default_rng(G * 1000 + D + Hkv)
    H, bs = G * Hkv, 16
    tol = 1e-5 if act == "float32" else 2e-2
    for cached in (511, 600, 1037, 4100):  # 512 keys (the first split), chunk and block tails, long contexts
        need = -(-(cached + 1) // bs)
        table = rng.permutation(need + 3)[:need]
        qkv = rng.standard_normal((1, (H + 2 * Hkv) * D)).astype(np.float32)
        k_cache = rng.standard_normal((need + 3, bs, Hkv, D)).astype(np.float32)
        v_cache = rng.standard_normal((need + 3, bs, Hkv, D)).astype(np.float32)
        set_tables(ops, [(cached, 1)], [table], bs)
        before = _testing._attention_split_tokens()
        split = ops.paged_attention(qkv, k_cache, v_cache, H, Hkv, D, D ** -0.5)
        assert _testing._attention_split_tokens() == before + built, cached
        ops.lend_threads(ops.host_threads() - 1)  # a team of one
        try:
            one = ops.paged_attention(qkv, k_cache, v_cache, H, Hkv, D, D ** -0.5)
        finally:
            ops.lend_threads(0)
        assert _testing._attention_split_tokens() == before + built, cached
        assert np.array_equal(split, one), cached
        ctx = cached + 1
        k = k_cache[table].reshape(-1, Hkv, D)[:ctx].astype(np.float64)
        v = v_cache[table].reshape(-1, Hkv, D)[:ctx].astype(np.float64)
        q = qkv[0, :H * D].reshape(H, D).astype(np.float64)
        s = np.einsum("hd,shd->hs", q, np.repeat(k, G, axis=1)) * D ** -0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("hs,shd->hd", p / p.sum(-1, keepdims=True), np.repeat(v, G, axis=1)).reshape(-1)
        assert np.max(np.abs(split[0] - ref)) <= tol * max(1.0, np.abs(ref).max()), cached
    set_tables(ops, [(510, 1)], [np.arange(32)], bs)  # 511 keys: the items path
    before = _testing._attention_split_tokens()
    ops.paged_attention(rng.standard_normal((1, (H + 2 * Hkv) * D)).astype(np.float32),
                        rng.standard_normal((32, bs, Hkv, D)).astype(np.float32),
                        rng.standard_normal((32, bs, Hkv, D)).astype(np.float32), H, Hkv, D, D ** -0.5)
    assert _testing._attention_split_tokens() == before


@pytest.mark.parametrize("G,D", [(1, 64), (4, 128), (3, 64)])
def test_attention_on_logit_rows_only(cpu_ops, G, D):
    """The last layer's attention (rope_cache_attention_logit_rows): every
    token's K and V cached, attention run for the tiles (kTileRows / G tokens,
    cut as among all) that hold a logit row, with the bits the full op gives
    them; the others left unwritten: a 130-token prompt's first 96 tokens,
    and the whole of a chunk that reads no logits (sequence 2)."""
    rng = np.random.default_rng(G * 10 + D)
    Hkv = 2
    H = G * Hkv
    seqs = [(0, 130), (40, 1), (7, 60), (300, 1), (0, 9)]
    need = [-(-(c + n) // 16) for c, n in seqs]
    perm = rng.permutation(sum(need) + 3).tolist()
    tables = [perm[sum(need[:i]):sum(need[:i + 1])] for i in range(len(seqs))]
    b = paged_batch([(t, c, n) for t, (c, n) in zip(tables, seqs)])
    b["logits_indices"].pop(2)  # sequence 2: a prompt chunk before its last
    T = len(b["tokens"])
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * D)).astype(np.float32)
    kc = rng.standard_normal((len(perm), 16, Hkv, D)).astype(np.float32)
    vc = rng.standard_normal((len(perm), 16, Hkv, D)).astype(np.float32)
    left = logit_rows_attention(cpu_ops, b, qkv, kc, vc, H, Hkv, D)
    per_tile = max(1, 48 // G)
    first_tile_of_last = (130 - 1) // per_tile * per_tile  # the prompt's tile holding its last token
    assert left >= set(range(first_tile_of_last)), "the prompt's earlier tiles ran"
    assert left >= set(range(131, 131 + 60)), "the chunk without a logit row ran"
    assert not left & ({130, 191} | set(range(first_tile_of_last, 130)) | set(range(192, 201))), \
        "a decode token or a logit row's tile was left"
