// backend/cuda/kv_fp8.cuh — e4m3 KV codes to bf16 on the device, shared by the
// fp8 KV kernels (kv_fp8.cu) and fp8 decode attention (attention_decode.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "backend/fp8.hpp"

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

}  // namespace pagedrt::cuda
