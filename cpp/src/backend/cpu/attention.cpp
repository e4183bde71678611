// Paged attention on the CPU, by tiles.
//
// A work item is one kv head of a tile: up to kTileRows / G consecutive query
// tokens of one sequence, each with its G query heads, as rows
//
//   row r = j * G + g:  token t0 + j, query head kvh * G + g,  r < R = n * G
//
// so every K and V row read from the cache serves all R rows (prefill), or
// the G heads of one token (decode, n = 1). Per item, two passes over the
// context, both reading the page table block by block:
//
//   S (R, ctx) = scale * Q K^T   16 keys at a time: the chunk of K is
//                                transposed (kt, 16 keys per vector) so each
//                                query word is one broadcast multiply-add
//                                (VDPBF16PS on bf16 pairs, FMA on fp32); for
//                                R <= 4 (decode) K is read in place instead
//                                (qk_units)
//   P = exp(S - rowmax), 0 past each row's causal end (positions[t] + 1)
//   O (R, D) = (P V) / rowsum    V rows widened to fp32, P stays fp32
//
// S stays whole in per-thread scratch (R x ctx fp32: 768 KiB for 48 rows at
// 4096 keys). Without AVX-512, or for a head dim that is not a multiple of 16,
// attend_rows does the same one row at a time.
#include "backend/cpu/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "backend/cpu/vec_math.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PAGEDRT_AVX2 1
#endif
#if defined(PAGEDRT_VEC512) && defined(__AVX512BF16__)
#define PAGEDRT_DPBF16 1
#endif

// GCC's AVX-512 intrinsics warn about their own `__Y = __Y` placeholders once
// inlined (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace pagedrt::cpu {
namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) { return bf16_to_f32(x); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = f32_to_bf16(v); }

// Rows (tokens x G) of a prefill tile: each chunk of K is transposed once per
// tile. Measured on Zen 4 (32 prompts of 64-200 tokens, G = 3): 16 rows 4.6 ms
// a layer, 24 rows 4.3, 48 rows 4.0, 96 rows 4.0.
constexpr int64_t kTileRows = 48;
constexpr int64_t kChunk = 16;        // keys per QK step: one vector of scores
constexpr int64_t kMaxVecDim = 256;   // head dims the vector path takes (and D % 16 == 0)

struct Tile {
  int32_t seq;  // sequence index
  int32_t t0;   // first token (batch row)
  int32_t n;    // tokens
};

template <typename T>
struct Args {
  const BatchView* b;
  const T* qkv;      // (num_tokens, (H + 2 Hkv) D)
  const T* k;        // (num_blocks, bs, Hkv, D)
  const T* v;        // (num_blocks, bs, Hkv, D)
  T* out;            // (num_tokens, H D)
  int64_t H, Hkv, D, G, bs;
  float scale;
};

// One thread's buffers, grown as needed and kept between calls.
struct Scratch {
  std::vector<int64_t> off;   // (ctx) element offset of each position's K/V row (head kvh)
  std::vector<int64_t> ctx;   // (R) keys each row attends to
  std::vector<int64_t> qoff;  // (R) element offset of each row's query in qkv
  std::vector<int64_t> ooff;  // (R) element offset of each row's output in out
  std::vector<float> s;       // (R, ldp) scores, then unnormalized probabilities
  std::vector<float> qf;      // (R, D) fp32 queries, where the kernel needs them
  std::vector<int64_t> qfoff; // (R) offset of each row in qf
  std::vector<float> acc;     // (D) one output row (portable path)
  std::vector<float> inv;     // (R) 1 / softmax denominator
};
Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// off[p], p < ctx: where position p's row of kv head kvh starts, walking the
// sequence's blocks; within a block consecutive positions are Hkv * D apart.
void row_offsets(const int32_t* pages, int64_t ctx, int64_t bs, int64_t Hkv, int64_t D, int64_t kvh,
                 int64_t* off) {
  const int64_t ld = Hkv * D;
  for (int64_t p = 0, blk = 0; p < ctx; ++blk) {
    const int64_t base = static_cast<int64_t>(pages[blk]) * bs * ld + kvh * D;
    const int64_t end = std::min(ctx, p + bs);
    for (int64_t o = base; p < end; ++p, o += ld) off[p] = o;
  }
}

// ---- portable path (no AVX-512, or a head dim the vector path does not take) ----

#ifdef PAGEDRT_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

// dot(a, b), a fp32, b fp32 or bf16
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#ifdef PAGEDRT_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  __m256 v = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  s = _mm_cvtss_f32(h);
#endif
  for (; i < n; ++i) s += a[i] * to_f32(b[i]);
  return s;
}

// y += a * x, x fp32 or bf16
template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef PAGEDRT_AVX2
  __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * to_f32(x[i]);
}

// The tile row by row: scores, softmax, P V, one row at a time.
template <typename T>
void attend_rows(const Args<T>& a, int64_t R, Scratch& sc) {
  const int64_t D = a.D;
  sc.qf.resize(D);
  sc.acc.resize(D);
  for (int64_t r = 0; r < R; ++r) {
    const T* q = a.qkv + sc.qoff[r];
    for (int64_t i = 0; i < D; ++i) sc.qf[i] = to_f32(q[i]);
    const int64_t ctx = sc.ctx[r];
    float* s = sc.s.data();
    float mx = -INFINITY;
    for (int64_t p = 0; p < ctx; ++p) mx = std::max(mx, s[p] = dot(sc.qf.data(), a.k + sc.off[p], D) * a.scale);
    float sum = 0.0f;
    for (int64_t p = 0; p < ctx; ++p) sum += (s[p] = std::exp(s[p] - mx));
    std::fill(sc.acc.begin(), sc.acc.end(), 0.0f);
    for (int64_t p = 0; p < ctx; ++p) axpy(s[p], a.v + sc.off[p], sc.acc.data(), D);
    const float inv = 1.0f / sum;
    T* o = a.out + sc.ooff[r];
    for (int64_t i = 0; i < D; ++i) store(o + i, sc.acc[i] * inv);
  }
}

// ---- AVX-512 path --------------------------------------------------------------

#ifdef PAGEDRT_VEC512

// In place: r[j] lane i -> r[i] lane j (16 x 16 fp32). Unpacks within 128-bit
// blocks, then two block shuffles: 64 shuffles.
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // per block: t[2i] = a0 b0 a1 b1, t[2i+1] = a2 b2 a3 b3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // per block: r[4i + k] = column k of rows 4i .. 4i + 3
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int k = 0; k < 4; ++k) {  // block L of r[k], r[4 + k], r[8 + k], r[12 + k] -> r[4L + k]
    const __m512 u0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x44), u1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xEE);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x44);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xEE);
    t[k] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    t[8 + k] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// What a 32-bit "word" of a query or key row is: with VDPBF16PS a pair of bf16
// (QW = uint16_t, W = D / 2 words); otherwise one fp32 value (QW = float,
// W = D; bf16 rows are widened first).
#ifdef PAGEDRT_DPBF16
inline __m512 qk_step(__m512 acc, const uint16_t* q, int64_t w, __m512 k) {
  uint32_t pair;
  std::memcpy(&pair, q + 2 * w, 4);
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)), (__m512bh)_mm512_castps_si512(k));
}
#endif
inline __m512 qk_step(__m512 acc, const float* q, int64_t w, __m512 k) {
  return _mm512_fmadd_ps(_mm512_set1_ps(q[w]), k, acc);
}

// Words [16 cb, 16 cb + 16) of a key row, as 16 lanes (zero past W)
inline __m512 key_words(const float* row, int64_t cb, int64_t W, bool) {
  return _mm512_loadu_ps(row + 16 * cb);  // W = D, a multiple of 16
}
inline __m512 key_words(const uint16_t* row, int64_t cb, int64_t W, bool pairs) {
  if (!pairs) return widen16(row + 16 * cb);
  const float* p = reinterpret_cast<const float*>(row + 32 * cb);
  return 16 * cb + 16 <= W ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first_lanes(W - 16 * cb), p);
}

alignas(64) constexpr float kZeros[kMaxVecDim] = {};  // the row of a missing key

// kt (W, 16) = the W words of keys off[0 .. nk) as columns; keys nk .. 15 are 0
template <typename T>
void transpose_keys(const T* k, const int64_t* off, int64_t nk, int64_t W, bool pairs, float* kt) {
  const T* rows[16];
  for (int64_t j = 0; j < 16; ++j) rows[j] = j < nk ? k + off[j] : reinterpret_cast<const T*>(kZeros);
  for (int64_t cb = 0; 16 * cb < W; ++cb) {
    __m512 r[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) r[j] = key_words(rows[j], cb, W, pairs);
    transpose16(r);
    if (16 * cb + 16 <= W) {
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) _mm512_store_ps(kt + (16 * cb + c) * 16, r[c]);
    } else {
      for (int64_t c = 0; c < W - 16 * cb; ++c) _mm512_store_ps(kt + (16 * cb + c) * 16, r[c]);
    }
  }
}

// Asks for the n rows base + off[i] (`bytes` each) to be brought into cache:
// the blocks of a sequence are scattered, which the hardware prefetchers
// do not follow.
template <typename T>
inline void prefetch_rows(const T* base, const int64_t* off, int64_t n, int64_t bytes) {
  for (int64_t i = 0; i < n; ++i) {
    const char* p = reinterpret_cast<const char*>(base + off[i]);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
  }
}

// s[r][0 .. 16) = scale * q_r . key, for NR query rows and the 16 keys of kt;
// two accumulator chains per row hide the multiply-add latency.
template <int NR, typename QW>
void qk_rows(const QW* base, const int64_t* qoff, const float* kt, int64_t W, float scale, float* s,
             int64_t lds) {
  const QW* q[NR];
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) {
    q[r] = base + qoff[r];
    a0[r] = a1[r] = _mm512_setzero_ps();
  }
  for (int64_t w = 0; w < W; w += 2) {  // W is even
    const __m512 k0 = _mm512_load_ps(kt + w * 16), k1 = _mm512_load_ps(kt + (w + 1) * 16);
    for (int r = 0; r < NR; ++r) {
      a0[r] = qk_step(a0[r], q[r], w, k0);
      a1[r] = qk_step(a1[r], q[r], w + 1, k1);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(_mm512_add_ps(a0[r], a1[r]), sv));
}

template <int NR, typename QW>
void qk_rows_n(int64_t nr, const QW* base, const int64_t* qoff, const float* kt, int64_t W, float scale,
               float* s, int64_t lds) {
  if constexpr (NR > 1)
    if (nr < NR) return qk_rows_n<NR - 1>(nr, base, qoff, kt, W, scale, s, lds);
  qk_rows<NR>(base, qoff, kt, W, scale, s, lds);
}

// ---- decode-sized tiles: K read in place, in 128-bit units ----
//
// For R <= 4 rows the transposed copy of K costs more than the rows' dot
// products (decode on Zen 4, 30 layers' caches: 0.257 -> 0.245 ms a layer in
// bf16, 0.585 -> 0.47 ms in fp32). Instead the 16 keys of a chunk go in four groups j = 0..3 of keys
// {j, j + 4, j + 8, j + 12}; a 4 x 4 transpose of 128-bit blocks puts unit u
// (8 bf16 or 4 fp32) of the group's keys into one vector, the query's unit u
// is broadcast to the four blocks, and a multiply-add (VDPBF16PS or FMA)
// leaves in block L four partial sums of key j + 4L. At the end of the row
// the four lanes of each block are added: lane 4L + j, key 4L + j.

#ifdef PAGEDRT_DPBF16
inline __m512 unit_step(__m512 acc, const uint16_t* q, int64_t u, __m512i k) {
  const __m512i qu = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 8 * u)));
  return _mm512_dpbf16_ps(acc, (__m512bh)qu, (__m512bh)k);
}
#endif
inline __m512 unit_step(__m512 acc, const float* q, int64_t u, __m512i k) {
  return _mm512_fmadd_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(q + 4 * u)), _mm512_castsi512_ps(k), acc);
}

// lane 4L + j of the result = the sum of block L of a[j]
inline __m512 block_sums(const __m512* a) {
  const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
  const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
  const __m512d x = _mm512_castps_pd(t01), y = _mm512_castps_pd(t23);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}

// s[r][0 .. 16) = scale * q_r . key for NR rows and keys off[0 .. nk) (0 past nk);
// V = D * sizeof(T) / 64 vectors a key row
template <int NR, typename T>
void qk_units(const T* k, const int64_t* off, int64_t nk, const T* base, const int64_t* qoff, int64_t V,
              float scale, float* s, int64_t lds) {
  const T* rows[16];
  for (int64_t j = 0; j < 16; ++j) rows[j] = j < nk ? k + off[j] : reinterpret_cast<const T*>(kZeros);
  const T* q[NR];
  __m512 acc[NR][4];
  for (int r = 0; r < NR; ++r) {
    q[r] = base + qoff[r];
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  constexpr int64_t kPerVec = 64 / sizeof(T);  // elements of T in a vector
  for (int64_t h = 0; h < V; ++h) {
    for (int j = 0; j < 4; ++j) {
      const int64_t e = h * kPerVec;  // x_L: vector h of key j + 4L
      const __m512i x0 = _mm512_loadu_si512(rows[j] + e), x1 = _mm512_loadu_si512(rows[j + 4] + e);
      const __m512i x2 = _mm512_loadu_si512(rows[j + 8] + e), x3 = _mm512_loadu_si512(rows[j + 12] + e);
      const __m512i a = _mm512_shuffle_i32x4(x0, x1, 0x44), b = _mm512_shuffle_i32x4(x0, x1, 0xEE);
      const __m512i c = _mm512_shuffle_i32x4(x2, x3, 0x44), d = _mm512_shuffle_i32x4(x2, x3, 0xEE);
      const __m512i y[4] = {_mm512_shuffle_i32x4(a, c, 0x88), _mm512_shuffle_i32x4(a, c, 0xDD),
                            _mm512_shuffle_i32x4(b, d, 0x88), _mm512_shuffle_i32x4(b, d, 0xDD)};
      for (int r = 0; r < NR; ++r)
        for (int i = 0; i < 4; ++i) acc[r][j] = unit_step(acc[r][j], q[r], 4 * h + i, y[i]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(block_sums(acc[r]), sv));
}

// S (R, ldp) = scale * Q K^T over keys [0, ldp), ldp = ctx rounded up to 16;
// query row r at base + qoff[r] (QW = uint16_t: bf16 pairs for VDPBF16PS)
template <typename T, typename QW>
void qk(const Args<T>& a, const QW* base, const int64_t* qoff, int64_t R, int64_t ctx, int64_t ldp,
        Scratch& sc) {
  constexpr int64_t kRows = 8;
  constexpr bool kPairs = sizeof(QW) == 2;
  const int64_t W = kPairs ? a.D / 2 : a.D;
  alignas(64) static thread_local float kt[kMaxVecDim * kChunk];  // (W, 16)
  // K in place where the queries are T itself (bf16 pairs or fp32)
  constexpr bool kUnits = std::is_same_v<T, QW>;
  const bool units = R <= 4 && a.D * static_cast<int64_t>(sizeof(T)) % 64 == 0;
  // K two chunks ahead; V (read by the P V pass after this one) a chunk at a time.
  // Measured on Zen 4 (decode, 32 sequences x ~200 keys, 30 layers' caches):
  // 0.38 ms a layer without, 0.25 ms with; one chunk ahead 0.27, V ahead too 0.26.
  const int64_t bytes = a.D * static_cast<int64_t>(sizeof(T)), ahead = 2 * kChunk;
  prefetch_rows(a.k, sc.off.data(), std::min(ahead, ctx), bytes);
  for (int64_t p0 = 0; p0 < ctx; p0 += kChunk) {
    if (p0 + ahead < ctx) prefetch_rows(a.k, sc.off.data() + p0 + ahead, std::min(kChunk, ctx - p0 - ahead), bytes);
    prefetch_rows(a.v, sc.off.data() + p0, std::min(kChunk, ctx - p0), bytes);
    if constexpr (kUnits) {
      if (units) {
        float* sp = sc.s.data() + p0;
        const int64_t nk = std::min(kChunk, ctx - p0), V = a.D * static_cast<int64_t>(sizeof(T)) / 64;
        switch (R) {
          case 1: qk_units<1>(a.k, sc.off.data() + p0, nk, base, qoff, V, a.scale, sp, ldp); break;
          case 2: qk_units<2>(a.k, sc.off.data() + p0, nk, base, qoff, V, a.scale, sp, ldp); break;
          case 3: qk_units<3>(a.k, sc.off.data() + p0, nk, base, qoff, V, a.scale, sp, ldp); break;
          default: qk_units<4>(a.k, sc.off.data() + p0, nk, base, qoff, V, a.scale, sp, ldp); break;
        }
        continue;
      }
    }
    transpose_keys(a.k, sc.off.data() + p0, std::min(kChunk, ctx - p0), W, kPairs, kt);
    for (int64_t r0 = 0; r0 < R; r0 += kRows)
      qk_rows_n<kRows>(std::min(kRows, R - r0), base, qoff + r0, kt, W, a.scale, sc.s.data() + r0 * ldp + p0,
                       ldp);
  }
}

// s[0 .. ldp) := exp(s - max s[0 .. ctx)), 0 from ctx on; returns 1 / their sum
float softmax_row(float* s, int64_t ctx, int64_t ldp) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t p = 0;
  for (; p + 16 <= ctx; p += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + p));
  if (p < ctx) mx = _mm512_mask_max_ps(mx, first_lanes(ctx - p), mx, _mm512_loadu_ps(s + p));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (p = 0; p < ldp; p += 16) {
    if (p >= ctx) {
      _mm512_storeu_ps(s + p, _mm512_setzero_ps());
      continue;
    }
    const __m512 e = _mm512_maskz_mov_ps(first_lanes(ctx - p), exp16(_mm512_sub_ps(_mm512_loadu_ps(s + p), m)));
    _mm512_storeu_ps(s + p, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// out rows (NR, 16 NV) at column d0 = inv * sum_{p < nk} P[r][p] V_p[d0 ..]:
// every V row is loaded and widened once for the NR rows held in registers.
template <typename T, int NV, int NR>
void pv_rows(const float* P, int64_t ldp, const T* v, const int64_t* off, int64_t nk, const float* inv,
             T* out, const int64_t* ooff) {
  __m512 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < nk; ++p) {
    const T* vp = v + off[p];
    __m512 vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = load16(vp + 16 * i);
    for (int r = 0; r < NR; ++r) {
      const __m512 w = _mm512_set1_ps(P[r * ldp + p]);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(w, vv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const __m512 s = _mm512_set1_ps(inv[r]);
    for (int i = 0; i < NV; ++i) store16(out + ooff[r] + 16 * i, _mm512_mul_ps(acc[r][i], s));
  }
}

template <typename T, int NV, int NR>
void pv_rows_n(int64_t nr, const float* P, int64_t ldp, const T* v, const int64_t* off, int64_t nk,
               const float* inv, T* out, const int64_t* ooff) {
  if constexpr (NR > 1)
    if (nr < NR) return pv_rows_n<T, NV, NR - 1>(nr, P, ldp, v, off, nk, inv, out, ooff);
  pv_rows<T, NV, NR>(P, ldp, v, off, nk, inv, out, ooff);
}

// Columns [d0, d0 + 16 NV) of all R output rows, NR rows at a time (NR * NV
// accumulators + NV values of V fit the 32 registers)
template <typename T, int NV>
void pv_columns(const Args<T>& a, int64_t R, int64_t ldp, int64_t d0, Scratch& sc) {
  constexpr int64_t NR = NV >= 4 ? 6 : 8;
  for (int64_t r0 = 0; r0 < R; r0 += NR) {
    const int64_t nr = std::min(NR, R - r0);
    const int64_t nk = *std::max_element(sc.ctx.begin() + r0, sc.ctx.begin() + r0 + nr);
    pv_rows_n<T, NV, NR>(nr, sc.s.data() + r0 * ldp, ldp, a.v + d0, sc.off.data(), nk, sc.inv.data() + r0,
                         a.out + d0, sc.ooff.data() + r0);
  }
}

template <typename T>
void attend_vec(const Args<T>& a, int64_t R, int64_t ctx, Scratch& sc) {
  const int64_t D = a.D, ldp = (ctx + kChunk - 1) / kChunk * kChunk;
  sc.s.resize(R * ldp);
  sc.inv.resize(R);
#ifdef PAGEDRT_DPBF16
  constexpr bool kWiden = false;
#else
  constexpr bool kWiden = sizeof(T) == 2;
#endif
  if constexpr (kWiden) {  // bf16 without VDPBF16PS: the queries in fp32
    sc.qf.resize(R * D);
    sc.qfoff.resize(R);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t i = 0; i < D; i += 16) _mm512_storeu_ps(sc.qf.data() + r * D + i, load16(a.qkv + sc.qoff[r] + i));
      sc.qfoff[r] = r * D;
    }
    qk(a, sc.qf.data(), sc.qfoff.data(), R, ctx, ldp, sc);
  } else {
    qk(a, a.qkv, sc.qoff.data(), R, ctx, ldp, sc);
  }
  for (int64_t r = 0; r < R; ++r) sc.inv[r] = softmax_row(sc.s.data() + r * ldp, sc.ctx[r], ldp);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    switch (std::min<int64_t>(4, (D - d0) / 16)) {
      case 1: pv_columns<T, 1>(a, R, ldp, d0, sc); break;
      case 2: pv_columns<T, 2>(a, R, ldp, d0, sc); break;
      case 3: pv_columns<T, 3>(a, R, ldp, d0, sc); break;
      default: pv_columns<T, 4>(a, R, ldp, d0, sc); break;
    }
  }
}

#endif  // PAGEDRT_VEC512

// One work item: the rows of `tile` under kv head kvh.
template <typename T>
void attend(const Args<T>& a, const Tile& tile, int64_t kvh) {
  Scratch& sc = scratch();
  const int64_t G = a.G, D = a.D, R = tile.n * G;
  const int64_t row = (a.H + 2 * a.Hkv) * D;
  sc.ctx.resize(R);
  sc.qoff.resize(R);
  sc.ooff.resize(R);
  int64_t ctx = 0;
  for (int64_t j = 0, r = 0; j < tile.n; ++j) {
    const int64_t t = tile.t0 + j, c = static_cast<int64_t>(a.b->positions[t]) + 1;
    ctx = std::max(ctx, c);
    for (int64_t g = 0; g < G; ++g, ++r) {
      sc.ctx[r] = c;
      sc.qoff[r] = t * row + (kvh * G + g) * D;
      sc.ooff[r] = t * a.H * D + (kvh * G + g) * D;
    }
  }
  sc.off.resize(ctx);
  row_offsets(a.b->page_indices + a.b->page_indptr[tile.seq], ctx, a.bs, a.Hkv, D, kvh, sc.off.data());
#ifdef PAGEDRT_VEC512
  if (D % 16 == 0 && D <= kMaxVecDim) return attend_vec(a, R, ctx, sc);
#endif
  sc.s.resize(ctx);
  attend_rows(a, R, sc);
}

// x (2 half) := (x1 c - x2 s, x2 c + x1 s), x1 = x[0 .. half), x2 = x[half .. 2 half):
// the rotate-half RoPE of transformers' Llama, in fp32
template <typename T>
inline void rotate_half(T* x, const float* c, const float* s, int64_t half) {
  int64_t i = 0;
#ifdef PAGEDRT_VEC512
  for (; i + 16 <= half; i += 16) {
    const __m512 x1 = load16(x + i), x2 = load16(x + i + half);
    const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
    store16(x + i, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)));
    store16(x + i + half, _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv)));
  }
#endif
  for (; i < half; ++i) {
    const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
    store(x + i, x1 * c[i] - x2 * s[i]);
    store(x + i + half, x2 * c[i] + x1 * s[i]);
  }
}

}  // namespace

template <typename T>
void rope_and_cache(const BatchView& b, T* qkv, const float* cos, const float* sin,
                    const AttentionShape& s, T* k_cache, T* v_cache, int threads) {
  const int64_t H = s.num_heads, Hkv = s.num_kv_heads, D = s.head_dim, half = D / 2;
  const int64_t row = (H + 2 * Hkv) * D;
#pragma omp parallel for schedule(static) num_threads(threads) if (b.num_tokens > 8)
  for (int64_t t = 0; t < b.num_tokens; ++t) {
    T* q = qkv + t * row;  // (H + Hkv, D) rotated: the q heads then the k heads
    const float* c = cos + static_cast<int64_t>(b.positions[t]) * half;
    const float* sn = sin + static_cast<int64_t>(b.positions[t]) * half;
    for (int64_t h = 0; h < H + Hkv; ++h) rotate_half(q + h * D, c, sn, half);
    const int64_t slot = b.slot_mapping[t];  // flat (block, offset) index
    std::copy(q + H * D, q + (H + Hkv) * D, k_cache + slot * Hkv * D);
    std::copy(q + (H + Hkv) * D, q + (H + 2 * Hkv) * D, v_cache + slot * Hkv * D);
  }
}

template <typename T>
void paged_attention(const BatchView& b, const T* qkv, const T* k_cache, const T* v_cache,
                     const AttentionShape& s, float scale, T* out, int threads) {
  const int64_t G = s.num_heads / s.num_kv_heads;  // query heads per kv head
  const Args<T> a{&b, qkv, k_cache, v_cache, out, s.num_heads, s.num_kv_heads, s.head_dim, G, s.block_size, scale};
  const int32_t per_tile = static_cast<int32_t>(std::max<int64_t>(1, kTileRows / G));
  std::vector<Tile> tiles;
  for (int32_t i = 0; i < b.num_seqs; ++i)
    for (int32_t t0 = b.query_start[i]; t0 < b.query_start[i + 1]; t0 += per_tile)
      tiles.push_back({i, t0, std::min(per_tile, b.query_start[i + 1] - t0)});
  // longest context first, so the dynamic schedule ends on short items
  std::stable_sort(tiles.begin(), tiles.end(), [&](const Tile& x, const Tile& y) {
    return b.positions[x.t0 + x.n - 1] > b.positions[y.t0 + y.n - 1];
  });
  const int64_t items = static_cast<int64_t>(tiles.size()) * s.num_kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (items > 1)
  for (int64_t item = 0; item < items; ++item) attend(a, tiles[item / s.num_kv_heads], item % s.num_kv_heads);
}

template void rope_and_cache<float>(const BatchView&, float*, const float*, const float*,
                                    const AttentionShape&, float*, float*, int);
template void rope_and_cache<uint16_t>(const BatchView&, uint16_t*, const float*, const float*,
                                       const AttentionShape&, uint16_t*, uint16_t*, int);
template void paged_attention<float>(const BatchView&, const float*, const float*, const float*,
                                     const AttentionShape&, float, float*, int);
template void paged_attention<uint16_t>(const BatchView&, const uint16_t*, const uint16_t*, const uint16_t*,
                                        const AttentionShape&, float, uint16_t*, int);

}  // namespace pagedrt::cpu
