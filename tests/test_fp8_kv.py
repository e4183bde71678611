"""kv_cache_dtype="fp8": the KV cache as e4m3 codes with a power-of-two scale per
(token, kv head) row (cpp/src/backend/paged_kv.hpp's Fp8Kv).

References: a numpy quantizer (each row's exponent is the smallest e with
max |x| <= 448 * 2^e; codes are torch's float8_e4m3fn rounding of x * 2^-e),
the CPU kernels on the dequantized cache, and transformers' weights run in
fp32 with K (after RoPE) and V rounded by that quantizer.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pagedrt
from conftest import run_all
from test_cpu_attention_kernels import set_batch
from test_forward import REL_TOL, reference_logits, rel_err

E_MIN, E_MAX = -110, 119


def row_exponents(x):
    """(..., D) -> (...) int: the smallest e with max |x| <= 448 * 2^e, clamped."""
    amax = np.abs(x.astype(np.float64)).max(-1)
    e = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-300) / 448.0)), E_MIN)
    e = np.clip(e, E_MIN, E_MAX).astype(np.int64)
    e = np.where(amax > 448.0 * np.exp2(e.astype(np.float64)), e + 1, e)  # log2's rounding, both ways
    e = np.where((e > E_MIN) & (amax <= 448.0 * np.exp2(e - 1.0)), e - 1, e)
    return np.clip(e, E_MIN, E_MAX)


def quantize(x):
    """(..., D) float32 -> codes (..., D) uint8, exps (...) int8."""
    e = row_exponents(x)
    scaled = torch.from_numpy((x.astype(np.float32) * np.exp2(-e.astype(np.float32))[..., None]).astype(np.float32))
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return codes, e.astype(np.int8)


def dequantize(codes, exps):
    vals = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float().numpy()
    return (vals * np.exp2(exps.astype(np.float32))[..., None]).astype(np.float32)


def fake_quant(x):
    return dequantize(*quantize(x))


def exp_bytes(bs, hkv):
    return -(-bs * hkv // 16) * 16


def pack(codes, exps):
    """codes (nb, bs, Hkv, D), exps (nb, bs, Hkv) -> the cache's bytes (nb, bs, row_bytes)."""
    nb, bs, hkv, d = codes.shape
    e = np.zeros((nb, exp_bytes(bs, hkv)), np.uint8)
    e[:, :bs * hkv] = exps.transpose(0, 2, 1).reshape(nb, -1).view(np.uint8)
    return np.concatenate([codes.reshape(nb, -1), e], 1).reshape(nb, bs, -1)


def unpack(cache, hkv, d):
    nb, bs, _ = cache.shape
    flat = cache.reshape(nb, -1)
    codes = flat[:, :bs * hkv * d].reshape(nb, bs, hkv, d)
    exps = flat[:, bs * hkv * d:bs * hkv * d + bs * hkv].view(np.int8).reshape(nb, hkv, bs).transpose(0, 2, 1)
    return codes, exps


@pytest.fixture(scope="module")
def ops():
    from pagedrt import _testing
    return {act: (_testing._Ops("cpu", act), _testing._Ops("cpu", act, kv_cache_dtype="fp8"))
            for act in ("float32", "bfloat16")}


def test_row_exponents_and_codes_match_torch_on_edges():
    """The reference itself: top binade reached, nothing saturates, zeros and ties."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 64)).astype(np.float32) * np.exp2(rng.integers(-30, 30, (200, 1))).astype(np.float32)
    x[0] = 0.0
    x[1, :] = 448.0
    x[2, 0] = np.float32(448.0) * np.float32(1.0000001)
    codes, e = quantize(x)
    amax = np.abs(x).max(-1)
    scaled = np.abs(x) * np.exp2(-e.astype(np.float64))[:, None]
    assert np.all(scaled.max(-1)[1:] <= 448) and np.all(scaled.max(-1)[1:] > 224)
    assert e[1] == 0 and e[2] == 1 and e[0] == E_MIN
    assert np.array_equal(dequantize(codes, e)[0], x[0])
    assert np.all(np.abs(dequantize(codes, e) - x) <= amax[:, None] * 2.0 ** -4 + 1e-30)


@pytest.mark.parametrize("act", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [16, 4, 32])
@pytest.mark.parametrize("Hkv,D", [(2, 64), (3, 64), (1, 128), (2, 40)])
def test_rope_and_cache_quantizes_each_row(ops, act, block_size, Hkv, D):
    """The fp8 cache holds exactly the reference quantization of the k and v the
    activation-dtype cache holds (rotated k, rows scaled over 10^±4 and one zero
    row); q is rotated alike; every other byte of the cache is left as it was."""
    plain, fp8 = ops[act]
    rng = np.random.default_rng(block_size * 100 + D + Hkv)
    H = 2 * Hkv
    seqs = [(0, 21), (40, 1), (7, 9)]
    tables, num_blocks = set_batch(plain, rng, seqs, block_size)
    set_batch(fp8, np.random.default_rng(block_size * 100 + D + Hkv), seqs, block_size)
    T = sum(n for _, n in seqs)
    qkv = (rng.standard_normal((T, (H + 2 * Hkv) * D)) *
           10.0 ** rng.uniform(-4, 4, (T, H + 2 * Hkv)).repeat(D, 1)).astype(np.float32)
    qkv[3, (H + Hkv) * D:(H + Hkv + 1) * D] = 0.0  # a zero v row
    half = D // 2
    ang = np.arange(100)[:, None] * (10000.0 ** (-np.arange(half) / half))[None]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    kc = np.zeros((num_blocks, block_size, Hkv, D), np.float32)
    q_ref, k_ref, v_ref = plain.rope_and_cache(qkv, cos, sin, H, Hkv, D, kc, kc.copy())
    row = Hkv * D + exp_bytes(block_size, Hkv) // block_size
    start = rng.integers(0, 256, (num_blocks, block_size, row), dtype=np.uint8)
    q8, k8, v8 = fp8.rope_and_cache(qkv, cos, sin, H, Hkv, D, start, start.copy())
    assert np.array_equal(q8, q_ref)
    written = np.zeros((num_blocks, block_size), bool)
    for (c, n), t in zip(seqs, tables):
        pos = np.arange(c, c + n)
        written[t[pos // block_size], pos % block_size] = True
    for got, ref in ((k8, k_ref), (v8, v_ref)):
        codes, exps = unpack(got, Hkv, D)
        ref_codes, ref_exps = quantize(ref)
        assert np.array_equal(codes[written], ref_codes[written])
        assert np.array_equal(exps[written], ref_exps[written])
        s_codes, s_exps = unpack(start, Hkv, D)
        assert np.array_equal(codes[~written], s_codes[~written])
        assert np.array_equal(exps[~written], s_exps[~written])
        assert np.array_equal(got.reshape(num_blocks, -1)[:, block_size * row - (exp_bytes(block_size, Hkv) - block_size * Hkv):],
                              start.reshape(num_blocks, -1)[:, block_size * row - (exp_bytes(block_size, Hkv) - block_size * Hkv):])


def random_fp8_cache(rng, num_blocks, block_size, Hkv, D):
    codes = rng.integers(0, 256, (num_blocks, block_size, Hkv, D), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    exps = rng.integers(-9, 3, (num_blocks, block_size, Hkv)).astype(np.int8)
    return pack(codes, exps), dequantize(codes, exps)


@pytest.mark.parametrize("act", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("G,D", [(1, 64), (3, 64), (4, 128), (2, 40), (12, 32)])
def test_paged_attention_on_fp8_is_attention_on_the_dequantized_cache(ops, act, block_size, G, D):
    """Bit for bit the activation-dtype kernel's output on the dequantized cache
    (every code but NaN, exponents -9 .. 2: exact in fp32 and bf16), over prefill
    tiles on cached context and decode rows; in fp32 also within 1e-5 of a
    float64 softmax(q k^T / sqrt(D)) v on the gathered blocks."""
    plain, fp8 = ops[act]
    rng = np.random.default_rng(G * 100 + D + block_size)
    Hkv = 2 if G < 12 else 1
    H = G * Hkv
    seqs = [(0, 19), (37, 1), (5, 30), (60, 9), (200, 1), (3, 70)]
    tables, num_blocks = set_batch(plain, rng, seqs, block_size)
    set_batch(fp8, np.random.default_rng(G * 100 + D + block_size), seqs, block_size)
    T = sum(n for _, n in seqs)
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * D)).astype(np.float32)
    k8, kd = random_fp8_cache(rng, num_blocks, block_size, Hkv, D)
    v8, vd = random_fp8_cache(rng, num_blocks, block_size, Hkv, D)
    scale = D ** -0.5
    out = fp8.paged_attention(qkv, k8, v8, H, Hkv, D, scale)
    assert np.array_equal(out, plain.paged_attention(qkv, kd, vd, H, Hkv, D, scale))
    if act != "float32":
        return
    t = 0
    for (cached, new), table in zip(seqs, tables):
        ctx = cached + new
        k = kd[table].reshape(-1, Hkv, D)[:ctx].astype(np.float64)
        v = vd[table].reshape(-1, Hkv, D)[:ctx].astype(np.float64)
        q = qkv[t:t + new, :H * D].reshape(new, H, D).astype(np.float64)
        s = np.einsum("thd,shd->hts", q, np.repeat(k, G, axis=1)) * scale
        s[:, np.arange(new)[:, None] + cached < np.arange(ctx)[None, :]] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), np.repeat(v, G, axis=1))
        assert np.max(np.abs(out[t:t + new] - ref.reshape(new, H * D))) <= 1e-5 * max(1.0, np.abs(ref).max())
        t += new


@pytest.mark.parametrize("act", ["float32", "bfloat16"])
def test_nan_codes_read_as_nan(ops, act):
    """A NaN code (0x7F / 0xFF: what the quantizer makes of a NaN) reads as NaN
    wherever it sits in a row (the vector routes' lanes as the scalar tail's),
    as on the GPU: a key's NaN makes its sequence's rows NaN at that kv
    head's query heads, a value's NaN those heads' one dimension; every other
    output is bitwise the run without them."""
    _, fp8 = ops[act]
    rng = np.random.default_rng(17)
    G, Hkv, D, bs = 2, 2, 64, 16
    H = G * Hkv
    seqs = [(0, 19), (37, 1), (5, 30)]
    tables, num_blocks = set_batch(fp8, rng, seqs, bs)
    T = sum(n for _, n in seqs)
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * D)).astype(np.float32)
    kc = rng.integers(0, 256, (num_blocks, bs, Hkv, D), dtype=np.uint8)
    vc = rng.integers(0, 256, (num_blocks, bs, Hkv, D), dtype=np.uint8)
    for c in (kc, vc):
        c[(c & 0x7F) == 0x7F] = 0x3C
    ke = rng.integers(-9, 3, (num_blocks, bs, Hkv)).astype(np.int8)
    ve = rng.integers(-9, 3, (num_blocks, bs, Hkv)).astype(np.int8)
    clean = fp8.paged_attention(qkv, pack(kc, ke), pack(vc, ve), H, Hkv, D, D ** -0.5)
    assert np.isfinite(clean).all()
    kn, vn = kc.copy(), vc.copy()
    kn[tables[1][10 // bs], 10 % bs, 1, 5] = 0x7F  # sequence 1, cached token 10, kv head 1, dim 5
    vn[tables[2][3 // bs], 3 % bs, 0, 60] = 0xFF  # sequence 2, cached token 3, kv head 0, dim 60
    got = fp8.paged_attention(qkv, pack(kn, ke), pack(vn, ve), H, Hkv, D, D ** -0.5).reshape(T, H, D)
    want = clean.reshape(T, H, D)
    nan = np.zeros((T, H, D), bool)
    nan[19:20, G:2 * G, :] = True  # sequence 1's row, kv head 1's query heads
    nan[20:50, :G, 60] = True  # sequence 2's rows (all after token 3), kv head 0's heads, dim 60
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan], want[~nan])


def test_copy_blocks_copies_codes_and_exponents(ops):
    _, fp8 = ops["float32"]
    rng = np.random.default_rng(3)
    cache, _ = random_fp8_cache(rng, 6, 16, 3, 64)
    got = fp8.copy_blocks(cache, [(1, 4), (5, 0)])
    want = cache.copy()
    want[4], want[0] = cache[1], cache[5]
    assert np.array_equal(got, want)


# ---- the runtime ---------------------------------------------------------------

def reference_logits_fp8_kv(model, ids):
    """transformers' weights in fp32, K (after RoPE) and V of each token and kv head
    rounded to fp8 with its own exponent, as pagedrt's cache stores them."""
    cfg, m = model.config, model.model
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    T = len(ids)

    def norm(x, layer):
        return layer.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.variance_epsilon))

    def rope(x, cos, sin):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]

    fq = lambda t: torch.from_numpy(fake_quant(t.numpy()))  # noqa: E731
    with torch.no_grad():
        x = m.embed_tokens.weight[ids].clone()
        cos, sin = m.rotary_emb(x[None], torch.arange(T)[None])
        cos, sin = cos[0], sin[0]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for L in m.layers:
            a = L.self_attn
            h = norm(x, L.input_layernorm)
            q = rope((h @ a.q_proj.weight.T).view(T, H, D), cos, sin)
            k = fq(rope((h @ a.k_proj.weight.T).view(T, Hkv, D), cos, sin))
            v = fq((h @ a.v_proj.weight.T).view(T, Hkv, D))
            k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
            s = torch.einsum("thd,shd->hts", q, k) / D ** 0.5
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
            o = torch.einsum("hts,shd->thd", p, v).reshape(T, H * D)
            x = x + o @ a.o_proj.weight.T
            h = norm(x, L.post_attention_layernorm)
            x = x + (torch.nn.functional.silu(h @ L.mlp.gate_proj.weight.T) * (h @ L.mlp.up_proj.weight.T)) @ L.mlp.down_proj.weight.T
        return (norm(x, m.norm) @ model.lm_head.weight.T).numpy()


@pytest.mark.parametrize("case", [dict(num_attention_heads=4, num_key_value_heads=2),
                                  dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=2)])
def test_fp8_kv_logits_match_an_fp8_rounding_reference(tiny_llama, case):
    """fp32 activations, fp8 KV: logits within 1e-4 of the reference that rounds K
    and V as the cache does, at least 20 times closer to it than to plain fp32
    transformers (the rounding is real); chunked prefill over 13-token chunks and
    5 decode steps. The pool holds 3.9x the fp32 cache's blocks in the same bytes."""
    path, model = tiny_llama(**case)
    prompt = list(range(7, 47))
    with pagedrt.Runtime(path, device="cpu", activation_dtype="float32", kv_cache_dtype="fp8", block_size=8,
                         max_num_batched_tokens=13, kv_cache_bytes=8 << 20, num_threads=2) as rt:
        assert rt.model_info.kv_cache_dtype == "float8_e4m3fn"
        ((tokens, logits),) = run_all(rt, [prompt], max_tokens=6, ignore_eos=True, return_logits=True)
        blocks8 = rt.stats().num_blocks
    with pagedrt.Runtime(path, device="cpu", activation_dtype="float32", block_size=8,
                         kv_cache_bytes=8 << 20) as rt:
        assert rt.model_info.kv_cache_dtype == "float32"
        blocks32 = rt.stats().num_blocks
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert blocks8 == (8 << 20) // (2 * cfg.num_hidden_layers * 8 * (cfg.num_key_value_heads * D +
                                                                    exp_bytes(8, cfg.num_key_value_heads) // 8))
    assert blocks8 >= 3.8 * blocks32
    ids = prompt + tokens[:-1]
    err = rel_err(logits, reference_logits_fp8_kv(model, ids))
    err32 = rel_err(logits, reference_logits(model, ids))
    assert err <= REL_TOL, err
    assert err32 >= 20 * err, (err, err32)


def test_fp8_kv_results_do_not_depend_on_the_batch(tiny_llama):
    """bf16 activations, fp8 KV, deterministic CPU: each request's logits, alone in
    a roomy pool, equal (bitwise) those it gets among others with shared prefixes
    (prefix-cache hits, n = 2 forks and their copy-on-write), chunked prefill, and
    a pool small enough to preempt by swap and by recompute."""
    path, _ = tiny_llama(num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16")
    rng = np.random.default_rng(5)
    shared = rng.integers(3, 320, 24).tolist()
    prompts = [shared + rng.integers(3, 320, n).tolist() for n in (5, 17, 30, 9, 40, 3)]
    base = dict(device="cpu", activation_dtype="bfloat16", kv_cache_dtype="fp8", block_size=8, num_threads=2,
                deterministic=True)
    alone = []
    with pagedrt.Runtime(path, **base, enable_prefix_caching=False) as rt:
        for p in prompts:
            alone += run_all(rt, [p], max_tokens=12, ignore_eos=True, return_logits=True)
        small = 14 * (rt.stats().kv_cache_bytes // rt.stats().num_blocks)  # 14 blocks; a request needs <= 10
    for mode in ("swap", "recompute"):
        with pagedrt.Runtime(path, **base, kv_cache_bytes=small, preemption_mode=mode,
                             max_num_batched_tokens=16) as rt:
            together = run_all(rt, prompts, max_tokens=12, ignore_eos=True, return_logits=True)
            st = rt.stats()
        assert st.num_preemptions > 0 and st.prefix_hits > 0, (mode, st.num_preemptions, st.prefix_hits)
        for (t1, l1), (t2, l2) in zip(alone, together):
            assert t1 == t2 and np.array_equal(l1[-12:], l2[-12:]), mode  # the rows that chose the tokens
    with pagedrt.Runtime(path, **base) as rt:  # n = 2: the forks share the prompt's blocks, then copy
        ids = [rt.submit(p, pagedrt.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, n=2,
                                                   return_logits=True)) for p in prompts[:3]]
        got = {(i, k): ([], []) for i in ids for k in (0, 1)}
        finished = set()
        while len(finished) < len(ids):
            for ev in rt.poll(timeout=1.0):
                assert ev.error is None, ev.error
                got[ev.request_id, ev.index][0].extend(ev.token_ids)
                if ev.logits is not None:
                    got[ev.request_id, ev.index][1].append(ev.logits)
                if ev.request_finished:
                    finished.add(ev.request_id)
        assert rt.stats().num_copies > 0
    for i, (t1, l1) in zip(ids, alone[:3]):
        for k in (0, 1):
            tokens, rows = got[i, k]
            assert tokens == t1 and np.array_equal(np.concatenate(rows)[-11:], l1[-11:]), (i, k)  # fork 1: from its 2nd token


def test_fp8_kv_options_are_checked(tiny_llama):
    path, _ = tiny_llama()
    with pytest.raises(pagedrt.Unsupported, match="fp8_e5m2"):
        pagedrt.Runtime(path, device="cpu", kv_cache_dtype="fp8_e5m2")
    with pytest.raises(pagedrt.InvalidArgument, match="kv_cache_dtype 'int8' is not known"):
        pagedrt.Runtime(path, device="cpu", kv_cache_dtype="int8")
    with pytest.raises(pagedrt.InvalidArgument, match="power of two or a multiple of 16, got 12"):
        pagedrt.Runtime(path, device="cpu", kv_cache_dtype="fp8", block_size=12)


def test_fp8_kv_forks_and_beams_under_swap_match_a_roomy_pool(tmp_path_factory):
    """n = 3 seeded samples and beam width 3 on fp8 blocks: shared prompt blocks,
    copy-on-write and beams' block tables, swapped out and back in a small pool,
    give the outputs of a roomy fp8 pool (as tests/test_scheduler.py holds
    for the activation-dtype cache)."""
    from conftest import make_tiny_llama
    from test_scheduler import BLOCK, FORK_REQS, run_forks
    path, _ = make_tiny_llama(tmp_path_factory.mktemp("fp8forks") / "m", num_key_value_heads=2,
                              num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    base = dict(device="cpu", block_size=BLOCK, enable_prefix_caching=False, kv_cache_dtype="fp8")
    with pagedrt.Runtime(path, **base) as rt:
        roomy, errors = run_forks(rt)
        block = rt.stats().kv_cache_bytes // rt.stats().num_blocks
    assert errors == [""] * len(FORK_REQS)
    with pagedrt.Runtime(path, **base, kv_cache_bytes=24 * block, preemption_mode="swap") as rt:
        got, errors = run_forks(rt)
        s = rt.stats()
    assert errors == [""] * len(FORK_REQS) and got == roomy
    assert s.num_swapped_out > 0 and s.swap_out_blocks == s.swap_in_blocks and s.blocks_used == 0
