// backend/fp8.hpp — the fp8 e4m3 format (OCP "E4M3FN", as torch.float8_e4m3fn
// and the safetensors dtype F8_E4M3): 1 sign, 4 exponent (bias 7), 3
// mantissa bits; no infinities, S.1111.111 is NaN, the largest finite value
// is 448, subnormals go down to 2^-9. Host and device alike.
#pragma once

#include <cstdint>
#include <cstring>

#include "backend/hd.hpp"

namespace pagedrt {

constexpr float kE4m3Max = 448.0f;

PAGEDRT_HD float e4m3_to_float(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xFu, man = b & 0x7u;
  uint32_t bits;
  if (exp == 0xFu && man == 0x7u) {
    bits = sign | 0x7FC00000u;  // NaN
  } else if (exp == 0) {
    // Subnormal: man x 2^-9 (exact in fp32).
    float v = static_cast<float>(man) * (1.0f / 512.0f);
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else {
    bits = sign | ((exp + 120u) << 23) | (man << 20);  // rebias 7 -> 127
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// A row's scale for per-row quantization (fp8 weights and activations):
// max |row| / 448, or 1 for a zero or non-finite max.
PAGEDRT_HD float e4m3_row_scale(float amax) {
  return amax > 0.0f && amax <= 3.402823466e38f ? amax / kE4m3Max : 1.0f;
}

// Round to nearest, ties to even; magnitudes past 448 saturate to 448 (as
// torch's conversion with saturation and every fp8 inference engine do);
// NaN stays NaN (0x7F with its sign).
PAGEDRT_HD uint8_t float_to_e4m3(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t mag = bits & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Fu);  // NaN
  if (mag >= 0x43E00000u) return static_cast<uint8_t>(sign | 0x7Eu);  // >= 448 (and inf): saturate
  const int exp = static_cast<int>(mag >> 23) - 127;
  if (exp < -6) {
    // Subnormal range: round mag / 2^-9 to an integer 0..8 (8 is the
    // smallest normal, 2^-6, whose code is 0x08 as well).
    float a;
    std::memcpy(&a, &mag, 4);
    const float q = a * 512.0f;  // exact (a power-of-two scaling)
    uint32_t n = static_cast<uint32_t>(q);
    const float rest = q - static_cast<float>(n);
    if (rest > 0.5f || (rest == 0.5f && (n & 1u))) ++n;
    return static_cast<uint8_t>(sign | n);
  }
  // Normal: keep 3 of the 23 mantissa bits, round the other 20 to even.
  uint32_t m = mag >> 20;                      // exponent and top 3 mantissa bits
  const uint32_t rest = mag & 0xFFFFFu, half = 0x80000u;
  if (rest > half || (rest == half && (m & 1u))) ++m;  // may carry into the exponent
  const uint32_t code = m - (120u << 3);       // rebias 127 -> 7
  if (code > 0x7Eu) return static_cast<uint8_t>(sign | 0x7Eu);  // rounded past 448
  return static_cast<uint8_t>(sign | code);
}

// fp8 KV rows (kv_cache_dtype "fp8", paged_kv.hpp's Fp8Kv): each (token, kv
// head) row of K or V is stored as codes e4m3(x * 2^-e) with one exponent e
// of its own, the smallest with max |x| <= 448 * 2^e, so that the row's
// largest value lands in e4m3's top binade (224, 448] and nothing saturates.
// A power of two keeps dequantization exact: e4m3(code) * 2^e has 4
// significant bits and is the same number in fp32 and bf16.
constexpr int kKvExpMin = -110, kKvExpMax = 119;  // 2^(e + 8) stays a normal float

PAGEDRT_HD int kv_row_exponent(float amax) {
  uint32_t bits;
  std::memcpy(&bits, &amax, 4);
  bits &= 0x7FFFFFFFu;
  if (bits < 0x00800000u) return kKvExpMin;  // 0 and subnormals: the smallest exponent
  if (bits >= 0x7F800000u) return kKvExpMax;  // inf / NaN: the codes saturate or stay NaN
  // amax = m 2^e0, m in [1, 2); 448 = 1.75 2^8: e = e0 - 8, one more when m > 1.75
  const int e0 = static_cast<int>(bits >> 23) - 127;
  const int e = e0 - 8 + ((bits & 0x7FFFFFu) > 0x600000u ? 1 : 0);
  return e < kKvExpMin ? kKvExpMin : e > kKvExpMax ? kKvExpMax : e;
}

// 2^e as a float, for e in [-126, 127]
PAGEDRT_HD float exp2_int(int e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace pagedrt
