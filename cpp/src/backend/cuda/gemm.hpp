// backend/cuda/gemm.hpp — y = x @ W^T on the GPU, bf16 operands, fp32 accumulation.
//
//   x: (n, k) bf16, row-major        W: (m, k) bf16, row-major (a checkpoint's layout)
//   y: (n, m) bf16 or fp32, row-major
//
// The seam for own kernels: Gemm::run() picks the implementation per shape.
// n <= 8 rows with k a multiple of 8 go to the own small-M kernel (gemv.hpp,
// decode); everything else, and the fp32 validation mode, to cuBLASLt
// (algorithms chosen once per shape by its heuristic and cached).
// PAGEDRT_CUDA_GEMV=0 in the environment when a Gemm is made (once per
// backend) sends every shape to cuBLASLt, for A/B comparisons.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "backend/cuda/gemv.hpp"

namespace pagedrt::cuda {

class Gemm {
 public:
  explicit Gemm(cudaStream_t stream);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // out_f32 selects fp32 output (logits); otherwise bf16. in_f32: x and W are
  // fp32 (the validation mode; cuBLASLt, pure fp32 compute, no TF32) and so is y.
  void run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
           bool in_f32 = false);
  // y (n, m) bf16 = silu(x @ gate^T) * (x @ up^T), w = [gate; up] (2m, k) bf16,
  // in one kernel where the own small-M kernel takes the shape; returns false
  // (and does nothing) where it does not: then run() and a SiLU·mul kernel.
  bool run_silu_mul(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k);

 private:
  void run_cublaslt(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
                    bool in_f32);

  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  cudaStream_t stream_;
  bool own_gemv_ = true;  // false: PAGEDRT_CUDA_GEMV=0
  Gemv gemv_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 32u << 20;
  std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool>, Plan> plans_;
};

}  // namespace pagedrt::cuda
