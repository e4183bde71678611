// backend/cuda/gemv.hpp — y = x @ W^T for a few rows of x (decode): the own
// small-M kernel behind Gemm::run, bf16 operands, fp32 accumulation.
//
//   x: (n, k) bf16, row-major, 1 <= n <= 8    W: (m, k) bf16, row-major
//   y: (n, m) bf16 or fp32, row-major
//
// At n <= 8 a GEMM is a stream of W through the SMs: every byte of W is read
// once and used n times. The kernel's only job is to keep enough 16-byte loads
// of W in flight to saturate HBM; the arithmetic runs on the tensor cores
// (mma.sync m16n8k16, W as the 16-row A operand, the n <= 8 rows of x as the
// 8 columns of B), so its cost does not grow with n.
//
// fp8 (run_f8): W and x are e4m3 codes with an fp32 scale per row of each
// (W's per output channel, x's per token: fp8_rows.hpp); the same kernel
// moves 16 codes a load and multiplies with mma.sync m16n8k32 e4m3 (sm_89+),
// scaling each output by its row's and token's scales.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedrt::cuda {

class Gemv {
 public:
  static constexpr int64_t kMaxRows = 8;  // n, the rows of x one call takes

  // Reads the SM count and the kernel's occupancy on the current device, and
  // PAGEDRT_GEMV_STEPS (2 or 4 steps a chunk for every shape, for A/B runs:
  // 2 leaves a third block slot an SM for the next kernel of a chain).
  Gemv();

  // Whether run() takes this call: 1 <= n <= kMaxRows, k a positive multiple
  // of 8 (16-byte rows) and x, w 16-byte aligned. Others go to cuBLASLt.
  static bool supports(const void* x, const void* w, int64_t n, int64_t m, int64_t k);
  // The same for run_f8(): k a multiple of 16 (16-byte rows of codes).
  static bool supports_f8(const void* x, const void* w, int64_t n, int64_t m, int64_t k);
  // The same for run_f8_quant_x(): also n <= kMaxQuantXRows and x's codes and
  // scales within kMaxQuantXBytes of shared memory a block.
  static constexpr int64_t kMaxQuantXRows = 2;
  static constexpr int64_t kMaxQuantXBytes = 32 * 1024;
  static bool supports_f8_quant_x(const void* x, const void* w, int64_t n, int64_t m, int64_t k);

  // y (n, m) = x (n, k) @ w (m, k)^T; y fp32 when out_f32, else bf16.
  // invariant: each split of k is one accumulation chain instead of two, the
  // order InvariantGemm's kernel for more rows repeats (invariant_gemm.hpp).
  // Precondition: supports(x, w, n, m, k).
  void run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
           cudaStream_t stream, bool invariant = false) const;
  // y (n, m) bf16 = silu(x @ gate^T) * (x @ up^T) for w = [gate; up] (2m, k):
  // linear() into (n, 2m) and silu_mul() in one kernel, bitwise the same
  // (with the same invariant).
  // Precondition: supports(x, w, n, 2 m, k).
  void run_silu_mul(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k,
                    cudaStream_t stream, bool invariant = false) const;

  // How run() splits the k of an (m, k) weight (gemv.cu): ks splits (a power
  // of two), split p taking the chunks of k_steps steps of 32 k numbered p,
  // p + ks, ..., then the steps past the last whole chunk numbered p, p + ks,
  // ... after them; split 0's sum plus split 1's, and so on in order. It
  // depends on the shape and the GPU, never on n.
  struct Order {
    int k_steps;
    int ks;
  };
  Order order(int64_t m, int64_t k) const;
  // fp8: y (n, m) = (xq (n, k) @ w (m, k)^T) * ws[r] * xs[t], codes e4m3,
  // ws (m) and xs (n) fp32. Precondition: supports_f8(xq, w, n, m, k).
  void run_f8(const void* xq, const float* xs, const void* w, const float* ws, void* y, int64_t n, int64_t m,
              int64_t k, bool out_f32, cudaStream_t stream) const;
  // run_f8 on bf16 x (n, k): each block quantizes x per row into its shared
  // memory first, exactly as quantize_act_rows would (fp8_rows.hpp), so y is
  // bitwise run_f8's after that kernel, without launching it (batch-1
  // decode: o_proj's and down's inputs). Precondition: supports_f8_quant_x(x, w, n, m, k).
  void run_f8_quant_x(const void* x, const void* w, const float* ws, void* y, int64_t n, int64_t m, int64_t k,
                      bool out_f32, cudaStream_t stream) const;
  // silu(gate) * up on fp8 [gate; up] (2m, k) with ws (2m). Precondition: supports_f8(xq, w, n, 2 m, k).
  void run_silu_mul_f8(const void* xq, const float* xs, const void* w, const float* ws, void* y, int64_t n,
                       int64_t m, int64_t k, cudaStream_t stream) const;

 private:
  struct Shape {  // one launch: k steps per chunk (4 or 2), log2 of warps per tile, blocks
    int k_steps;
    int ks_log2;
    int64_t blocks;
  };
  Shape shape(int64_t tiles, int64_t k) const;
  void launch_any(const void* x, const void* w, const float* xs, const float* ws, void* y, int64_t n, int64_t m,
                  int64_t k, bool out_f32, bool gated, bool f8, bool invariant, cudaStream_t stream) const;

  int sms_ = 132;                // streaming multiprocessors of the device
  int blocks_per_sm_long_ = 1;   // resident blocks per SM of the kernel for long rows (k >= 2048)
  int blocks_per_sm_short_ = 1;  // ... and for short ones
  int forced_steps_ = 0;         // PAGEDRT_GEMV_STEPS (2 or 4: every launch's steps a chunk); 0: per shape
};

}  // namespace pagedrt::cuda
