// backend/cpu/e4m3_avx512.hpp — 32 e4m3 codes as the bf16 bits of their
// values, exactly, in 7 AVX-512 BW integer instructions: shared by the fp8
// weights' GEMM (gemm_avx512bf16.cpp, in registers and into its buffer) and
// the fp8 KV rows (kv_fp8.cpp). Only where the includer is built for
// AVX-512 BW.
//
// A normal code's exponent and mantissa bits move up by 4 into the bf16
// fields and its exponent gains 120 (bf16's bias 127 less e4m3's 7); a
// subnormal code (exponent 0: m 2^-9, m = c & 7) takes its value from a table
// indexed by the code's low 5 bits; the sign goes on top. (The fp16 route it
// replaced, two VCVTPH2PS and a VCVTNE2PS2BF16, cost about as much again:
// fp8 decode on Zen 4 ran at 45% of its floor with it.) NaN codes come out
// as 480 with their sign: weights never hold them (a checkpoint's NaN codes
// are refused at load), and kv_fp8.cpp marks them NaN itself.
#pragma once

#if defined(__AVX512BW__)
#include <immintrin.h>

#include <cstdint>

namespace pagedrt::cpu {

inline __m512i e4m3_to_bf16_bits(__m256i c8) {
  // m 2^-9 as bf16 bits for m = 0..7 (the rest of the 32 entries unused)
  const __m512i subnormal = _mm512_setr_epi32(0x3B000000, 0x3BC03B80, 0x3C203C00, 0x3C603C40, 0, 0, 0, 0, 0, 0, 0,
                                              0, 0, 0, 0, 0);
  const __m512i c = _mm512_cvtepu8_epi16(c8);
  const __m512i mag = _mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(0x7F)), 4);
  const __mmask32 sub = _mm512_testn_epi16_mask(c, _mm512_set1_epi16(0x78));
  __m512i v = _mm512_add_epi16(mag, _mm512_set1_epi16(120 << 7));
  v = _mm512_mask_permutexvar_epi16(v, sub, c, subnormal);
  // v | (c << 8 & 0x8000): the sign
  return _mm512_ternarylogic_epi32(v, _mm512_slli_epi16(c, 8), _mm512_set1_epi16(static_cast<int16_t>(0x8000)), 0xF8);
}

}  // namespace pagedrt::cpu
#endif
