"""CUDA's batch-invariant mode op by op (issue 22, docs/determinism.md):
_Ops("cuda", deterministic=True) must give a row the same bits whatever else
is in the call. The end-to-end checks (logits rows of whole requests, on
SmolLM2 and the 8B shape) are tests/test_determinism.py's CUDA cases.

- linear: the rows of x @ W^T computed with n = 1 .. 257 rows around them
  equal, bit for bit, the same rows of one 600-row call (bf16: InvariantGemm,
  the GEMV's order of sums at every n, through the GEMV, the tiled kernel's
  three small-n tiles and its large one, and with PAGEDRT_DET_GEMM=cublaslt
  one pinned cuBLASLt algorithm; fp32: the latter), and the 600-row call is
  x @ W^T (float64 reference); with
  deterministic=False the own small-n kernel and cuBLASLt's per-n picks give
  other bits somewhere (the comparison can fail).
- gate/up with SiLU·mul: the fused GEMV (n <= 8) gives the bits of the
  GEMM-then-SiLU·mul path of 600 rows.
- attention: a token's output computed as the last of a prefill chunk and as
  a decode step's only token, among other sequences of other lengths, is the
  same bits (every token through the prefill kernel's tiles); with
  deterministic=False the decode kernels sum in another order.

Skipped without a GPU (CI has none); tools/gpu_check.sh det runs it."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import bf, paged_batch, set_batch
from pagedrt import _core, _testing

pytestmark = pytest.mark.skipif(not _core.cuda_available(), reason="no CUDA GPU visible")


def ops_of(deterministic: bool, activation: str = "bfloat16"):
    return _testing._Ops("cuda", activation, deterministic)


# ---- linear ----------------------------------------------------------------------------

# (m, k): SmolLM2's gate_up and down, a shape past the own kernel's k split,
# an lm head's, and two with k past the last whole chunk (steps of 32 k split
# by the last 8-k vector: 1,000 = 15 chunks of 64 + 40; 2,056 = 16 of 128 + 8)
# and m not a multiple of any tile.
@pytest.mark.parametrize("m,k", [(3072, 576), (576, 1536), (4096, 4096), (8192, 576), (200, 1000), (1000, 2056)])
@pytest.mark.parametrize("activation,out_f32,route", [("bfloat16", False, "own"), ("bfloat16", True, "own"),
                                                       ("bfloat16", False, "cublaslt"), ("float32", True, "own")])
def test_linear_rows_do_not_depend_on_n(m, k, activation, out_f32, route, monkeypatch):
    # route: PAGEDRT_DET_GEMM, read when the backend is made (bf16: InvariantGemm
    # or pinned cuBLASLt algorithms; fp32 always the latter).
    monkeypatch.setenv("PAGEDRT_DET_GEMM", route)
    rng = np.random.default_rng(m + k)
    total = 600
    x = bf(rng.standard_normal((total, k)))
    w = bf(rng.standard_normal((m, k)) * k ** -0.5)
    wdtype = activation
    det = ops_of(True, activation)
    full = det.linear(x, w, wdtype, out_f32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    tol = (1e-5 if activation == "float32" else 1e-4 if out_f32 else 8e-3) * np.abs(ref).max()
    assert np.abs(full - ref).max() <= tol, f"the {total}-row call is not x @ W^T: {np.abs(full - ref).max()} > {tol}"
    for n in (1, 2, 7, 8, 9, 16, 33, 64, 65, 257):
        for start in (0, 5, total - n):
            part = det.linear(x[start:start + n], w, wdtype, out_f32)
            differ = np.count_nonzero(part != full[start:start + n])
            assert differ == 0, f"n={n} at row {start}: {differ} of {part.size} values differ from the n={total} call"
    if activation == "bfloat16" and route == "own":  # the default mode picks per n: some row differs (the comparison can fail)
        fast = ops_of(False, activation)
        whole = fast.linear(x, w, wdtype, out_f32)
        differ = sum(np.count_nonzero(fast.linear(x[:n], w, wdtype, out_f32) != whole[:n]) for n in (1, 8, 9, 64))
        assert differ > 0, "deterministic=False was expected to give other bits at some n"


@pytest.mark.parametrize("inter,k", [(1536, 576), (500, 1000)])
def test_fused_silu_mul_rows_equal_the_unfused_path(inter, k):
    # n <= 8 runs gate/up and SiLU·mul as one GEMV kernel, more rows run the
    # tiled GEMM into (n, 2 inter) and then SiLU·mul: the same bits a row.
    rng = np.random.default_rng(inter)
    x = bf(rng.standard_normal((600, k)))
    w = bf(rng.standard_normal((2 * inter, k)) * k ** -0.5)
    det = ops_of(True)
    full = det.linear_silu_mul(x, w, "bfloat16")
    gu = x.astype(np.float64) @ w.astype(np.float64).T
    ref = gu[:, :inter] / (1 + np.exp(-gu[:, :inter])) * gu[:, inter:]
    assert np.abs(full - ref).max() <= 2e-2 * np.abs(ref).max()
    for n in (1, 3, 8, 9):
        for start in (0, 100):
            part = det.linear_silu_mul(x[start:start + n], w, "bfloat16")
            differ = np.count_nonzero(part != full[start:start + n])
            assert differ == 0, f"n={n} at row {start}: {differ} of {part.size} values differ from the 600-row call"


# ---- attention -------------------------------------------------------------------------

BLOCK = 16


def build_batch(specs, num_blocks):
    """specs: (table, cached, new) per sequence: its block ids, tokens already in
    the cache, tokens of this step."""
    assert all(-(-(c + n) // BLOCK) <= len(t) and max(t) < num_blocks for t, c, n in specs)
    return paged_batch(specs, BLOCK)


def token_in_two_steps(o, rng, H, Hkv, D, context, chunk, back=0):
    """The output rows of one token (position context - 1 - back of a
    sequence): in a prefill chunk of the `chunk` tokens up to position
    context - 1, beside a long prompt (the last of the chunk, or `back`
    tokens before its end), and as the only token of a decode step beside 5
    other decoding sequences of other lengths. The same K/V cache (random,
    every position present) and the same q row in both."""
    blocks_target = -(-context // BLOCK)
    others = [3000, 17, 40, 1, 900, 256]  # neighbour lengths
    need = blocks_target + sum(-(-(c + 1) // BLOCK) for c in others) + 2
    num_blocks = need
    perm = rng.permutation(num_blocks).tolist()
    target_table, perm = perm[:blocks_target], perm[blocks_target:]
    tables = []
    for c in others:
        k = -(-(c + 1) // BLOCK)
        tables.append(perm[:k])
        perm = perm[k:]
    kc = bf(rng.standard_normal((num_blocks, BLOCK, Hkv, D)))
    vc = bf(rng.standard_normal((num_blocks, BLOCK, Hkv, D)))
    row = (H + 2 * Hkv) * D
    q_target = bf(rng.standard_normal(row))
    scale = D ** -0.5

    # step 1: a 200-token prompt of a neighbour, then the target's chunk
    s1 = [(tables[0], 0, 200), (target_table, context - chunk, chunk)]
    b1 = build_batch(s1, num_blocks)
    qkv1 = bf(rng.standard_normal((len(b1["tokens"]), row)))
    qkv1[-1 - back] = q_target
    set_batch(o, b1)
    out1 = o.paged_attention(qkv1, kc, vc, H, Hkv, D, scale)[-1 - back]

    # step 2: decode, the target third of six
    s2 = [(tables[i], others[i], 1) for i in (0, 1)] + [(target_table, context - 1 - back, 1)] + \
         [(tables[i], others[i], 1) for i in (2, 3, 4)]
    b2 = build_batch(s2, num_blocks)
    qkv2 = bf(rng.standard_normal((len(b2["tokens"]), row)))
    qkv2[2] = q_target
    set_batch(o, b2)
    out2 = o.paged_attention(qkv2, kc, vc, H, Hkv, D, scale)[2]
    return out1, out2


# SmolLM2's heads (9 of 64, 3 kv), the 8B shape's (32 of 128, 8 kv), MHA.
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (32, 8, 128), (16, 16, 128)])
@pytest.mark.parametrize("context,chunk", [(37, 37), (700, 12), (4100, 64)])
def test_attention_token_same_in_prefill_and_decode(H, Hkv, D, context, chunk):
    rng = np.random.default_rng(H * 1000 + context)
    a, b = token_in_two_steps(ops_of(True), rng, H, Hkv, D, context, chunk)
    assert np.isfinite(a).all()
    differ = np.count_nonzero(a != b)
    assert differ == 0, f"{differ} of {a.size} outputs differ between the prefill chunk and the decode step"


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("back", [74, 30, 3])
def test_attention_mid_chunk_token_same_in_prefill_and_decode(H, Hkv, D, back):
    """A token inside a chunk (positions 100 .. 199; the target at 125, 169 or
    196): the later tokens of its warp (or warpgroup) need a key tile past
    its position, which must leave its softmax state with the same bits
    (masked keys add exactly zero, the rescale factor is exactly one)."""
    rng = np.random.default_rng(H * 100 + back)
    a, b = token_in_two_steps(ops_of(True), rng, H, Hkv, D, 200, 100, back=back)
    differ = np.count_nonzero(a != b)
    assert differ == 0, f"{differ} of {a.size} outputs differ between the prefill chunk and the decode step"


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (32, 8, 128)])
def test_attention_fp32_token_same_in_prefill_and_decode(H, Hkv, D):
    """The fp32 mode: every token a decode item of one split, in both steps."""
    rng = np.random.default_rng(7 + H)
    a, b = token_in_two_steps(ops_of(True, "float32"), rng, H, Hkv, D, 2050, 30)
    assert np.count_nonzero(a != b) == 0


def test_attention_default_mode_differs():
    """deterministic=False: the decode kernels (split-KV, their own key tiles)
    give the decode step's token other bits than the prefill chunk's, in at
    least one of these cases (the comparison above can fail)."""
    differ = 0
    for context in (37, 700, 4100):
        rng = np.random.default_rng(32 * 1000 + context)
        a, b = token_in_two_steps(ops_of(False), rng, 32, 8, 128, context, 12 if context > 37 else 37)
        differ += np.count_nonzero(a != b)
    assert differ > 0
