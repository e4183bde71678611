#include "backend/cpu/gemm.hpp"

#include <cstdlib>
#include <cstring>

#include "pagedrt/error.hpp"

namespace pagedrt::cpu {
namespace {

using GemmF32 = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int);
using GemmBf16 = void (*)(const float*, const uint16_t*, float*, int64_t, int64_t, int64_t, int);

struct Variant {
  std::string name;
  GemmF32 f32;
  GemmBf16 bf16;
};

// PAGEDRT_HAVE_AVX2_KERNELS: gemm_avx2.cpp and gemm_avx512.cpp were built
// (x86-64 with GCC or Clang).
bool has_avx2() {
#ifdef PAGEDRT_HAVE_AVX2_KERNELS
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::vector<Variant> available() {
  std::vector<Variant> v = {{"scalar", scalar::gemm_f32, scalar::gemm_bf16}};
#ifdef PAGEDRT_HAVE_AVX2_KERNELS
  if (has_avx2()) v.push_back({"avx2", avx2::gemm_f32, avx2::gemm_bf16});
  if (__builtin_cpu_supports("avx512f")) v.push_back({"avx512", avx512::gemm_f32, avx512::gemm_bf16});
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

const std::string& gemm_variant() { return chosen().name; }

std::vector<std::string> gemm_variants() {
  std::vector<std::string> names;
  for (const Variant& v : available()) names.push_back(v.name);
  return names;
}

void gemm_with(const std::string& variant, const float* x, const void* w, bool bf16, float* y, int64_t n,
               int64_t m, int64_t k, int threads) {
  for (const Variant& v : available())
    if (v.name == variant) {
      if (bf16)
        v.bf16(x, static_cast<const uint16_t*>(w), y, n, m, k, threads);
      else
        v.f32(x, static_cast<const float*>(w), y, n, m, k, threads);
      return;
    }
  throw Error(ErrorKind::InvalidArgument, "GEMM variant '" + variant + "' is not available here");
}

}  // namespace pagedrt::cpu
