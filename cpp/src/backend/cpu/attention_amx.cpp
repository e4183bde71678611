// CPU prefill attention's Q K^T and P V on Intel AMX tiles (deterministic=False,
// bf16 caches; attention_avx512.inc's attend_amx calls them for tiles of more
// than 4 rows where gemm_amx_for_large_steps()). Built with -mamx-tile
// -mamx-bf16 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 (CMakeLists.txt) on
// x86-64 only.
//
//   S (R, 16) = scale * Q K^T, 16 keys a call: A = 16 query rows x 32 of D,
//   B = the keys' words (pairs of D) as attend_vec's transpose_keys lays them
//   out = (16 pairs x 16 keys), C = 16 rows x 16 keys.
//   out[r] (D bf16) = inv[r] * sum_{p < nk} bf16(P[r][p]) * V_p,   r < R
//
// For P V TDPBF16PS multiplies A (16 rows x 32 bf16) by B (32 x 16 in pairs) into C
// (16 x 16 fp32). A is 16 rows of P over 32 keys, rounded to bf16 once (the
// precision FlashAttention's bf16 kernels keep; the VDPBF16PS path keeps P
// in fp32, so the two differ in the last bits of a bf16 output); B is V over
// the same 32 keys and 16 of its columns, in pairs of keys ("VNNI": row q
// holds keys 2q and 2q + 1 of each column). V's rows are gathered from their
// pages into that layout once per work item, P's rows once, then every
// (16 rows, 16 columns) block of O is a chain of 32-key steps in key order.
#if defined(__x86_64__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/cpu/amx_tiles.hpp"
#include "backend/cpu/attention.hpp"

namespace pagedrt::cpu::amx {
namespace {

constexpr int64_t kRows = 16;  // a tile's rows (of P, of O)
constexpr int64_t kKeys = 32;  // keys a step: A's 64-byte rows
constexpr int kOutTiles = 4;   // C tiles 0-3: 64 columns of O at a time

// Tiles 0-3: C, 4: A (Q, P), 5-6: B (K, V)
void configure() { configure_tiles(7); }

// One thread's buffers, kept between calls.
struct Buffers {
  std::vector<uint16_t> q;  // (R rounded up to 16, D) bf16 Q, zeros past R
  std::vector<uint16_t> p;  // (R rounded up to 16, kp) bf16 P, zeros past R and nk
  std::vector<uint16_t> v;  // (kp / 2, D, 2) V in pairs of keys, zeros past nk
};
Buffers& buffers() {
  static thread_local Buffers b;
  return b;
}

// 32 bf16 lanes: a[0], b[0], a[1], b[1], ... a[15], b[15]
inline __m512i interleave(const uint16_t* a, const uint16_t* b) {
  // lane 2i <- a[i] (index i), lane 2i + 1 <- b[i] (index 32 + i)
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i va = _mm512_maskz_loadu_epi16(0xFFFF, a), vb = _mm512_maskz_loadu_epi16(0xFFFF, b);
  return _mm512_permutex2var_epi16(va, idx, vb);
}

// C tile `tile` into out's rows r0 .. r0 + rows, columns d0 .. d0 + 16, times inv[r]
void store(int tile, float* c, uint16_t* out, const int64_t* ooff, const float* inv, int64_t r0, int64_t rows,
           int64_t d0) {
  switch (tile) {  // the tile number must be a constant
    case 0: _tile_stored(0, c, 64); break;
    case 1: _tile_stored(1, c, 64); break;
    case 2: _tile_stored(2, c, 64); break;
    default: _tile_stored(3, c, 64); break;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 y = _mm512_mul_ps(_mm512_load_ps(c + i * kRows), _mm512_set1_ps(inv[r0 + i]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + ooff[r0 + i] + d0), (__m256i)_mm512_cvtneps_pbh(y));
  }
}

}  // namespace

void tiles_begin() { configure(); }
void tiles_end() { _tile_release(); }

const uint16_t* gather_q(const uint16_t* q, const int64_t* qoff, int64_t R, int64_t D) {
  std::vector<uint16_t>& qb = buffers().q;
  const int64_t rp = (R + kRows - 1) / kRows * kRows;
  qb.assign(static_cast<size_t>(rp * D), 0);
  for (int64_t r = 0; r < R; ++r) std::memcpy(qb.data() + r * D, q + qoff[r], static_cast<size_t>(D) * 2);
  return qb.data();
}

void qk_chunk(const uint16_t* qb, int64_t R, int64_t D, const float* kt, float scale, float* s, int64_t lds) {
  alignas(64) float c[kRows * kRows];
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < R; r0 += kRows) {
    _tile_zero(0);
    for (int64_t d0 = 0; d0 < D; d0 += kKeys) {  // 32 of D a step: kt's rows d0 / 2 .. d0 / 2 + 16
      _tile_loadd(4, qb + r0 * D + d0, D * 2);
      _tile_loadd(5, kt + (d0 / 2) * kRows, 64);
      _tile_dpbf16ps(0, 4, 5);
    }
    _tile_stored(0, c, 64);
    const int64_t rows = R - r0 < kRows ? R - r0 : kRows;
    for (int64_t i = 0; i < rows; ++i) _mm512_storeu_ps(s + (r0 + i) * lds, _mm512_mul_ps(_mm512_load_ps(c + i * kRows), sv));
  }
}

void pv_bf16(const float* P, int64_t R, int64_t ldp, int64_t nk, const uint16_t* v, const int64_t* off, int64_t D,
             const float* inv, uint16_t* out, const int64_t* ooff) {
  Buffers& b = buffers();
  const int64_t kp = (nk + kKeys - 1) / kKeys * kKeys, rp = (R + kRows - 1) / kRows * kRows;
  b.p.assign(static_cast<size_t>(rp * kp), 0);
  b.v.resize(static_cast<size_t>(kp * D));
  alignas(64) float c[kRows * kRows];
  for (int64_t r = 0; r < R; ++r) {  // P's rows to bf16 (round to nearest even); zeros past nk stay
    const float* src = P + r * ldp;
    uint16_t* dst = b.p.data() + r * kp;
    int64_t p = 0;
    for (; p + 16 <= nk; p += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + p), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + p)));
    if (p < nk) {
      const __mmask16 m = static_cast<__mmask16>((1u << (nk - p)) - 1);
      _mm256_mask_storeu_epi16(dst + p, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + p)));
    }
  }
  static const uint16_t zeros[256] = {};
  for (int64_t q = 0; q < kp / 2; ++q) {  // V's rows 2q, 2q + 1 into pairs, 16 columns at a time
    const uint16_t* a = 2 * q < nk ? v + off[2 * q] : zeros;
    const uint16_t* e = 2 * q + 1 < nk ? v + off[2 * q + 1] : zeros;
    uint16_t* dst = b.v.data() + q * D * 2;
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_si512(dst + 2 * d, interleave(a + d, e + d));
  }
  const int64_t pstride = kp * 2, vstride = D * 4;  // bytes a row of P, of V's pairs
  for (int64_t r0 = 0; r0 < R; r0 += kRows) {
    const int64_t rows = R - r0 < kRows ? R - r0 : kRows;
    const uint16_t* a = b.p.data() + r0 * kp;
    for (int64_t d0 = 0; d0 < D; d0 += kOutTiles * 16) {
      const int64_t tiles = (D - d0) / 16 < kOutTiles ? (D - d0) / 16 : kOutTiles;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k0 = 0; k0 < kp; k0 += kKeys) {
        _tile_loadd(4, a + k0, pstride);
        const uint16_t* bv = b.v.data() + (k0 / 2) * D * 2 + 2 * d0;  // pairs k0/2 .., columns d0 ..
        _tile_loadd(5, bv, vstride);
        _tile_dpbf16ps(0, 4, 5);
        if (tiles > 1) {
          _tile_loadd(6, bv + 32, vstride);
          _tile_dpbf16ps(1, 4, 6);
        }
        if (tiles > 2) {
          _tile_loadd(5, bv + 64, vstride);
          _tile_dpbf16ps(2, 4, 5);
        }
        if (tiles > 3) {
          _tile_loadd(6, bv + 96, vstride);
          _tile_dpbf16ps(3, 4, 6);
        }
      }
      for (int t = 0; t < tiles; ++t) store(t, c, out, ooff, inv, r0, rows, d0 + 16 * t);
    }
  }
}

}  // namespace pagedrt::cpu::amx
#endif
