"""A float64 reference of device sampling (SampleRow in backend/backend.hpp):
the candidate set and the draw, written from the rule, not from the kernel."""
from __future__ import annotations

import numpy as np

MASK = 0xFFFFFFFF


def philox_u64(key: int, counter: int) -> int:
    """Philox4x32-10 on counter (lo, hi, 0, 0) under key (lo, hi): words 0 and 1 as one 64-bit int."""
    c0, c1, c2, c3 = counter & MASK, (counter >> 32) & MASK, 0, 0
    k0, k1 = key & MASK, (key >> 32) & MASK
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return (c0 << 32) | c1


def candidates(x: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float):
    """(weights, kept): weights exp((x - max) / T) in float64 (0 for -inf and NaN);
    kept a boolean mask: the top_k most likely (ties to the lower id), then the
    smallest most-likely-first prefix holding top_p of their weight, then those
    of at least min_p times the most likely."""
    x = x.astype(np.float64)
    finite = x > -np.inf
    m = x[finite].max()
    w = np.where(finite, np.exp((np.where(finite, x, m) - m) / temperature), 0.0)
    order = np.lexsort((np.arange(len(x)), -np.where(np.isnan(x), -np.inf, x)))  # value desc, id asc
    kept = np.zeros(len(x), bool)
    n = top_k if 0 < top_k < len(x) else len(x)
    top = order[:n]
    if top_p < 1.0:
        cum = np.cumsum(w[top])
        keep = int(np.searchsorted(cum, top_p * cum[-1], side="left")) + 1
        top = top[:keep]
    kept[top] = True
    if min_p > 0.0:
        kept &= w >= min_p * w.max()
    kept &= w > 0
    return w, kept


def draw(x: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float, key: int, counter: int):
    """(token, margin): the reference token and how far u * total lies from the
    nearest boundary of the cumulative weights in id order, as a fraction of
    the total (a device token may differ only where this is tiny)."""
    w, kept = candidates(x, temperature, top_k, top_p, min_p)
    cw = np.cumsum(np.where(kept, w, 0.0))
    total = cw[-1]
    u = philox_u64(key, counter) / 2.0 ** 64
    target = u * total
    tok = int(np.searchsorted(cw, target, side="right"))
    bounds = cw[kept]
    margin = float(np.min(np.abs(bounds - target)) / total)
    return tok, margin


def sample_key(base: int, index: int) -> int:
    """splitmix64 of (base, index): the Philox key of sample `index` of a request
    whose seed is `base` (engine/sampler.hpp's sample_key)."""
    m = (1 << 64) - 1
    z = (base + 0x9E3779B97F4A7C15 * (index + 1)) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)
