// backend/cuda/elementwise.cuh — the per-element math that more than one
// kernel computes: dtype round trips, SiLU and the rotate-half RoPE pair.
//
// A fused kernel (RoPE inside decode attention, SiLU·mul in the gate/up GEMV's
// epilogue) must give bitwise what the separate kernels give, so both call
// these. The RoPE pair is written with explicit roundings: left to itself the
// compiler may contract x1 * c - x2 * s into an FMA in one kernel and not in
// another.
#pragma once

#include <cuda_bf16.h>

namespace pagedrt::cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
// v as it reads back after a store to T (bf16 rounds, fp32 does not)
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// Rotate-half RoPE of one pair: x1 = dim i, x2 = dim i + D/2 of a head, c and
// s the cos and sin of the position's angle i. Returns the new dim i (lo) and
// dim i + D/2 (hi).
__device__ __forceinline__ float rope_lo(float x1, float x2, float c, float s) {
  return __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
}
__device__ __forceinline__ float rope_hi(float x1, float x2, float c, float s) {
  return __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

}  // namespace pagedrt::cuda
