"""Every CPU GEMM variant this build can run (scalar, AVX2) against a float64
reference, over odd sizes (not multiples of the vector width, tiny and large),
with fp32 and bf16 weights. Tolerance: relative error <= 1e-5 (fp32 sums)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pagedrt import _core

VARIANTS = _core._gemm_variants()
SIZES = [(1, 1, 1), (1, 7, 5), (3, 33, 9), (5, 100, 15), (4, 16, 64), (17, 65, 130), (2, 300, 577), (33, 70, 8)]


def bf16_bits(x):
    """Round-to-nearest-even float32 -> bf16 bit patterns (uint16), and their float32 values."""
    u = x.astype(np.float32).view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def test_the_scalar_variant_is_always_there():
    assert "scalar" in VARIANTS and _core._gemm_variant() in VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,m,k", SIZES)
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_gemm_matches_reference(variant, n, m, k, weights):
    rng = np.random.default_rng(n * 1000 + m * 10 + k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = rng.standard_normal((m, k)).astype(np.float32)
    if weights == "bfloat16":
        w_arg, w_val = bf16_bits(w)
    else:
        w_arg, w_val = w, w
    ref = x.astype(np.float64) @ w_val.astype(np.float64).T
    for threads in (1, 2):
        y = _core._gemm(x, w_arg, variant, threads)
        assert y.shape == (n, m)
        err = np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)
        assert err <= 1e-5, (variant, weights, threads, err)


def test_variants_agree_closely():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 257)).astype(np.float32)
    w = rng.standard_normal((129, 257)).astype(np.float32)
    outs = [_core._gemm(x, w, v, 2) for v in VARIANTS]
    for a, b in itertools.combinations(outs, 2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_variant_is_an_error():
    x = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="not available"):
        _core._gemm(x, x, "avx9000", 1)
