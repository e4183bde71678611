// backend/cuda/kv_fp8.cuh — e4m3 KV codes from and to the device's values, shared
// by the fp8 KV kernels (kv_fp8.cu) and fp8 decode attention
// (attention_decode_fp8.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "backend/fp8.hpp"
#include "backend/paged_kv.hpp"

namespace pagedrt::cuda {

// The scale of a row with exponent byte `e` (paged_kv.hpp's Fp8Kv), times 2^8
// for e4m3_pair's fp16 values; a byte outside the quantizer's range (a row
// the kernel never wrote, read only to be masked) is clamped so the scale
// stays finite.
__device__ __forceinline__ float kv_row_scale(int8_t e) {
  const int x = e < kKvExpMin ? kKvExpMin : e > kKvExpMax ? kKvExpMax : e;
  return exp2_int(x + 8);
}

// Two e4m3 codes (the low 16 bits of `w`, from byte `shift / 8`) as bf16x2,
// times `scale` (kv_row_scale): each code's bits moved into an fp16 with the
// same digits ((c & 0x7F) << 7, the sign on top: the e4m3 value times 2^-8,
// subnormals included), widened exactly, scaled exactly.
__device__ __forceinline__ __nv_bfloat162 e4m3_pair(uint32_t w, float scale) {
  const uint32_t h = ((w & 0x80u) << 8) | ((w & 0x7Fu) << 7) | ((w & 0x8000u) << 16) | ((w & 0x7F00u) << 15);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  return __floats2bfloat162_rn(f.x * scale, f.y * scale);
}

// 4 codes (a word) as 4 fp16 (two f16x2 words), unscaled: exact (the
// hardware conversion from sm_89 on; before it, the same digits moved into
// fp16, e4m3_pair's way, times 2^8: exact, as every value fits fp16).
__device__ __forceinline__ uint2 e4m3_x4_f16(uint32_t w) {
  uint2 r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  auto pair = [](uint32_t v) {
    const uint32_t h = ((v & 0x80u) << 8) | ((v & 0x7Fu) << 7) | ((v & 0x8000u) << 16) | ((v & 0x7F00u) << 15);
    const __half2 x = __hmul2(*reinterpret_cast<const __half2*>(&h), __float2half2_rn(256.0f));
    return *reinterpret_cast<const uint32_t*>(&x);
  };
  r.x = pair(w & 0xFFFFu);
  r.y = pair(w >> 16);
#else
  asm("{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, %2;\ncvt.rn.f16x2.e4m3x2 %0, lo;\ncvt.rn.f16x2.e4m3x2 %1, hi;\n}"
      : "=r"(r.x), "=r"(r.y)
      : "r"(w));
#endif
  return r;
}

// 8 codes (two words) as 8 bf16 in a uint4, times scale.
__device__ __forceinline__ uint4 e4m3_x8(uint2 c, float scale) {
  uint4 r;
  __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&r);
  o[0] = e4m3_pair(c.x, scale);
  o[1] = e4m3_pair(c.x >> 16, scale);
  o[2] = e4m3_pair(c.y, scale);
  o[3] = e4m3_pair(c.y >> 16, scale);
  return r;
}

// A KV row held kPer values a lane by an aligned group of kLanes lanes of
// a warp (every lane of the warp must call it), as the fp8 cache stores it:
// the row's largest magnitude by shuffles within the group, its exponent
// (kv_row_exponent, returned) and this lane's codes of x / 2^e.
template <int kPer, int kLanes>
__device__ __forceinline__ int kv_row_codes(const float (&x)[kPer], uint8_t (&c)[kPer]) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) amax = fmaxf(amax, fabsf(x[i]));
#pragma unroll
  for (int o = kLanes / 2; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const int e = kv_row_exponent(amax);
  const float inv = exp2_int(-e);
#pragma unroll
  for (int i = 0; i < kPer; ++i) c[i] = float_to_e4m3(x[i] * inv);
  return e;
}

// One warp stores a row of D values (lane l holds dims l D/32 .. + D/32 - 1)
// as kv head h of the token at flat slot `slot` of `base` (kv.k or kv.v):
// kv_row_codes, then D / 32 codes a lane and lane 0 the exponent byte.
template <int D>
__device__ void store_kv_row(const float (&x)[D / 32], int lane, const Fp8Kv& kv, uint8_t* base, int64_t slot,
                             int h) {
  constexpr int kPer = D / 32;
  uint8_t c[kPer];
  const int e = kv_row_codes<kPer, 32>(x, c);
  uint8_t* codes = base + kv.slot_code_offset(slot, h) + lane * kPer;
  if constexpr (kPer == 4) {
    *reinterpret_cast<uint32_t*>(codes) = c[0] | (c[1] << 8) | (c[2] << 16) | (uint32_t(c[3]) << 24);
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) codes[i] = c[i];
  }
  if (lane == 0) base[kv.slot_exp_offset(slot, h)] = static_cast<uint8_t>(static_cast<int8_t>(e));
}

}  // namespace pagedrt::cuda
