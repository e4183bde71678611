// backend/cuda/fp8_rows.hpp — rows quantized to e4m3 with one fp32 scale a
// row: a row's scale is max |row| / 448 (1 for a zero or non-finite row) and
// its codes round value / scale to nearest even, saturating at 448.
//
//   activations (per token, before every fp8 GEMM):  x (n, k) bf16 -> q (n, k) e4m3, scale (n)
//   weights (per output channel, at load):           w (m, k) fp32 -> q (m, k) e4m3, scale (m)
//
// The weights' codes are backend/fp8.hpp's float_to_e4m3 of fp32 quotients,
// as the CPU's host_fp8_weight makes them: both backends hold the same codes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pagedrt::cuda {

// One block a row; launched with PDL (launch.cuh): x is read after the wait.
void quantize_act_rows(const __nv_bfloat16* x, uint8_t* q, float* scale, int64_t n, int64_t k, cudaStream_t stream);
void quantize_weight_rows(const float* w, uint8_t* q, float* scale, int64_t m, int64_t k, cudaStream_t stream);

}  // namespace pagedrt::cuda
