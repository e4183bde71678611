// backend/cuda/fp8_rows.cu — fp8_rows.hpp: one block of 256 threads a row,
// two passes over it (the max, then the codes; the second reads L1/L2).
#include "backend/cuda/fp8_rows.hpp"

#include <cuda_fp8.h>

#include "backend/cuda/block_reduce.cuh"
#include "backend/cuda/fp8_rows.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/fp8.hpp"

namespace pagedrt::cuda {
namespace {

constexpr int kThreads = 256;

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
  const float s = e4m3_row_scale(block_max(row_amax_part(xr, vecs, kThreads)));
  if (threadIdx.x == 0) scale[row] = s;
  row_codes_part(xr, reinterpret_cast<uint2*>(q + row * k), vecs, kThreads, s);
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
