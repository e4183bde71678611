// backend/cuda/glu_gemm.hpp — the MLP's gate/up projection with its SiLU·mul
// in the epilogue, for prompt-sized n, on Hopper (sm_90a):
//
//   x: (n, k) bf16 row-major     W = [gate; up]: (2 I, k) bf16 row-major
//   y: (n, I) bf16 = silu(x @ gate^T) * (x @ up^T)
//
// cuBLASLt has no SiLU·mul epilogue: a prompt's gate/up product went out as
// (n, 2 I) bf16 and a SiLU·mul kernel read it back (6.8 ms of an 8,000-token
// prompt's ~205 on an H100, the 8B shape: 6 bytes an intermediate element
// through HBM). Here the gate and up columns of a feature sit in one
// thread's accumulators, and only y leaves the SM. Both products stay fp32
// until y is rounded (cuBLASLt + silu_mul rounded them to bf16 first: other
// bits, closer to fp32).
//
// Scheme (glu_gemm.cu): persistent (a block an SM), warp-specialized as the
// prefill attention kernel (attention_prefill_ws.cu): warpgroup 0's first
// thread copies each tile's 64-k steps by TMA (x's 128 rows, gate's and up's
// 128 rows of the tile's features: 48 KB a stage) into a ring of stages;
// warpgroups 1 and 2 each multiply 64 rows of x by the 256 rows of W with
// wgmma m64n256k16, so gate column f and up column f land in the same
// thread (columns f and 128 + f), then write silu(g) * u as bf16 while the
// producer already fills the next tile's stages. Tiles walk all row tiles of
// a group of 8 feature tiles before the next group, so the blocks resident at
// once share their W and x tiles in L2.
//
// Clusters of two blocks on two row tiles of the same features share W's
// tiles: each block copies one of W's two boxes, multicast into both, so W
// crosses from L2 once per two tiles.
//
// Environment, read when the backend is made: PAGEDRT_GLU_GEMM=N from N rows
// (default kDefaultMinRows: 0, never; then the cuBLASLt GEMM and silu_mul).
// PAGEDRT_GLU_CLUSTER=1 or 2: blocks a cluster (default kDefaultCluster).
// PAGEDRT_GLU_BLOCKS=N (a diagnostic): at most N blocks a launch, and the
// occupancy query's count on stderr. Not in the batch-invariant mode nor with
// PAGEDRT_CUDA_GEMV=0 (Gemm::run_silu_mul).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedrt::cuda {

class GluGemm {
 public:
  // Off by default. Measured on an H100 (session 48, bench_cuda.py glu, the
  // 8B shape): in clusters of two ~2x slower than cuBLASLt + silu_mul at
  // every M (suspected: not all of a launch's clusters resident at once,
  // PAGEDRT_GLU_BLOCKS tests it); without, 0.95-0.99x its time from 1,024
  // rows and 1.06x at 512, yet in the engine the 8,000-token TTFT 5-11 ms
  // slower with it (not explained yet). And like any epilogue that skips a
  // rounding from a threshold up, it would make a row's bits depend on how
  // many rows share its step (Gemm::kResidualMinRows). PAGEDRT_GLU_GEMM=N
  // turns it on from N rows; its tests pass (session 48).
  static constexpr int64_t kDefaultMinRows = 0;
  static constexpr int kDefaultCluster = 1;

  // enabled: the caller's modes allow it (Gemm: not the batch-invariant mode, not PAGEDRT_CUDA_GEMV=0).
  explicit GluGemm(bool enabled);

  // Whether run() takes this call: sm_90a built and present, n from
  // min_rows(), I and k multiples of 8, 16-byte aligned operands.
  bool takes(const void* x, const void* w, const void* y, int64_t n, int64_t inter, int64_t k) const;
  void run(const void* x, const void* w, void* y, int64_t n, int64_t inter, int64_t k, cudaStream_t stream) const;
  // The fewest rows it takes (0: none).
  int64_t min_rows() const { return available_ ? min_rows_ : 0; }

 private:
  bool available_ = false;
  int64_t min_rows_ = kDefaultMinRows;
  int cluster_ = kDefaultCluster;  // blocks a cluster (PAGEDRT_GLU_CLUSTER)
  int sms_ = 0;
  int blocks_ = 0;  // a launch's most blocks: those resident at once
};

}  // namespace pagedrt::cuda
