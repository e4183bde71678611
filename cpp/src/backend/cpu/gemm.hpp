// backend/cpu/gemm.hpp — y = x @ W^T with fp32 accumulation.
//
//   x: (n, k) fp32, row stride k
//   W: (m, k) fp32 or bf16 (uint16 bit patterns), row stride k
//   y: (n, m) fp32, row stride m
//
// Kernel variants: "scalar" (any processor), "avx2" (AVX2 + FMA) and
// "avx512" (AVX-512F), the last two on x86-64.
// The best one the processor supports is chosen once at start-up; the
// environment variable PAGEDRT_CPU_KERNEL=scalar forces the portable one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pagedrt::cpu {

void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);

// The variant gemm_f32/gemm_bf16 use, and every variant this build and processor can run.
const std::string& gemm_variant();
std::vector<std::string> gemm_variants();

// One call through a named variant (for tests). Throws Error(InvalidArgument)
// for a variant that is not available.
void gemm_with(const std::string& variant, const float* x, const void* w, bool bf16, float* y, int64_t n,
               int64_t m, int64_t k, int threads);

namespace scalar {
void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
}  // namespace scalar
namespace avx2 {
void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
}  // namespace avx2
namespace avx512 {
void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
}  // namespace avx512

}  // namespace pagedrt::cpu
