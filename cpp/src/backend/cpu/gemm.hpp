// backend/cpu/gemm.hpp — y = x @ W^T with fp32 accumulation.
//
//   x: (n, k) fp32, row stride k
//   W: (m, k) fp32 or bf16 (uint16 bit patterns), row stride k
//   y: (n, m) fp32, row stride m
//
// Work is split over output rows (m) across threads, so each weight row is
// streamed from memory once per call however many tokens there are; tokens are
// taken four at a time so that each weight load feeds four dot products.
#pragma once

#include <cstdint>

namespace pagedrt::cpu {

void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);

}  // namespace pagedrt::cpu
