// backend/cpu/kv_fp8.hpp — one row of an fp8 KV cache (backend/paged_kv.hpp's
// Fp8Kv) to and from the activations' type: float, or uint16_t holding bf16.
#pragma once

#include <cstdint>

namespace pagedrt::cpu {

// codes[0 .. n) = e4m3(x * 2^-e) for the row's exponent e (fp8.hpp's
// kv_row_exponent of max |x|), rounded to nearest even; returns e.
template <typename T>
int8_t quantize_kv_row(const T* x, int64_t n, uint8_t* codes);

// out[0 .. n) = e4m3_to_float(codes[i]) * 2^e, exact in float and in bf16.
template <typename T>
void dequantize_kv_row(const uint8_t* codes, int e, int64_t n, T* out);

}  // namespace pagedrt::cpu
