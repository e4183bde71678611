// backend/cuda/fp8_rows.cuh — a bf16 row to e4m3 codes with one scale
// (fp8_rows.hpp's quantize_act_rows), as the device code a block runs over
// it: act_rows_kernel (fp8_rows.cu) and the fp8 GEMV's prologue (gemv.cu,
// kQuantX) share it, and the norms and silu_mul that write the next linear's
// codes (kernels.cu) share codes4, so all of them write the same codes.
//
//   xr: the row's k / 8 vectors of 8 bf16; a thread takes vectors i, i +
//   stride, ... (i = threadIdx.x); qr: the row's codes, 8 a vector.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace pagedrt::cuda {

// Four values' codes of v / s (cvt.rn.satfinite.e4m3x2: NaN stays NaN),
// value i in byte i: the codes every activation quantizer writes (here, the
// norms' and silu_mul's in kernels.cu).
__device__ __forceinline__ uint32_t codes4(float a, float b, float c, float d, float s) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a / s, b / s), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c / s, d / s), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}

// This thread's largest magnitude over its vectors of the row.
__device__ __forceinline__ float row_amax_part(const uint4* __restrict__ xr, int vecs, int stride) {
  float amax = 0.0f;
  for (int i = threadIdx.x; i < vecs; i += stride) {
    const uint4 v = xr[i];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
    }
  }
  return amax;
}

// This thread's vectors of the row as codes of x / s (codes4).
__device__ __forceinline__ void row_codes_part(const uint4* __restrict__ xr, uint2* __restrict__ qr, int vecs,
                                               int stride, float s) {
  for (int i = threadIdx.x; i < vecs; i += stride) {
    const uint4 v = xr[i];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    const float2 c = __bfloat1622float2(h[2]), d = __bfloat1622float2(h[3]);
    qr[i] = make_uint2(codes4(a.x, a.y, b.x, b.y, s), codes4(c.x, c.y, d.x, d.y, s));
  }
}

}  // namespace pagedrt::cuda
