#include "backend/cpu/gemm.hpp"

#include <algorithm>

#include "backend/tensor.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PAGEDRT_AVX2 1
#endif

namespace pagedrt::cpu {
namespace {

inline float weight_at(const float* w, int64_t i) { return w[i]; }
inline float weight_at(const uint16_t* w, int64_t i) { return bf16_to_f32(w[i]); }

#ifdef PAGEDRT_AVX2
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t* w) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// T tokens x R weight rows: y[t][r] = dot(x[t], w[r]).
template <int T, int R, typename W>
inline void micro(const float* x, int64_t k, const W* w, float* y, int64_t ldy) {
  int64_t i = 0;
  float acc[T][R];
#ifdef PAGEDRT_AVX2
  __m256 a[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) a[t][r] = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load8(w + r * k + i);
    for (int t = 0; t < T; ++t) {
      __m256 xv = _mm256_loadu_ps(x + t * k + i);
      for (int r = 0; r < R; ++r) a[t][r] = _mm256_fmadd_ps(xv, wv[r], a[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = hsum(a[t][r]);
#else
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = 0.0f;
#endif
  for (; i < k; ++i)
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) acc[t][r] += x[t * k + i] * weight_at(w, r * k + i);
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) y[t * ldy + r] = acc[t][r];
}

template <int R, typename W>
inline void rows_block(const float* x, const W* w, float* y, int64_t n, int64_t m, int64_t k) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) micro<4, R>(x + t * k, k, w, y + t * m, m);
  switch (n - t) {
    case 3: micro<3, R>(x + t * k, k, w, y + t * m, m); break;
    case 2: micro<2, R>(x + t * k, k, w, y + t * m, m); break;
    case 1: micro<1, R>(x + t * k, k, w, y + t * m, m); break;
    default: break;
  }
}

template <typename W>
void gemm(const float* x, const W* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  // Tile of output rows per task: two rows per micro-kernel call; tasks of
  // 16 rows keep the weight tile in L1 while all token tiles pass over it.
  constexpr int64_t kRowsPerTask = 16;
  const int64_t tasks = (m + kRowsPerTask - 1) / kRowsPerTask;
  const bool parallel = threads > 1 && m * k * std::max<int64_t>(n, 1) > (1 << 15);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t r0 = task * kRowsPerTask;
    const int64_t r1 = std::min(m, r0 + kRowsPerTask);
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) rows_block<2>(x, w + r * k, y + r, n, m, k);
    if (r < r1) rows_block<1>(x, w + r * k, y + r, n, m, k);
  }
}

}  // namespace

void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  gemm(x, w, y, n, m, k, threads);
}

void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k,
               int threads) {
  gemm(x, w, y, n, m, k, threads);
}

}  // namespace pagedrt::cpu
