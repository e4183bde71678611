#include "backend/cpu/gemm.hpp"

#include <cstdlib>
#include <cstring>

#include "pagedrt/error.hpp"

namespace pagedrt::cpu {
namespace {

using GemmF32 = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int);
using GemmBf16 = void (*)(const float*, const uint16_t*, float*, int64_t, int64_t, int64_t, int);
using GemmBf16Bf16 = void (*)(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t, int);

struct Variant {
  std::string name;
  GemmF32 f32;
  GemmBf16 bf16;
  GemmBf16Bf16 bf16_bf16;
};

// PAGEDRT_HAVE_AVX2_KERNELS: gemm_avx2.cpp and gemm_avx512.cpp were built
// (x86-64 with GCC or Clang); PAGEDRT_HAVE_AVX512BF16_KERNEL: gemm_avx512bf16.cpp
// too (the compiler knows -mavx512bf16).
bool has_avx2() {
#ifdef PAGEDRT_HAVE_AVX2_KERNELS
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool has_avx512bf16() {
#ifdef PAGEDRT_HAVE_AVX512BF16_KERNEL
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// Narrowest first.
std::vector<Variant> available() {
  std::vector<Variant> v = {{"scalar", scalar::gemm_f32, scalar::gemm_bf16, scalar::gemm_bf16_bf16}};
#ifdef PAGEDRT_HAVE_AVX2_KERNELS
  if (has_avx2()) v.push_back({"avx2", avx2::gemm_f32, avx2::gemm_bf16, avx2::gemm_bf16_bf16});
  if (__builtin_cpu_supports("avx512f"))
    v.push_back({"avx512", avx512::gemm_f32, avx512::gemm_bf16, avx512::gemm_bf16_bf16});
#endif
#ifdef PAGEDRT_HAVE_AVX512BF16_KERNEL
  if (has_avx512bf16())
    v.push_back({"avx512bf16", avx512::gemm_f32, avx512::gemm_bf16, avx512bf16::gemm_bf16_bf16});
#endif
  return v;
}

const Variant& chosen() {
  static const Variant v = [] {
    std::vector<Variant> all = available();
    const char* force = std::getenv("PAGEDRT_CPU_KERNEL");
    if (force != nullptr)
      for (const Variant& x : all)
        if (x.name == force) return x;
    return all.back();  // the widest
  }();
  return v;
}

}  // namespace

void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  chosen().f32(x, w, y, n, m, k, threads);
}

void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  chosen().bf16(x, w, y, n, m, k, threads);
}

void gemm_bf16_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  chosen().bf16_bf16(x, w, y, n, m, k, threads);
}

const std::string& gemm_variant() { return chosen().name; }

std::vector<std::string> gemm_variants() {
  std::vector<std::string> names;
  for (const Variant& v : available()) names.push_back(v.name);
  return names;
}

void gemm_with(const std::string& variant, GemmOperands operands, const void* x, const void* w, float* y,
               int64_t n, int64_t m, int64_t k, int threads) {
  for (const Variant& v : available())
    if (v.name == variant) {
      switch (operands) {
        case GemmOperands::F32xF32:
          v.f32(static_cast<const float*>(x), static_cast<const float*>(w), y, n, m, k, threads);
          break;
        case GemmOperands::F32xBf16:
          v.bf16(static_cast<const float*>(x), static_cast<const uint16_t*>(w), y, n, m, k, threads);
          break;
        case GemmOperands::Bf16xBf16:
          v.bf16_bf16(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w), y, n, m, k, threads);
          break;
      }
      return;
    }
  throw Error(ErrorKind::InvalidArgument, "GEMM variant '" + variant + "' is not available here");
}

float* gemm_scratch(int64_t count) {
  // Grows to the largest call on this thread and stays: no allocation per call.
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(static_cast<size_t>(count));
  return buffer.data();
}

}  // namespace pagedrt::cpu
