// backend/cuda/fp8_rows.cu — fp8_rows.hpp: one block of 256 threads a row,
// two passes over it (the max, then the codes; the second reads L1/L2).
#include "backend/cuda/fp8_rows.hpp"

#include <cuda_fp8.h>

#include "backend/cuda/launch.cuh"
#include "backend/fp8.hpp"

namespace pagedrt::cuda {
namespace {

constexpr int kThreads = 256;

// The block's max of v (every thread gets it).
__device__ float block_max(float v) {
  __shared__ float part[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  v = part[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) v = fmaxf(v, part[w]);
  return v;
}

// x (n, k) bf16, k % 8 == 0 and 16-byte rows: 8 values a load, codes with
// cvt.rn.satfinite.e4m3x2 (NaN stays NaN).
__global__ void __launch_bounds__(kThreads) act_rows_kernel(const __nv_bfloat16* __restrict__ x,
                                                            uint8_t* __restrict__ q, float* __restrict__ scale,
                                                            int k) {
  pdl_trigger();
  pdl_wait();
  const int64_t row = blockIdx.x;
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * k);
  const int vecs = k / 8;
  float amax = 0.0f;
  for (int i = threadIdx.x; i < vecs; i += kThreads) {
    const uint4 v = xr[i];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
    }
  }
  const float s = e4m3_row_scale(block_max(amax));
  if (threadIdx.x == 0) scale[row] = s;
  uint2* qr = reinterpret_cast<uint2*>(q + row * k);
  for (int i = threadIdx.x; i < vecs; i += kThreads) {
    const uint4 v = xr[i];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
    uint32_t c[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      c[j] = __nv_cvt_float2_to_fp8x2(make_float2(f.x / s, f.y / s), __NV_SATFINITE, __NV_E4M3);
    }
    qr[i] = make_uint2(c[0] | (c[1] << 16), c[2] | (c[3] << 16));
  }
}

// w (m, k) fp32: codes by float_to_e4m3, bit for bit the CPU's.
__global__ void __launch_bounds__(kThreads) weight_rows_kernel(const float* __restrict__ w, uint8_t* __restrict__ q,
                                                               float* __restrict__ scale, int64_t k) {
  const int64_t row = blockIdx.x;
  const float* wr = w + row * k;
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < k; i += kThreads) amax = fmaxf(amax, fabsf(wr[i]));
  const float s = e4m3_row_scale(block_max(amax));
  if (threadIdx.x == 0) scale[row] = s;
  for (int64_t i = threadIdx.x; i < k; i += kThreads) q[row * k + i] = float_to_e4m3(wr[i] / s);
}

}  // namespace

void quantize_act_rows(const __nv_bfloat16* x, uint8_t* q, float* scale, int64_t n, int64_t k, cudaStream_t stream) {
  if (n == 0) return;
  launch(act_rows_kernel, dim3(static_cast<unsigned>(n)), dim3(kThreads), 0, stream, x, q, scale, int(k));
}

void quantize_weight_rows(const float* w, uint8_t* q, float* scale, int64_t m, int64_t k, cudaStream_t stream) {
  if (m == 0) return;
  weight_rows_kernel<<<static_cast<unsigned>(m), kThreads, 0, stream>>>(w, q, scale, k);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace pagedrt::cuda
