#include "backend/cpu/attention.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PAGEDRT_AVX2 1
#endif
#if defined(__AVX512F__)
#define PAGEDRT_AVX512 1
#endif

namespace pagedrt::cpu {
namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) { return bf16_to_f32(x); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = f32_to_bf16(v); }

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

#ifdef PAGEDRT_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The 16 horizontal sums of a[0..15], in order, by a transpose-and-add tree
// (~30 shuffles and adds instead of 16 full reductions).
inline __m512 hsum16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j)  // 128-bit lanes: [a_j: l0+l2, a_j: l1+l3, a_j+8: l0+l2, a_j+8: l1+l3]
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[j], a[j + 8], 0x44), _mm512_shuffle_f32x4(a[j], a[j + 8], 0xEE));
  for (int j = 0; j < 4; ++j)  // lanes: sums (4 partials each) of keys j, j+8, j+4, j+12
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[j], b[j + 4], 0x88), _mm512_shuffle_f32x4(b[j], b[j + 4], 0xDD));
  for (int j = 0; j < 2; ++j)  // per lane: [c_j, c_j+2, c_j, c_j+2] (2 partials each)
    d[j] = _mm512_add_ps(_mm512_unpacklo_ps(c[j], c[j + 2]), _mm512_unpackhi_ps(c[j], c[j + 2]));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]));
  // lane L holds keys [0, 2, 1, 3] + (0, 8, 4, 12)[L]; the permutation is its own inverse
  const __m512 e = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), e);
}
#endif

// scores (G, ctx) = (q_g . k_p) * scale; k_p = k + off[p] (D elements)
template <typename T>
void qk_scores(const float* q, const T* k, const int64_t* off, int64_t ctx, int64_t G, int64_t D, float scale,
               float* scores) {
  int64_t p = 0;
#ifdef PAGEDRT_AVX512
  if (D % 16 == 0) {
    const __m512 sv = _mm512_set1_ps(scale);
    for (; p + 16 <= ctx; p += 16)
      for (int64_t g = 0; g < G; ++g) {
        __m512 acc[16];
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 qv = _mm512_loadu_ps(q + g * D + d);
          for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, load16(k + off[p + j] + d), acc[j]);
        }
        _mm512_storeu_ps(scores + g * ctx + p, _mm512_mul_ps(hsum16(acc), sv));
      }
  }
#endif
  for (; p < ctx; ++p)
    for (int64_t g = 0; g < G; ++g) scores[g * ctx + p] = dot(q + g * D, k + off[p], D) * scale;
}

#ifdef PAGEDRT_AVX512
// pv_sum for a compile-time group size G and head dim 16 * ND: all G output
// rows stay in registers and each V row is loaded (and widened) once.
template <typename T, int G, int ND>
void pv_group(const float* probs, const T* v, const int64_t* off, int64_t ctx, float* acc) {
  __m512 o[G][ND];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < ND; ++i) o[g][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < ctx; ++p) {
    const T* vp = v + off[p];
    __m512 vv[ND];
    for (int i = 0; i < ND; ++i) vv[i] = load16(vp + 16 * i);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(probs[g * ctx + p]);
      for (int i = 0; i < ND; ++i) o[g][i] = _mm512_fmadd_ps(w, vv[i], o[g][i]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < ND; ++i) _mm512_storeu_ps(acc + (g * ND + i) * 16, o[g][i]);
}
#endif

// acc (G, D) = sum_p probs[g][p] * v_p; v_p = v + off[p]
template <typename T>
void pv_sum(const float* probs, const T* v, const int64_t* off, int64_t ctx, int64_t G, int64_t D, float* acc) {
#ifdef PAGEDRT_AVX512
  if (D == 64 && G == 3) return pv_group<T, 3, 4>(probs, v, off, ctx, acc);
  if (D == 64 && G == 4) return pv_group<T, 4, 4>(probs, v, off, ctx, acc);
  if (D == 64 && G == 2) return pv_group<T, 2, 4>(probs, v, off, ctx, acc);
  if (D == 128 && G == 2) return pv_group<T, 2, 8>(probs, v, off, ctx, acc);
  if (D % 16 == 0 && D <= 128) {  // the head's output row stays in registers
    const int64_t nd = D / 16;
    for (int64_t g = 0; g < G; ++g) {
      __m512 o[8];
      for (int64_t i = 0; i < nd; ++i) o[i] = _mm512_setzero_ps();
      const float* pg = probs + g * ctx;
      for (int64_t p = 0; p < ctx; ++p) {
        const __m512 w = _mm512_set1_ps(pg[p]);
        const T* vp = v + off[p];
        for (int64_t i = 0; i < nd; ++i) o[i] = _mm512_fmadd_ps(w, load16(vp + 16 * i), o[i]);
      }
      for (int64_t i = 0; i < nd; ++i) _mm512_storeu_ps(acc + g * D + 16 * i, o[i]);
    }
    return;
  }
#endif
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t p = 0; p < ctx; ++p)
    for (int64_t g = 0; g < G; ++g) axpy(probs[g * ctx + p], v + off[p], acc + g * D, D);
}

// Sequence index of every token of the batch (tokens are grouped by sequence).
std::vector<int32_t> token_seq(const BatchView& b) {
  std::vector<int32_t> seq(b.num_tokens);
  for (int32_t i = 0; i < b.num_seqs; ++i)
    for (int32_t t = b.query_start[i]; t < b.query_start[i + 1]; ++t) seq[t] = i;
  return seq;
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
    for (int64_t h = 0; h < H + Hkv; ++h) {
      T* x = q + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
        store(x + i, x1 * c[i] - x2 * sn[i]);
        store(x + i + half, x2 * c[i] + x1 * sn[i]);
      }
    }
    const int64_t slot = b.slot_mapping[t];  // flat (block, offset) index
    std::copy(q + H * D, q + (H + Hkv) * D, k_cache + slot * Hkv * D);
    std::copy(q + (H + Hkv) * D, q + (H + 2 * Hkv) * D, v_cache + slot * Hkv * D);
  }
}

template <typename T>
void paged_attention(const BatchView& b, const T* qkv, const T* k_cache, const T* v_cache,
                     const AttentionShape& s, float scale, T* out, int threads) {
  const int64_t H = s.num_heads, Hkv = s.num_kv_heads, D = s.head_dim;
  const int64_t G = H / Hkv;  // query heads per kv head
  const int64_t row = (H + 2 * Hkv) * D;
  const int64_t bs = s.block_size;
  const std::vector<int32_t> seq_of = token_seq(b);
  const int64_t items = static_cast<int64_t>(b.num_tokens) * Hkv;
#pragma omp parallel num_threads(threads) if (items > 1)
  {
    std::vector<float> scores;  // (G, ctx) for one (token, kv head)
    std::vector<float> acc;     // (G, D)
    std::vector<float> qf;      // (G, D) the query heads in fp32
    std::vector<int64_t> off;   // (ctx) element offset of each position's K/V row
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t t = item / Hkv, kvh = item % Hkv;
      const int32_t i = seq_of[t];
      const int64_t ctx = static_cast<int64_t>(b.positions[t]) + 1;
      const int32_t* pages = b.page_indices + b.page_indptr[i];
      const T* qt = qkv + t * row + kvh * G * D;  // (G, D)
      qf.resize(G * D);
      for (int64_t j = 0; j < G * D; ++j) qf[j] = to_f32(qt[j]);
      off.resize(ctx);
      for (int64_t p = 0; p < ctx; ++p)
        off[p] = ((static_cast<int64_t>(pages[p / bs]) * bs + p % bs) * Hkv + kvh) * D;
      scores.resize(G * ctx);
      qk_scores(qf.data(), k_cache, off.data(), ctx, G, D, scale, scores.data());
      for (int64_t g = 0; g < G; ++g) {  // softmax per query head
        float* sc = scores.data() + g * ctx;
        float mx = *std::max_element(sc, sc + ctx);
        float sum = 0.0f;
        for (int64_t p = 0; p < ctx; ++p) sum += (sc[p] = std::exp(sc[p] - mx));
        const float inv = 1.0f / sum;
        for (int64_t p = 0; p < ctx; ++p) sc[p] *= inv;
      }
      acc.resize(G * D);
      pv_sum(scores.data(), v_cache, off.data(), ctx, G, D, acc.data());
      T* o = out + t * H * D + kvh * G * D;
      for (int64_t j = 0; j < G * D; ++j) store(o + j, acc[j]);
    }
  }
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
