// backend/cuda/block_reduce.cuh — a value reduced over a thread block, every
// thread getting the result: the norms' sums (kernels.cu), the rows' largest
// magnitudes of fp8 quantization (kernels.cu, fp8_rows.cu, gemv.cu).
#pragma once

namespace pagedrt::cuda {

// op over the block (blockDim.x a multiple of 32, at most 1024): a butterfly in
// each warp, then over the warps' results; every thread gets it. `none`: op's
// identity, for the warps that do not exist.
template <typename Op>
__device__ float block_reduce(float v, Op op, float none) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int nw = blockDim.x / 32;
  v = lane < nw ? part[lane] : none;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline float block_sum(float v) {
  return block_reduce(v, [](float a, float b) { return a + b; }, 0.0f);
}
// (of magnitudes: 0 is the identity)
__device__ inline float block_max(float v) {
  return block_reduce(v, [](float a, float b) { return fmaxf(a, b); }, 0.0f);
}

}  // namespace pagedrt::cuda
