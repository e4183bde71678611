// backend/cuda/prefill_rows.cuh — what the two prefill attention kernels
// (attention_prefill.cu on mma.sync, attention_prefill_wgmma.cu on wgmma) do
// alike with a thread's two rows of a tile: their warp's range of positions,
// the online softmax of a tile of scores and the final write of O / l.
//
// Both hold scores and O in the C-fragment layout of mma.sync m16n8 (mma.cuh;
// a wgmma accumulator is the same per warp): block n of 8 columns is
// [n][0..1] for this thread's row lo (lane / 4 of its warp's 16) and
// [n][2..3] for row hi = lo + 8, at columns 8n + (lane % 4) * 2 .. + 1.
#pragma once

#include "backend/cuda/kernels.cuh"
#include "backend/cuda/mma.cuh"

namespace pagedrt::cuda {

// The least and greatest of the warp's row positions pos_lo and pos_hi (-1:
// a row past the sequence), in every lane.
__device__ __forceinline__ void warp_position_range(int pos_lo, int pos_hi, int& mn, int& mx) {
  mx = max(pos_lo, pos_hi);
  mn = min(pos_lo, pos_hi);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    mn = min(mn, __shfl_xor_sync(0xffffffffu, mn, o));
  }
}

// The online softmax of one tile of scores s (NB blocks: keys kb + 8n + (lane
// % 4) * 2 + e) in the log2 domain, with few instructions an element (issue
// slots, not the tensor cores, bound this on Hopper): keys past a row's
// position masked where `mask` (the tile crosses one); the max over raw
// scores (scale > 0); then one FFMA and one MUFU.EX2 (flush-to-zero) an
// element. Leaves exp(S - max) in s, the running max m and sum l updated, and
// in c the factor that rescales what O held at the old max.
template <int NB>
__device__ __forceinline__ void online_softmax(float (&s)[NB][4], int kb, bool mask, int lane, int pos_lo,
                                               int pos_hi, float qscale, float& m_lo, float& m_hi, float& l_lo,
                                               float& l_hi, float& c_lo, float& c_hi) {
  if (mask) {
#pragma unroll
    for (int n = 0; n < NB; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = kb + 8 * n + (lane % 4) * 2 + e;
        if (key > pos_lo) s[n][e] = -INFINITY;
        if (key > pos_hi) s[n][2 + e] = -INFINITY;
      }
  }
  float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
  for (int n = 0; n < NB; ++n) {
    mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
    mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
  }
#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, o2));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, o2));
  }
  const float mn_lo = fmaxf(m_lo, mx_lo * qscale), mn_hi = fmaxf(m_hi, mx_hi * qscale);
  // Exactly one where the max stays (also both -inf): a tile with none of a
  // row's keys (past its position, in a tile its warp's other rows need)
  // then leaves the row's m, l and O with the same bits, as the
  // batch-invariant mode needs (cuda_step.cu's plan_attention).
  c_lo = mn_lo == m_lo ? 1.0f : fast_exp2(m_lo - mn_lo);
  c_hi = mn_hi == m_hi ? 1.0f : fast_exp2(m_hi - mn_hi);
  const float b_lo = mn_lo == -INFINITY ? 0.0f : mn_lo, b_hi = mn_hi == -INFINITY ? 0.0f : mn_hi;
  m_lo = mn_lo;
  m_hi = mn_hi;
  float s_lo = 0.0f, s_hi = 0.0f;
#pragma unroll
  for (int n = 0; n < NB; ++n)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[n][e] = fast_exp2(fmaf(s[n][e], qscale, -b_lo));  // -inf (masked) -> 0
      s[n][2 + e] = fast_exp2(fmaf(s[n][2 + e], qscale, -b_hi));
      s_lo += s[n][e];
      s_hi += s[n][2 + e];
    }
  l_lo = l_lo * c_lo + s_lo;
  l_hi = l_hi * c_hi + s_hi;
}

// exp(S - max) of a tile (NB 8-column blocks of the accumulator, as the
// online softmax left it) as bf16 A operands of P V, a k-step of 16 keys
// each: k-step j is blocks 2j and 2j + 1 (wgmma.cuh: an accumulator's
// 16-column pair is a k-step's A fragment).
template <int NB>
__device__ __forceinline__ void pack_p(const float (&s)[NB * 4], uint32_t (&pa)[NB / 2][4]) {
#pragma unroll
  for (int j = 0; j < NB / 2; ++j) {
    pa[j][0] = pack_bf16x2(s[8 * j + 0], s[8 * j + 1]);
    pa[j][1] = pack_bf16x2(s[8 * j + 2], s[8 * j + 3]);
    pa[j][2] = pack_bf16x2(s[8 * j + 4], s[8 * j + 5]);
    pa[j][3] = pack_bf16x2(s[8 * j + 6], s[8 * j + 7]);
  }
}

// O / l of this thread's rows r_lo and r_hi (tile rows counted from the
// sequence's first; rows at or past rows_total are not written) into p.out as
// bf16; l is summed over the 4 lanes that hold a row first.
template <int D>
__device__ __forceinline__ void store_rows(const AttentionParams& p, const float (&o)[D / 8][4], float l_lo, float l_hi,
                                           int r_lo, int r_hi, int rows_total, int q0, int kvh, int lane) {
  const int H = p.num_heads, G = H / p.kv.num_kv_heads;
#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, o2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, o2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int R = h ? r_hi : r_lo;
    const float l = h ? l_hi : l_lo, inv = l > 0.0f ? 1.0f / l : 0.0f;
    if (R >= rows_total) continue;
    bf16* dst = p.out + int64_t(q0 + R / G) * H * D + int64_t(kvh * G + R % G) * D + (lane % 4) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<uint32_t*>(dst + 8 * n) = pack_bf16x2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
  }
}

}  // namespace pagedrt::cuda
