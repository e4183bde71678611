// tools/gemv_layout_probe.cpp — how fast one core streams a bf16 weight matrix through a batch-1
// GEMV (VDPBF16PS, y = W x) in each of four access patterns, against a plain fp32 sum of the same
// bytes (issue 20: pagedrt's decode reads its weights slower than the machine's read probe):
//   sum        the bytes as fp32, 4 accumulators: one sequential stream (the probe's kind)
//   rows6_t1   the engine's avx512bf16 pattern: 6 rows of W at a time (6 streams k apart), the
//              next 6 rows' lines asked into L2 one task ahead (_MM_HINT_T1)
//   rows6      the same without the software prefetch
//   row1       one row at a time, 3 accumulators along k: one stream, a reduction a row
//   packed6    W stored in groups of 6 rows with their 32-element k chunks interleaved
//              ([r0 c0..31][r1 c0..31]...[r5 c0..31][r0 c32..63]...): 6 accumulators and one
//              sequential stream, no software prefetch
//   packed6_t1 the same, the next task's lines asked into L2 (the engine's packed kernel)
// W is 270 MiB (past the L3), k as given; medians of 7 passes, GB/s of W.
//
//   g++ -O3 -march=native tools/gemv_layout_probe.cpp -o /tmp/gemv_layout_probe
//   /tmp/gemv_layout_probe [K]          (K = 576: SmolLM2's hidden; 1536 its MLP's)
//   run two at once to see two cores
//
// The 2-core AMD VM of session 48 (Zen 4), GB/s at k = 576 / 1536: sum 26.5-28.9 / 28.5-30.8,
// rows6_t1 20.9-22.4 / 24.2-25.5, rows6 12.3-12.8 / 17.3-18.0, row1 23.4-23.5 / 27.9-28.9,
// packed6 27.7-28.6 / 29.5-30.1. Two processes at once, k = 576: once packed6 28.6 + 27.9,
// rows6_t1 21.8 + 19.3, sum 26.4 + 26.4; minutes later every pattern 15-18 each (the VM's
// bandwidth then capped near the engine's own ~36 GB/s). Later, the VM slower (sum 23.4-23.8),
// k = 576: rows6_t1 21.4-21.6, packed6 22.0-22.3, packed6_t1 20.5-20.9 (so on one core the
// packed kernel's L2 prefetch cost ~7% there; the engine keeps it: see gemm_avx512bf16.cpp).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

// GCC's AVX-512 intrinsics warn about their own `__Y = __Y` placeholders once inlined (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

constexpr int kR = 6;

// kR rows of W a task, as stored (m, k) row-major or Packed (a task's rows k
// chunk by k chunk, the rows' 32 elements of a chunk side by side, as the
// engine's avx512bf16 kernel reads packed weights); Prefetch: the next task's
// lines at this one's place into L2.
template <bool Packed, bool Prefetch>
__attribute__((noinline)) void rows6(const uint16_t* w, const uint16_t* x, float* y, int64_t m, int64_t k) {
  for (int64_t r0 = 0; r0 + kR <= m; r0 += kR) {
    const uint16_t* wr = w + r0 * k;
    __m512 acc[kR];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
#pragma GCC unroll 8
      for (int r = 0; r < kR; ++r) {
        const uint16_t* at = Packed ? wr + i * kR + r * 32 : wr + r * k + i;
        if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(at + kR * k), _MM_HINT_T1);
        acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512(at));
      }
    }
    for (int r = 0; r < kR; ++r) y[r0 + r] = _mm512_reduce_add_ps(acc[r]);
  }
}

// W (m, k) row-major, a row at a time, 3 accumulators along k.
__attribute__((noinline)) void row1(const uint16_t* w, const uint16_t* x, float* y, int64_t m, int64_t k) {
  for (int64_t r = 0; r < m; ++r) {
    const uint16_t* wr = w + r * k;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0;
    int64_t i = 0;
    for (; i + 96 <= k; i += 96) {
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + i), (__m512bh)_mm512_loadu_si512(wr + i));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + i + 32), (__m512bh)_mm512_loadu_si512(wr + i + 32));
      a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(x + i + 64), (__m512bh)_mm512_loadu_si512(wr + i + 64));
    }
    for (; i < k; i += 32)
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + i), (__m512bh)_mm512_loadu_si512(wr + i));
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, _mm512_add_ps(a1, a2)));
  }
}

__attribute__((noinline)) float sum(const float* a, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t i = 0; i < n; i += 64) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(a + i));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(a + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_loadu_ps(a + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_loadu_ps(a + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t k = argc > 1 ? std::atoll(argv[1]) : 576;
  if (k < 96 || k % 96 != 0) {
    std::fprintf(stderr, "K must be a multiple of 96 (3 chunks of 32), not %lld\n", static_cast<long long>(k));
    return 2;
  }
  const int64_t m = (int64_t(270) << 20) / (k * 2) / 48 * 48;  // ~270 MiB of W, whole tasks
  std::vector<uint16_t> w(m * k), x(k, 0x3f80);                 // bf16 values near 1
  for (int64_t i = 0; i < m * k; ++i) w[i] = static_cast<uint16_t>(0x3f80 + (i & 7));
  std::vector<float> y(m);
  const double bytes = double(m) * k * 2;
  auto run = [&](const char* name, auto pass) {
    std::vector<double> s;
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      pass();
      s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(s.begin(), s.end());
    std::printf("%-10s %6.1f GB/s (best %.1f)\n", name, bytes / s[3] / 1e9, bytes / s[0] / 1e9);
  };
  std::printf("k = %lld, W %lld x %lld bf16 (%.0f MB)\n", static_cast<long long>(k), static_cast<long long>(m),
              static_cast<long long>(k), bytes / 1e6);
  const auto* as_f32 = reinterpret_cast<const float*>(w.data());
  run("sum", [&] { volatile float s = sum(as_f32, m * k / 2); (void)s; });
  run("rows6_t1", [&] { rows6<false, true>(w.data(), x.data(), y.data(), m, k); });
  run("rows6", [&] { rows6<false, false>(w.data(), x.data(), y.data(), m, k); });
  run("row1", [&] { row1(w.data(), x.data(), y.data(), m, k); });
  run("packed6", [&] { rows6<true, false>(w.data(), x.data(), y.data(), m, k); });
  run("packed6_t1", [&] { rows6<true, true>(w.data(), x.data(), y.data(), m, k); });
  run("sum", [&] { volatile float s = sum(as_f32, m * k / 2); (void)s; });
}
