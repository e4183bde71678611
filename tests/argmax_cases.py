"""Rows for the greedy pick (the CPU backend's argmax, the CUDA kernels') with
numpy's answer, written from the rule: the first index of the largest value,
a token the mask does not allow counting as -inf, NaN never chosen over a
number, a row of NaN only giving 0."""
from __future__ import annotations

import numpy as np


def unmasked_rows():
    """(x (6, 128,256) fp32, want): ties in different parts of a row, NaN
    beside numbers, all NaN, all -inf but one."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((6, 128256)).astype(np.float32)
    x[1, [5000, 90000]] = 50.0            # a tie across parts: the first wins
    x[2, :] = np.nan
    x[2, 77777] = -3.0                    # one number among NaN
    x[3, :] = np.nan                      # all NaN
    x[4, :] = -np.inf
    x[4, 120000] = -1e30                  # everything else -inf
    x[5, 100:200] = np.nan                # NaN beside the real maximum
    x[5, 64000] = 40.0
    return x, [int(np.nanargmax(r)) if not np.isnan(r).all() else 0 for r in x]


def masked_rows():
    """(x (6, 49,157) fp32, masks (4, words) uint32, mask_of_row (6,) int32, want):
    a vocabulary that is not a multiple of 32, a row without a mask, a mask
    with one token allowed (not the row's maximum), rows sharing a mask, a
    mask whose allowed logits are all -inf (the first index, 0)."""
    rng = np.random.default_rng(13)
    cols = 49157
    words = (cols + 31) // 32
    x = rng.standard_normal((6, cols)).astype(np.float32)
    masks = rng.integers(0, 2**32, size=(4, words), dtype=np.uint64).astype(np.uint32)
    masks[1] = 0
    masks[1, 40000 // 32] = 1 << (40000 % 32)  # only token 40000
    masks[2] &= 0x0F0F0F0F
    masks[3] = 0
    masks[3, 7 // 32] = 1 << 7
    x[5, 7] = -np.inf                          # its only allowed token is -inf
    mask_of_row = np.array([0, -1, 1, 2, 2, 3], dtype=np.int32)
    want = []
    for r in range(6):
        row = x[r].copy()
        if mask_of_row[r] >= 0:
            bits = np.unpackbits(masks[mask_of_row[r]].view(np.uint8), bitorder="little")[:cols].astype(bool)
            row[~bits] = -np.inf
        want.append(int(np.argmax(row)))
    assert want[2] == 40000 and want[5] == 0
    return x, masks, mask_of_row, want
