// The AVX-512 BF16 GEMM for bf16 activations and bf16 weights, built with
// -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mfma (CMakeLists.txt) on x86-64
// only; gemm.cpp calls it only when the processor has all of them.
//
//   y (n, m) fp32 = x (n, k) bf16 @ W (m, k)^T bf16, fp32 accumulation.
//
// VDPBF16PS takes 32 bf16 pairs and adds a0*b0 + a1*b1 into each of 16 fp32
// lanes: twice the multiply-adds of a 512-bit fp32 FMA, and no conversion of
// either operand. Dot-product form as in gemm_kernel.inc, no repacking: one
// 512-bit load is 32 consecutive bf16 of a row of x or of W, and a tile of
// kT tokens x kR weight rows keeps kT * kR accumulators in registers, each
// summed across its lanes once at the end.
//
// Rounding: VDPBF16PS ignores MXCSR. It always rounds to nearest even, treats
// denormal inputs as zero and flushes denormal results to zero. A bf16 x bf16
// product is exact in fp32 (8 + 8 significand bits), so the only roundings are
// those of the fp32 additions, as with FMA (the summation order differs from
// the other variants: results agree to fp32 accumulation error, not bit for
// bit); the flush only changes values below 1.2e-38, far under what an fp32
// sum of activation products resolves.
#if defined(__x86_64__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "backend/cpu/simd.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>

// GCC's AVX-512 intrinsics warn about their own `__Y = __Y` placeholders once
// inlined (seen with GCC 12; GCC bug 105593): hundreds of false positives here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "backend/cpu/e4m3_avx512.hpp"
#include "backend/cpu/gemm.hpp"

namespace pagedrt::cpu::avx512bf16 {
namespace {

// Tile: kT tokens x kR rows, 24 accumulators + 6 weight vectors + 1 x vector
// of the 32 zmm registers; (kT + kR) / (kT * kR) = 0.42 loads per VDPBF16PS.
// Measured on Zen 4 (one core, n = 4 and 32, k = 576 and 1536) against 4x4,
// 4x5, 5x5, 6x4 (and 8x3, 3x8 in an earlier version): 4x6 was 4-11% faster
// than the next at n = 32 and within ~5% of the best at n = 4.
constexpr int kT = 4;
constexpr int kR = 6;
constexpr int kLanes = 32;  // bf16 per 512-bit load
static_assert(kR == kPackRows && kLanes == kPackLanes, "pack_rows lays out what packed_bf16_at reads (gemm.hpp)");

inline __m512bh load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load(const uint16_t* p, __mmask32 mask) { return (__m512bh)_mm512_maskz_loadu_epi16(mask, p); }

// 32 fp8 weights (e4m3 codes) as 32 bf16 of their values, exactly (e4m3_avx512.hpp).
inline __m512bh widen_e4m3(__m256i c8) { return (__m512bh)e4m3_to_bf16_bits(c8); }
inline __m512bh load(const uint8_t* p) { return widen_e4m3(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512bh load(const uint8_t* p, __mmask32 mask) { return widen_e4m3(_mm256_maskz_loadu_epi8(mask, p)); }

// The lane sums of four vectors, as one (4) vector: ~13 instructions against
// ~32 for four separate horizontal sums. Within each 128-bit block:
//   unpack ps + add:  [a0 a1 a0 a1] (lanes 0+2, 1+3), same for a2, a3
//   unpack pd + add:  [a0 a1 a2 a3]  (the pd unpacks only move fp32 pairs)
// then the four blocks are added together.
inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512d s01 = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1)));
  const __m512d s23 = _mm512_castps_pd(_mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3)));
  __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(s01, s23)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(s01, s23)));
  s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, _MM_SHUFFLE(1, 0, 3, 2)));  // blocks 0+2, 1+3
  return _mm_add_ps(_mm512_castps512_ps128(s), _mm512_extractf32x4_ps(s, 1));
}

// Every loop over tokens or rows is unrolled before GCC decides where acc lives:
// left rolled, the accumulators go through the stack around the k loop (~13%
// slower at n = 32, k = 576). acc is only ever indexed, never passed by address.
#define PAGEDRT_UNROLL _Pragma("GCC unroll 8")

// Where micro() asks for the next R weight rows while these stream (the
// weights come from DRAM, once per call): nowhere, into L2, or into L1.
enum Prefetch { kNone, kToL2, kToL1 };

// T tokens x R weight rows: y[t][r] = dot(x[t], w[r]), prefetching the next R rows as P says.
// Packed: w holds the R rows as pack_rows lays them out (k chunk by k chunk, the
// rows' 32 elements side by side: one front-to-back stream, the next task's
// lines asked for R * k further on; k % 32 == 0); the same products in the
// same order, so the same bits.
template <int T, int R, Prefetch P, typename W, bool Packed = false>
inline void micro(const uint16_t* x, const W* w, float* y, int64_t k, int64_t ldy) {
  __m512 acc[T][R];
  PAGEDRT_UNROLL for (int t = 0; t < T; ++t)
    PAGEDRT_UNROLL for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    __m512bh wv[R];
    PAGEDRT_UNROLL for (int r = 0; r < R; ++r) {
      // The next task's line at this one's place: R rows on (k apart), or R k further on packed.
      const W* next = Packed ? w + R * k + i * R + r * kLanes : w + (R + r) * k + i;
      if (P == kToL2) _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T1);
      if (P == kToL1) _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T0);
      wv[r] = load(Packed ? w + i * R + r * kLanes : w + r * k + i);
    }
    PAGEDRT_UNROLL for (int t = 0; t < T; ++t) {
      const __m512bh xv = load(x + t * k + i);
      PAGEDRT_UNROLL for (int r = 0; r < R; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
    }
  }
  if (!Packed && i < k) {  // the last k % 32: masked loads read zeros past the row end
    const __mmask32 mask = static_cast<__mmask32>((1u << (k - i)) - 1);
    __m512bh wv[R];
    PAGEDRT_UNROLL for (int r = 0; r < R; ++r) wv[r] = load(w + r * k + i, mask);
    PAGEDRT_UNROLL for (int t = 0; t < T; ++t) {
      const __m512bh xv = load(x + t * k + i, mask);
      PAGEDRT_UNROLL for (int r = 0; r < R; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv, wv[r]);
    }
  }
  // The lane sums, four rows at a time; a last 1 to 3 rows padded with zeros.
  const __m512 z = _mm512_setzero_ps();
  PAGEDRT_UNROLL for (int t = 0; t < T; ++t) {
    PAGEDRT_UNROLL for (int r = 0; r < R; r += 4) {
      const __m128 s = sum4(acc[t][r], r + 1 < R ? acc[t][r + 1] : z, r + 2 < R ? acc[t][r + 2] : z,
                            r + 3 < R ? acc[t][r + 3] : z);
      if (r + 4 <= R)
        _mm_storeu_ps(y + t * ldy + r, s);
      else
        _mm_mask_storeu_ps(y + t * ldy + r, static_cast<__mmask8>((1u << (R - r)) - 1), s);
    }
  }
}
#undef PAGEDRT_UNROLL

// The last token tile: the next task's rows asked for in L1, or where
// g_prefetch says when it is the only tile (decode: n <= kT; larger n
// asked L2 in their first tile already).
template <int T, int R, bool Packed, typename W>
inline void last_tile(bool only, const uint16_t* x, const W* w, float* y, int64_t k, int64_t ldy) {
  if (only && g_prefetch == PrefetchTo::L2)
    micro<T, R, kToL2, W, Packed>(x, w, y, k, ldy);
  else
    micro<T, R, kToL1, W, Packed>(x, w, y, k, ldy);
}

// The last n % kT tokens, T < kT of them (prefetching: it is the last token tile).
template <int T, int R, bool Packed, typename W>
inline void token_tail(bool only, int64_t left, const uint16_t* x, const W* w, float* y, int64_t k,
                       int64_t ldy) {
  if constexpr (T > 0) {
    if (left == T)
      last_tile<T, R, Packed>(only, x, w, y, k, ldy);
    else
      token_tail<T - 1, R, Packed>(only, left, x, w, y, k, ldy);
  }
}

// All n tokens against R weight rows, kT tokens at a time. The first token
// tile asks L2 for the next task's rows, a whole task's time ahead of their
// use (weights streaming from DRAM at n = 32, 2 threads: 630-650 -> 650-720
// GFLOP/s); the last one asks L1 (earlier, the x rows streaming through L1
// would evict them). A step of at most kT tokens has one tile: it asks where
// g_prefetch says (L1 where this was tuned; L2 by 1.8x at n = 1 on a
// Zen 5 VM). Packed weights (pack_rows) are read front to back, one stream
// a task: a Zen 4 VM's core read them at the rate of a plain sum where the 6
// interleaved rows read ~0.78x of it (session 48, tools/gemv_layout_probe.cpp;
// a Zen 5 VM had shown no difference in an earlier session). The next
// task's lines are still asked into L2: without, two threads measured
// 0.81-1.03x the rows as stored (a run disturbed by other work), with it
// 1.00-1.31x (SmolLM2 batch-1 decode, same session).
template <int R, bool Packed, typename W>
inline void rows_block(const uint16_t* x, const W* w, float* y, int64_t n, int64_t m, int64_t k) {
  int64_t t = 0;
  if (t + kT < n) {
    micro<kT, R, kToL2, W, Packed>(x, w, y, k, m);
    t += kT;
  }
  for (; t + kT < n; t += kT) micro<kT, R, kNone, W, Packed>(x + t * k, w, y + t * m, k, m);
  if (n - t == kT)
    last_tile<kT, R, Packed>(t == 0, x + t * k, w, y + t * m, k, m);
  else
    token_tail<kT - 1, R, Packed>(t == 0, n - t, x + t * k, w, y + t * m, k, m);
}

// The last m % kR rows, R < kR of them.
template <int R, bool Packed, typename W>
inline void row_tail(int64_t left, const uint16_t* x, const W* w, float* y, int64_t n, int64_t m, int64_t k) {
  if constexpr (R > 0) {
    if (left == R)
      rows_block<R, Packed>(x, w, y, n, m, k);
    else
      row_tail<R - 1, Packed>(left, x, w, y, n, m, k);
  }
}

}  // namespace

namespace {

// One task per kR output rows; its weight rows stay in L1 while the token
// tiles of a panel pass over them (panel_tasks). fp8 weights (W = uint8_t)
// are then scaled per row.
template <typename W, bool Packed = false>
void gemm_tasks(const uint16_t* x, const W* w, const float* scale, float* y, int64_t n, int64_t m, int64_t k,
                int threads) {
  const bool parallel = threads > 1 && m * k * (n > 1 ? n : 1) > (1 << 15);
  panel_tasks(n, 2 * k, kT, (m + kR - 1) / kR, threads, parallel, [&](int64_t t0, int64_t np, int64_t task) {
    const uint16_t* xp = x + t0 * k;
    float* yp = y + t0 * m;
    const int64_t r = task * kR, end = r + kR < m ? r + kR : m;
    if (end - r == kR)
      rows_block<kR, Packed>(xp, w + r * k, yp + r, np, m, k);
    else
      row_tail<kR - 1, Packed>(end - r, xp, w + r * k, yp + r, np, m, k);
    if (scale != nullptr)
      for (int64_t t = 0; t < np; ++t)
        for (int64_t j = r; j < end; ++j) yp[t * m + j] *= scale[j];
  });
}

}  // namespace

void gemm_bf16_f8(const uint16_t* x, const uint8_t* w, const float* scale, float* y, int64_t n, int64_t m, int64_t k,
                  int threads) {
  gemm_tasks(x, w, scale, y, n, m, k, threads);
}

void widen_f8(const uint8_t* w, int64_t count, uint16_t* out) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) _mm512_storeu_si512(out + i, (__m512i)load(w + i));
  if (i < count) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (count - i)) - 1);
    _mm512_mask_storeu_epi16(out + i, mask, (__m512i)load(w + i, mask));
  }
}

void gemm_bf16_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  gemm_tasks(x, w, nullptr, y, n, m, k, threads);
}

// Task g's rows (kR of them, the last task's m % kR) keep their place, g * kR * k
// elements in; within it element (r, i) sits at (i / 32) * 32 * rows + r * 32 + i % 32.
// A task's rows go through a copy of their own, so out may be w (in place).
void pack_rows(const uint16_t* w, int64_t m, int64_t k, uint16_t* out) {
  std::vector<uint16_t> task(static_cast<size_t>(kR * k));
  for (int64_t r0 = 0; r0 < m; r0 += kR) {
    const int64_t rows = m - r0 < kR ? m - r0 : kR;
    std::copy(w + r0 * k, w + (r0 + rows) * k, task.begin());
    uint16_t* dst = out + r0 * k;
    for (int64_t i = 0; i < k; i += kLanes)
      for (int64_t r = 0; r < rows; ++r)
        _mm512_storeu_si512(dst + i * rows + r * kLanes, _mm512_loadu_si512(task.data() + r * k + i));
  }
}

void gemm_bf16_bf16_packed(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k,
                           int threads) {
  gemm_tasks<uint16_t, true>(x, w, nullptr, y, n, m, k, threads);
}

}  // namespace pagedrt::cpu::avx512bf16
#endif
