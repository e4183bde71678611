// backend/cpu/vec_math.hpp — 16-lane AVX-512 helpers shared by the CPU
// kernels: e^x, and bf16 <-> fp32 of a vector. Only where the build has
// AVX-512 F, BW and VL (PAGEDRT_VEC512 says so); callers keep a scalar path.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAGEDRT_VEC512 1
#include "backend/cpu/simd.hpp"

#include <cstdint>

namespace pagedrt::cpu {

// e^x in each lane. x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2
// (ln2 in two parts, so r is exact to ~1e-10); e^r = 1 + r + r^2 p(r) with
// p the degree-5 minimax polynomial of Cephes' expf; VSCALEFPS multiplies by
// 2^n without building an exponent field, so no range reduction of n is
// needed. Relative error <= 1.2e-7 (1.24 ulp, measured on a 1e-4 grid) for
// x in [-87, 88]; results below 2^-126 are denormal as with std::exp,
// x <= -104 and -inf give 0, x >= 89 and +inf give +inf, NaN stays NaN.
inline __m512 exp16(__m512 x) {
  // the clamps keep n finite; _mm512_max_ps(c, x) returns x when x is NaN
  x = _mm512_min_ps(_mm512_set1_ps(100.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // 0.693359375 = 355 / 512: n * it is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(e, n);
}

// fp32 of 16 bf16 (exact)
inline __m512 widen16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 widen16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_castsi128_si256(_mm_setzero_si128());
  const __m512i w = _mm512_maskz_cvtepu16_epi32(m, _mm256_mask_loadu_epi16(h, m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// bf16 bits of 16 fp32: round to nearest even, NaN kept quiet (bit for bit
// f32_to_bf16 in backend/tensor.hpp)
inline __m256i narrow16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// 16 lanes of fp32 from / to float or bf16 memory
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return widen16(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) { return widen16(p, m); }
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16(v)); }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(uint16_t* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow16(v)); }

// lanes [0, n) of 16
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

}  // namespace pagedrt::cpu
#endif
