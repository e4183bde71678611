// fp8 KV rows on the CPU. bf16 rows take e4m3_avx512.hpp's widening and the
// row's exponent added to the exponent field. fp32 rows widen each code to the fp16 bit
// pattern with the same digits, (code & 0x7F) << 7 and the sign on top:
// e4m3's 4 exponent bits (bias 7) land in fp16's 5 (bias 15), so the fp16
// number is the e4m3 one times 2^-8, subnormals included. VCVTPH2PS makes it
// fp32 exactly (it does not flush fp16 subnormals), and a multiply by
// 2^(e + 8) restores the scale: exact, as every value has 4 significant bits.
// NaN codes (0x7F, 0xFF: what quantize_kv_row makes of a NaN) come out NaN on
// every path, as the scalar tail's e4m3_to_float and the GPU's make them; the
// vector routes alone would make them finite (480 in bf16, 1.875 2^(e - 7)
// through fp16), so each marks them.
#include "backend/cpu/kv_fp8.hpp"

// GCC's AVX-512 intrinsics warn about their own `__Y = __Y` placeholders once
// inlined (GCC bug 105593; as in gemm_avx512bf16.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cmath>

#include "backend/cpu/e4m3_avx512.hpp"
#include "backend/fp8.hpp"
#include "backend/tensor.hpp"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "backend/cpu/vec_math.hpp"  // PAGEDRT_VEC512, store16
#elif defined(__AVX2__) && defined(__F16C__)
#include "backend/cpu/simd.hpp"
#define PAGEDRT_KV_F16C 1
#endif

namespace pagedrt::cpu {

template <typename T>
int8_t quantize_kv_row(const T* x, int64_t n, uint8_t* codes) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(to_f32(x[i])));
  const int e = kv_row_exponent(amax);
  const float inv = exp2_int(-e);  // exact: x * 2^-e only moves the exponent
  for (int64_t i = 0; i < n; ++i) codes[i] = float_to_e4m3(to_f32(x[i]) * inv);
  return static_cast<int8_t>(e);
}

template <typename T>
void dequantize_kv_row(const uint8_t* codes, int e, int64_t n, T* out) {
  const float s = exp2_int(e);
  int64_t i = 0;
#if defined(PAGEDRT_VEC512)
  if constexpr (sizeof(T) == 2) {
    // bf16 out: the codes' values as bf16 (exact, e4m3_avx512.hpp), then e
    // added to the exponent field of every nonzero lane (the results stay
    // normal: e4m3's 2^-9 .. 448 times 2^e, e in the quantizer's range).
    const __m512i add = _mm512_set1_epi16(static_cast<int16_t>(e * 128));
    for (; i + 32 <= n; i += 32) {
      const __m256i c8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i));
      const __m512i b = e4m3_to_bf16_bits(c8);
      const __m512i r = _mm512_mask_add_epi16(b, _mm512_test_epi16_mask(b, _mm512_set1_epi16(0x7FFF)), b, add);
      const __mmask32 nan =
          _mm256_cmpeq_epi8_mask(_mm256_and_si256(c8, _mm256_set1_epi8(0x7F)), _mm256_set1_epi8(0x7F));
      _mm512_storeu_si512(out + i, _mm512_mask_mov_epi16(r, nan, _mm512_set1_epi16(0x7FC0)));
    }
  }
#endif
#if defined(PAGEDRT_VEC512)
  const __m512 sv = _mm512_set1_ps(exp2_int(e + 8));
  for (; i + 16 <= n; i += 16) {
    const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    const __m256i m = _mm256_and_si256(c, _mm256_set1_epi16(0x7F));
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8),
                                _mm256_slli_epi16(m, 7));
    // NaN: fp16 exponent all ones (0x3F80 | 0x7C00, a nonzero mantissa)
    h = _mm256_or_si256(h, _mm256_and_si256(_mm256_cmpeq_epi16(m, _mm256_set1_epi16(0x7F)),
                                            _mm256_set1_epi16(0x7C00)));
    store16(out + i, _mm512_mul_ps(_mm512_cvtph_ps(h), sv));
  }
#elif defined(PAGEDRT_KV_F16C)
  if constexpr (sizeof(T) == 4) {
    const __m256 sv = _mm256_set1_ps(exp2_int(e + 8));
    for (; i + 8 <= n; i += 8) {
      const __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
      const __m128i m = _mm_and_si128(c, _mm_set1_epi16(0x7F));
      __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8), _mm_slli_epi16(m, 7));
      h = _mm_or_si128(h, _mm_and_si128(_mm_cmpeq_epi16(m, _mm_set1_epi16(0x7F)), _mm_set1_epi16(0x7C00)));
      _mm256_storeu_ps(reinterpret_cast<float*>(out + i), _mm256_mul_ps(_mm256_cvtph_ps(h), sv));
    }
  }
#endif
  for (; i < n; ++i) store_f32(out + i, e4m3_to_float(codes[i]) * s);
}

template int8_t quantize_kv_row<float>(const float*, int64_t, uint8_t*);
template int8_t quantize_kv_row<uint16_t>(const uint16_t*, int64_t, uint8_t*);
template void dequantize_kv_row<float>(const uint8_t*, int, int64_t, float*);
template void dequantize_kv_row<uint16_t>(const uint8_t*, int, int64_t, uint16_t*);

}  // namespace pagedrt::cpu
