// backend/cuda/invariant_gemm.hpp — y = x @ W^T whose rows do not depend on
// n: the batch-invariant mode's bf16 GEMM (Runtime(deterministic=True), issue
// 22; docs/determinism.md).
//
//   x: (n, k) bf16, row-major        W: (m, k) bf16, row-major
//   y: (n, m) bf16 or fp32, row-major
//
// Every element of y is summed in one order fixed by the weight's shape
// (Gemv::order): k in splits of chunks of 32-k steps, each split one chain of
// mma.sync m16n8k16 (W the A operand, x the B operand, k permuted inside a
// step as gemv.cu loads it), the splits added in order. n <= 8 rows go to the
// own GEMV with one chain a split (Gemv::run(..., invariant)), where that
// order is fast: one pass over W with ks warps streaming each tile. More
// rows go to a tiled kernel (invariant_gemm.cu) that walks the same steps in
// the same order — split 0's, then split 1's, ... — through a cp.async
// pipeline and keeps the splits' sum beside the running chain. Which block
// or tile computes an element never changes its bits, so a row of y is the
// same for every n (tests/test_cuda_determinism.py).
//
// Where it is slower than cuBLASLt: above 8 rows, 2-5x (the tiled kernel
// runs on mma.sync, not Hopper's wgmma, which sums exactly as mma.sync does:
// tools/mma_order_probe.cu; a wgmma kernel in this order is the next step).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/gemv.hpp"

namespace pagedrt::cuda {

class InvariantGemm {
 public:
  // k at most kMaxK: the kernel keeps its step order in shared memory (2 bytes a step).
  static constexpr int64_t kMaxK = 131072;

  // Allows the tiled kernels their shared memory on the current GPU.
  explicit InvariantGemm(const Gemv& gemv);

  // Whether a weight's shape can run here at every n: k a positive multiple of
  // 8 up to kMaxK (x, w and y must then be 16-byte aligned).
  static bool supports_shape(int64_t m, int64_t k) {
    return m >= 1 && m < (int64_t(1) << 30) && k >= 8 && k % 8 == 0 && k <= kMaxK;
  }

  // y (n, m) = x (n, k) @ w (m, k)^T, fp32 when out_f32, else bf16.
  // Precondition: supports_shape(m, k); x and w 16-byte aligned (throws otherwise).
  void run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
           cudaStream_t stream) const;
  // silu(x @ gate^T) * (x @ up^T) for w = [gate; up] (2m, k) in one kernel
  // where n <= 8 (bitwise run() into (n, 2m) and silu_mul); false (nothing
  // done) for more rows: then run() and a SiLU·mul kernel.
  bool run_silu_mul(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k,
                    cudaStream_t stream) const;

 private:
  const Gemv& gemv_;
};

}  // namespace pagedrt::cuda
