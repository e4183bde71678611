#include "backend/cpu/gemm.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "backend/cpu/kv_fp8.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt::cpu {
namespace {

using GemmF32 = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int);
using GemmBf16 = void (*)(const float*, const uint16_t*, float*, int64_t, int64_t, int64_t, int);
using GemmBf16Bf16 = void (*)(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t, int);

struct Variant {
  std::string name;
  GemmF32 f32;
  GemmBf16 bf16;
  GemmBf16Bf16 bf16_bf16;
};

// PAGEDRT_HAVE_AVX2_KERNELS: gemm_avx2.cpp and gemm_avx512.cpp were built
// (x86-64 with GCC or Clang); PAGEDRT_HAVE_AVX512BF16_KERNEL: gemm_avx512bf16.cpp
// too (the compiler knows -mavx512bf16).
bool has_avx2() {
#ifdef PAGEDRT_HAVE_AVX2_KERNELS
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool has_avx512bf16() {
#ifdef PAGEDRT_HAVE_AVX512BF16_KERNEL
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// AMX-BF16, and Linux lets this process use the tile state (asked for once:
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)).
bool has_amx() {
#ifdef PAGEDRT_HAVE_AMX_KERNEL
  static const bool ok = [] {
    if (!has_avx512bf16() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

#ifdef PAGEDRT_HAVE_AMX_KERNEL
void amx_bf16_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  if (amx::takes(m, k)) return amx::gemm_bf16_bf16(x, w, y, n, m, k, threads);
  avx512bf16::gemm_bf16_bf16(x, w, y, n, m, k, threads);  // the shape's own path, for every n
}
#endif

// Narrowest first.
std::vector<Variant> available() {
  std::vector<Variant> v = {{"scalar", scalar::gemm_f32, scalar::gemm_bf16, scalar::gemm_bf16_bf16}};
#ifdef PAGEDRT_HAVE_AVX2_KERNELS
  if (has_avx2()) v.push_back({"avx2", avx2::gemm_f32, avx2::gemm_bf16, avx2::gemm_bf16_bf16});
  if (__builtin_cpu_supports("avx512f"))
    v.push_back({"avx512", avx512::gemm_f32, avx512::gemm_bf16, avx512::gemm_bf16_bf16});
#endif
#ifdef PAGEDRT_HAVE_AVX512BF16_KERNEL
  if (has_avx512bf16())
    v.push_back({"avx512bf16", avx512::gemm_f32, avx512::gemm_bf16, avx512bf16::gemm_bf16_bf16});
#endif
#ifdef PAGEDRT_HAVE_AMX_KERNEL
  if (has_amx()) v.push_back({"amx", avx512::gemm_f32, avx512::gemm_bf16, amx_bf16_bf16});
#endif
  return v;
}

const Variant& chosen() {
  static const Variant v = [] {
    std::vector<Variant> all = available();
    const char* force = std::getenv("PAGEDRT_CPU_KERNEL");
    if (force != nullptr)
      for (const Variant& x : all)
        if (x.name == force) return x;
    // The widest, but amx only when asked for: its batch-1 decode streams the
    // weights at ~0.75x avx512bf16's rate (gemm_amx.cpp); it takes the larger
    // steps only where a token's bits may depend on the batch
    // (deterministic=False: gemm_bf16_bf16_any_order).
    return all.back().name == "amx" && all.size() > 1 ? all[all.size() - 2] : all.back();
  }();
  return v;
}

// The prefetch tuner (gemm.hpp), from calibrate_prefetch on unless the hint
// was fixed; g_tune_mu guards it (engines on several threads share it).
std::mutex g_tune_mu;
std::unique_ptr<PrefetchTuner> g_tuner;
std::atomic<bool> g_tuning{false};

// The steps the hint applies to: one token tile (4 tokens in the bf16-native
// kernels, 1 in gemm_kernel.inc's).
int64_t hint_tokens() {
  static const int64_t n = chosen().name == "avx512bf16" || chosen().name == "amx" ? 4 : 1;
  return n;
}

// Runs a GEMM `call` of n tokens over `bytes` of weights; a decode call is
// timed for the tuner, under the hint in force (the tuner's, set after each
// record; a call that began before a change is left out by record()).
template <typename F>
void decode_call(int64_t n, double bytes, F&& call) {
  if (n > hint_tokens() || !g_tuning.load(std::memory_order_acquire)) return call();
  const PrefetchTo ran = g_prefetch.load();
  const auto t0 = std::chrono::steady_clock::now();
  call();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::lock_guard<std::mutex> lk(g_tune_mu);
  g_tuner->record(ran, bytes, seconds);
  g_prefetch = g_tuner->hint();
}

double weight_bytes(int64_t m, int64_t k, int64_t element) {
  return static_cast<double>(m) * static_cast<double>(k) * static_cast<double>(element);
}

}  // namespace

void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  decode_call(n, weight_bytes(m, k, 4), [&] { chosen().f32(x, w, y, n, m, k, threads); });
}

void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  decode_call(n, weight_bytes(m, k, 2), [&] { chosen().bf16(x, w, y, n, m, k, threads); });
}

void gemm_bf16_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  decode_call(n, weight_bytes(m, k, 2), [&] { chosen().bf16_bf16(x, w, y, n, m, k, threads); });
}

bool gemm_amx_for_large_steps() {
  static const bool on = has_amx() && chosen().name == "avx512bf16";
  return on;
}

bool packs_bf16_rows(int64_t k) {
#ifdef PAGEDRT_HAVE_AVX512BF16_KERNEL
  static const bool kernel = chosen().name == "avx512bf16" && !gemm_amx_for_large_steps();
  const char* e = std::getenv("PAGEDRT_CPU_PACK");  // read at each load: a Runtime's weights follow it
  return kernel && !(e != nullptr && !std::strcmp(e, "0")) && k > 0 && k % 32 == 0;
#else
  (void)k;
  return false;
#endif
}

void pack_bf16_rows(const uint16_t* w, int64_t m, int64_t k, uint16_t* out) {
#ifdef PAGEDRT_HAVE_AVX512BF16_KERNEL
  if (packs_bf16_rows(k)) return avx512bf16::pack_rows(w, m, k, out);
#endif
  throw Error(ErrorKind::Runtime, "pack_bf16_rows: this build or processor packs no weights of k = " +
                                       std::to_string(k));
}

void gemm_bf16_bf16_packed(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k,
                           int threads) {
#ifdef PAGEDRT_HAVE_AVX512BF16_KERNEL
  decode_call(n, weight_bytes(m, k, 2), [&] { avx512bf16::gemm_bf16_bf16_packed(x, w, y, n, m, k, threads); });
#else
  (void)x, (void)w, (void)y, (void)n, (void)m, (void)k, (void)threads;
  throw Error(ErrorKind::Runtime, "gemm_bf16_bf16_packed: no avx512bf16 kernel in this build");
#endif
}

#ifdef PAGEDRT_HAVE_AMX_KERNEL
namespace {
// Whether deterministic=False's GEMMs take a step of n tokens to AMX tiles.
bool amx_step(int64_t n) { return n >= kAmxMinTokens && gemm_amx_for_large_steps(); }
}  // namespace
#endif

void gemm_bf16_bf16_any_order(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k,
                              int threads) {
#ifdef PAGEDRT_HAVE_AMX_KERNEL
  if (amx_step(n) && amx::takes(m, k))
    return amx::gemm_bf16_bf16(x, w, y, n, m, k, threads);
#endif
  gemm_bf16_bf16(x, w, y, n, m, k, threads);
}

void gemm_f8(const float* xf, const uint16_t* xb, const uint8_t* w, const float* scale, float* y, int64_t n,
             int64_t m, int64_t k, int threads, bool any_order) {
  const Variant& v = chosen();
#ifdef PAGEDRT_HAVE_AMX_KERNEL
  const bool tiles = any_order && xb != nullptr && amx_step(n);
#endif
#ifdef PAGEDRT_HAVE_AVX512BF16_KERNEL
  // Decode (one token tile): codes widened in registers, each weight once.
  // More tokens would widen every weight once per tile of 4: the buffer below
  // widens them once per call (SmolLM2, 2 threads: 32-row steps at half the
  // rate in registers).
  if (xb != nullptr && n <= 4 && v.name == "avx512bf16")
    return decode_call(n, weight_bytes(m, k, 1), [&] { avx512bf16::gemm_bf16_f8(xb, w, scale, y, n, m, k, threads); });
#endif
  const int64_t tasks = (m + kFp8Rows - 1) / kFp8Rows;
  const bool parallel = threads > 1 && tasks > 1;
  parallel_for(tasks, parallel ? threads : 1, [&](int64_t task) {
    static thread_local std::vector<uint16_t> buf;  // (rows, k) bf16
    static thread_local std::vector<float> part;    // (n, rows)
    const int64_t r0 = task * kFp8Rows, rows = std::min(kFp8Rows, m - r0);
    if (buf.size() < static_cast<size_t>(kFp8Rows * k)) buf.resize(static_cast<size_t>(kFp8Rows * k));
    if (part.size() < static_cast<size_t>(n * kFp8Rows)) part.resize(static_cast<size_t>(n * kFp8Rows));
#ifdef PAGEDRT_HAVE_AVX512BF16_KERNEL
    // the same widening as dequantize_kv_row's (e4m3_avx512.hpp), here also in
    // portable builds, where only the avx512bf16 kernel's file is built for AVX-512
    if (v.name == "avx512bf16")  // the rows are contiguous: widened as one run
      avx512bf16::widen_f8(w + r0 * k, rows * k, buf.data());
    else
#endif
      for (int64_t r = 0; r < rows; ++r) dequantize_kv_row(w + (r0 + r) * k, 0, k, buf.data() + r * k);
#ifdef PAGEDRT_HAVE_AMX_KERNEL
    if (tiles && amx::takes(rows, k))
      amx::gemm_bf16_bf16(xb, buf.data(), part.data(), n, rows, k, 1);
    else
#endif
    if (xb != nullptr)
      v.bf16_bf16(xb, buf.data(), part.data(), n, rows, k, 1);
    else
      v.bf16(xf, buf.data(), part.data(), n, rows, k, 1);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = 0; r < rows; ++r) y[t * m + r0 + r] = part[t * rows + r] * scale[r0 + r];
  });
}

const std::string& gemm_variant() { return chosen().name; }

bool gemm_bf16_native() { return chosen().name == "avx512bf16" || chosen().name == "amx"; }

std::vector<std::string> gemm_variants() {
  std::vector<std::string> names;
  for (const Variant& v : available()) names.push_back(v.name);
  return names;
}

void gemm_with(const std::string& variant, GemmOperands operands, const void* x, const void* w, float* y,
               int64_t n, int64_t m, int64_t k, int threads) {
  if (variant == "any_order" && operands == GemmOperands::Bf16xBf16)
    return gemm_bf16_bf16_any_order(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w), y, n, m, k,
                                    threads);
  for (const Variant& v : available())
    if (v.name == variant) {
      switch (operands) {
        case GemmOperands::F32xF32:
          v.f32(static_cast<const float*>(x), static_cast<const float*>(w), y, n, m, k, threads);
          break;
        case GemmOperands::F32xBf16:
          v.bf16(static_cast<const float*>(x), static_cast<const uint16_t*>(w), y, n, m, k, threads);
          break;
        case GemmOperands::Bf16xBf16:
          v.bf16_bf16(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w), y, n, m, k, threads);
          break;
      }
      return;
    }
  throw Error(ErrorKind::InvalidArgument, "GEMM variant '" + variant + "' is not available here");
}

std::atomic<PrefetchTo> g_prefetch{PrefetchTo::L1};

const bool g_balance_tasks = [] {
  const char* e = std::getenv("PAGEDRT_CPU_BALANCE");
  return e == nullptr || std::strcmp(e, "0") != 0;
}();

namespace {
std::string g_prefetch_how = "l1 (not calibrated)";
// The tuner's windows: 256 decode calls (about two SmolLM2 tokens), one in
// 33 on the other hint (~3% of decode calls; a wrong one costs up to a third
// of their speed), taken where 5% faster than the window before it.
constexpr int64_t kTuneWindow = 256, kTuneExplore = 32;
constexpr double kTuneMargin = 0.05;
std::once_flag g_calibrated;

void start_tuning() {
  std::lock_guard<std::mutex> lk(g_tune_mu);
  g_tuner = std::make_unique<PrefetchTuner>(g_prefetch.load(), kTuneWindow, kTuneExplore, kTuneMargin);
  g_tuning.store(true, std::memory_order_release);
}

void calibrate(int threads) {
  if (const char* e = std::getenv("PAGEDRT_CPU_PREFETCH"); e != nullptr && (!std::strcmp(e, "l1") || !std::strcmp(e, "l2"))) {
    g_prefetch = !std::strcmp(e, "l2") ? PrefetchTo::L2 : PrefetchTo::L1;
    g_prefetch_how = std::string(e) + " (PAGEDRT_CPU_PREFETCH)";
    if (const char* r = std::getenv("PAGEDRT_CPU_PREFETCH_RETUNE"); r != nullptr && !std::strcmp(r, "1"))
      start_tuning();  // from the hint given (benchmarks: a wrong start, re-tuned)
    return;
  }
  const Variant& v = chosen();
  if (v.name == "scalar") {
    g_prefetch_how = "none (scalar kernel)";
    return;
  }
  // One decode token against 64 MiB of bf16 rows (more than most last-level
  // caches), each hint three times, alternating; the faster minimum wins.
  // Through the packed kernel where the weights will be packed (the same
  // values in any order: every element is 1.0).
  constexpr int64_t k = 1024, m = (int64_t(64) << 20) / (2 * k);
  std::vector<uint16_t> w(static_cast<size_t>(m * k), 0x3f80), xb(k, 0x3f80);  // bf16 1.0
  std::vector<float> xf(k, 1.0f), y(static_cast<size_t>(m));
  const bool packed = packs_bf16_rows(k);
  auto pass = [&](PrefetchTo p) {
    g_prefetch = p;
    const auto t0 = std::chrono::steady_clock::now();
    if (packed)
      gemm_bf16_bf16_packed(xb.data(), w.data(), y.data(), 1, m, k, threads);
    else if (v.name == "avx512bf16")
      v.bf16_bf16(xb.data(), w.data(), y.data(), 1, m, k, threads);
    else
      v.bf16(xf.data(), w.data(), y.data(), 1, m, k, threads);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  pass(PrefetchTo::L1);  // the first touch of the pages and the threads' start, untimed
  double l1 = std::numeric_limits<double>::infinity(), l2 = l1;
  for (int r = 0; r < 3; ++r) {
    l2 = std::min(l2, pass(PrefetchTo::L2));
    l1 = std::min(l1, pass(PrefetchTo::L1));
  }
  g_prefetch = l2 < l1 ? PrefetchTo::L2 : PrefetchTo::L1;
  char how[112];
  const double bytes = 2.0 * static_cast<double>(m * k) / 1e9;
  std::snprintf(how, sizeof how, "%s (calibrated: l2 %.1f GB/s, l1 %.1f GB/s, %d threads%s)",
                l2 < l1 ? "l2" : "l1", bytes / l2, bytes / l1, threads, packed ? ", packed rows" : "");
  g_prefetch_how = how;
  const char* retune = std::getenv("PAGEDRT_CPU_PREFETCH_RETUNE");
  if (retune == nullptr || std::strcmp(retune, "0") != 0) start_tuning();
}
}  // namespace

std::string gemm_prefetch_name() {
  std::lock_guard<std::mutex> lk(g_tune_mu);
  if (!g_tuner) return g_prefetch_how;
  const PrefetchTuner& t = *g_tuner;
  return g_prefetch_how + "; re-tuned " + std::to_string(t.switches()) + " times in " + std::to_string(t.windows()) +
         " windows, now " + (t.best() == PrefetchTo::L2 ? "l2" : "l1");
}

void calibrate_prefetch(int threads) {
  // On a thread of its own: the OpenMP team its kernel calls start goes with
  // it, rather than staying with the caller's thread beside the engine's.
  std::call_once(g_calibrated, [threads] { std::thread([threads] { calibrate(threads); }).join(); });
}

float* gemm_scratch(int64_t count) {
  // Grows to the largest call on this thread and stays: no allocation per call.
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(static_cast<size_t>(count));
  return buffer.data();
}

}  // namespace pagedrt::cpu
