// backend/cpu/gemm.hpp — y = x @ W^T with fp32 accumulation.
//
//   x: (n, k) fp32, or bf16 (uint16 bit patterns) for gemm_bf16_bf16; row stride k
//   W: (m, k) fp32 or bf16 (uint16 bit patterns), row stride k
//   y: (n, m) fp32, row stride m
//
// Kernel variants: "scalar" (any processor), "avx2" (AVX2 + FMA), "avx512"
// (AVX-512F), "avx512bf16" (AVX-512 BF16: VDPBF16PS for gemm_bf16_bf16,
// the avx512 kernels otherwise) and "amx" (AMX-BF16 tiles for gemm_bf16_bf16
// where the shape allows, avx512bf16 otherwise), the last four on x86-64.
// Variants without a bf16 dot product convert bf16 activations to fp32
// (exact) and use their fp32 kernel. The widest one the processor supports but amx is chosen once at
// start-up; the environment variable PAGEDRT_CPU_KERNEL=<variant> forces
// another (amx for every step: 2.4x the batched throughput, 0.8x batch-1
// decode where it was measured; gemm_amx.cpp). Without it, amx runs the
// larger steps of deterministic=False (gemm_bf16_bf16_any_order).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/cpu/prefetch_tuner.hpp"
#include "backend/team.hpp"

namespace pagedrt::cpu {

void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
void gemm_bf16_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);

// deterministic=False's bf16 GEMM: steps of more than kAmxMinTokens - 1
// tokens on AMX tiles where the chosen variant is avx512bf16, the processor
// has AMX and amx::takes the shape; gemm_bf16_bf16 otherwise. A row's bits
// then depend on the step's size (AMX sums in another order than
// VDPBF16PS), which is why the deterministic default does not take it
// (docs/determinism.md). Measured on a 2-core Xeon VM with AMX, SmolLM2's
// shapes: 5 tokens 0.88x avx512bf16's time, 8 tokens 0.57x, 32 tokens 0.22x;
// 4 tokens 1.15x, 1 token 1.37x (gemm_amx.cpp).
// Packed weights: a linear's bf16 W rearranged once at load so that each
// task of the avx512bf16 kernel reads its rows front to back (one stream)
// instead of 6 rows k apart. The same bits. Taken where packs_bf16_rows(k):
// that variant chosen, no amx for larger steps (it reads W as stored),
// k % 32 == 0, and PAGEDRT_CPU_PACK not 0 (read at each call: at load).
bool packs_bf16_rows(int64_t k);
void pack_bf16_rows(const uint16_t* w, int64_t m, int64_t k, uint16_t* out);  // out: m * k elements, may be w
// The packed order: the weight's rows in tasks of kPackRows (the last one
// m % kPackRows), each task's rows side by side kPackLanes elements at a
// time. Element (r, i) of a packed (m, k) weight is w[packed_bf16_at(m, k, r, i)],
// and the kPackLanes elements from i (i % kPackLanes == 0) lie side by side.
constexpr int64_t kPackRows = 6, kPackLanes = 32;
inline int64_t packed_bf16_at(int64_t m, int64_t k, int64_t r, int64_t i) {
  const int64_t r0 = r - r % kPackRows, rows = m - r0 < kPackRows ? m - r0 : kPackRows;
  return r0 * k + (i - i % kPackLanes) * rows + (r - r0) * kPackLanes + i % kPackLanes;
}
void gemm_bf16_bf16_packed(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k,
                           int threads);

constexpr int64_t kAmxMinTokens = 5;
void gemm_bf16_bf16_any_order(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k,
                              int threads);
// Whether gemm_bf16_bf16_any_order takes AMX tiles for some steps here.
bool gemm_amx_for_large_steps();

// W (m, k) fp8 e4m3 codes with a scale per row (Tensor::row_scale): y[t][r]
// = scale[r] * dot(x[t], e4m3(W[r])). x is fp32 (xf) or bf16 (xb; the other
// null). Decode steps (n <= 4) with bf16 activations on avx512bf16 widen the
// codes in registers (avx512bf16::gemm_bf16_f8); otherwise the rows go in tasks of
// kFp8Rows, each dequantized into the thread's buffer as bf16 (exact: every
// e4m3 value is a bf16) and multiplied there by the variant's bf16 kernel on
// one thread, then scaled. any_order (deterministic=False): steps of
// kAmxMinTokens or more with bf16 activations multiply each task's rows on
// AMX tiles where gemm_amx_for_large_steps() (as gemm_bf16_bf16_any_order).
constexpr int64_t kFp8Rows = 48;
void gemm_f8(const float* xf, const uint16_t* xb, const uint8_t* w, const float* scale, float* y, int64_t n,
             int64_t m, int64_t k, int threads, bool any_order = false);

// The variant gemm_* use, and every variant this build and processor can run.
const std::string& gemm_variant();
// Whether that variant multiplies bf16 activations natively (avx512bf16, amx):
// the CPU backend then keeps activations in bf16 for bf16 weights.
bool gemm_bf16_native();
std::vector<std::string> gemm_variants();

// Where the decode kernels (one to four tokens) ask for the next task's
// weight rows while the current ones stream: into L2 or into L1. Which is
// faster depends on the machine (a 2-core Zen 5 VM: 18 GB/s with L1, 33 with
// L2, over 269 MB of SmolLM2 shapes; the kernels were tuned where L1 won), so
// calibrate_prefetch() times both once per process over 64 MiB of weights
// (~30 ms) and keeps the faster; PAGEDRT_CPU_PREFETCH=l1|l2 sets it instead.
// On a VM the faster one changes with the minute: after calibrating, the
// decode calls themselves are timed and the other hint tried now and then
// (PrefetchTuner: one window of 256 calls in 33, taken where 5% faster);
// PAGEDRT_CPU_PREFETCH_RETUNE=0 keeps the calibrated hint, =1 re-tunes from
// a PAGEDRT_CPU_PREFETCH one too.
void calibrate_prefetch(int threads);  // once per process; later calls return at once
std::string gemm_prefetch_name();      // "l2", "l1", with how it was chosen (and re-tuned)
// Internal: the hint the kernels read (set by calibrate_prefetch and the
// tuner; L1 until then).
extern std::atomic<PrefetchTo> g_prefetch;

// Operand types of one GEMM call, named x type x W type.
enum class GemmOperands {
  F32xF32,    // gemm_f32
  F32xBf16,   // gemm_bf16
  Bf16xBf16,  // gemm_bf16_bf16
};

// One call through a named variant (for tests; "any_order" with bf16 x bf16:
// gemm_bf16_bf16_any_order); x and w point at the types `operands` names.
// Throws Error(InvalidArgument) for a variant that is not available.
void gemm_with(const std::string& variant, GemmOperands operands, const void* x, const void* w, float* y,
               int64_t n, int64_t m, int64_t k, int threads);

// Internal: the CPU GEMMs' work split. Steps of many tokens go in panels of
// tokens whose x rows (x_row_bytes each) fit in 256 KiB of L2, a multiple of
// `tile` tokens: each thread runs its share of the tasks (static: the same
// share for every panel, so no barrier between panels) over one panel, then
// the next, so that every task reads the panel's x from L2 rather than L3 (at
// 2,048 tokens SmolLM2's x is 2.4 MB, more than a Zen 4 core's 1 MB of L2);
// the weights are read once a panel. task(t0, np, i): task i over tokens
// [t0, t0 + np). A row's sums do not depend on its panel: the same bits.
// (A template in the per-ISA files' own flags; no library code.)
constexpr int64_t kPanelBytes = 256 << 10;

// Internal: whether one panel's tasks are balanced at the tail
// (balanced_tasks; PAGEDRT_CPU_BALANCE=0: the static split alone).
extern const bool g_balance_tasks;

// Internal: tasks [0, tasks) over a team of `threads`, each task run once.
// Rank s takes the tasks of its own contiguous share (the static split's)
// front to back, a few a claim, then claims what is left of the next shares
// (s + 1, s + 2, ... wrapping). A thread that the machine holds up (a VM's
// vCPU, another process) no longer holds up the whole team at the region's
// end: with the static split 9-12% of a decode token's samples were threads
// waiting for the other in libgomp on a 2-core VM (no gain there); on the
// 16-core Xeon of a GPU host, on the own team, 1.18x batch-1 decode
// (docs/benchmarks.md, session 42). Who runs a task does not change its
// sums: the same bits.
template <typename Task>
inline void balanced_tasks(int64_t tasks, int threads, const Task& task) {
  struct alignas(64) Share {
    int64_t next, end;
  };
  constexpr int kMaxShares = 256;
  const int shares = threads < kMaxShares ? threads : kMaxShares;
  Share share[kMaxShares];
  for (int s = 0; s < shares; ++s) share[s] = {tasks * s / shares, tasks * (s + 1) / shares};
  const int64_t per = tasks / shares, claim = per >= 16 ? per / 8 : per >= 4 ? 2 : 1;  // tasks a claim
  parallel(shares, [&](const Region& r) {
    for (int j = 0; j < shares; ++j) {  // every share, so a region of fewer ranks (nested: one) runs them all
      Share& sh = share[(r.rank + j) % shares];
      if (j > 0 && __atomic_load_n(&sh.next, __ATOMIC_RELAXED) >= sh.end) continue;  // a read before a claim
      for (;;) {
        const int64_t i = __atomic_fetch_add(&sh.next, claim, __ATOMIC_RELAXED);
        if (i >= sh.end) break;
        const int64_t e = i + claim < sh.end ? i + claim : sh.end;
        for (int64_t t = i; t < e; ++t) task(t);
      }
    }
  });
}

template <typename Task>
inline void panel_tasks(int64_t n, int64_t x_row_bytes, int64_t tile, int64_t tasks, int threads, bool parallel,
                        const Task& task) {
  const int64_t fit = kPanelBytes / x_row_bytes / tile * tile, panel = fit > tile ? fit : tile;  // tokens a panel
  if (parallel && n <= panel && g_balance_tasks) {  // one panel (decode steps among them)
    balanced_tasks(tasks, threads, [&](int64_t i) { task(0, n, i); });
    return;
  }
  pagedrt::parallel(parallel ? threads : 1, [&](const Region& r) {
    const int64_t i0 = r.begin(tasks), i1 = r.end(tasks);  // the same share for every panel: no barrier
    for (int64_t t0 = 0; t0 < n; t0 += panel) {
      const int64_t np = n - t0 < panel ? n - t0 : panel;
      for (int64_t i = i0; i < i1; ++i) task(t0, np, i);
    }
  });
}

// Internal: a buffer of at least `count` floats owned by the calling thread,
// valid until its next call; the converting variants put fp32 copies of bf16
// activations there. (Defined in gemm.cpp: library code such as std::vector
// must not be compiled in the per-ISA files, whose flags it would carry.)
float* gemm_scratch(int64_t count);

// The three entry points, declared once per ISA namespace (gemm_kernel.inc defines them).
#define PAGEDRT_GEMM_DECLARE(ns)                                                                               \
  namespace ns {                                                                                               \
  void gemm_f32(const float* x, const float* w, float* y, int64_t n, int64_t m, int64_t k, int threads);       \
  void gemm_bf16(const float* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);   \
  void gemm_bf16_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k,         \
                      int threads);                                                                            \
  }
PAGEDRT_GEMM_DECLARE(scalar)
PAGEDRT_GEMM_DECLARE(avx2)
PAGEDRT_GEMM_DECLARE(avx512)
#undef PAGEDRT_GEMM_DECLARE

// avx512bf16 has only its own gemm_bf16_bf16; its fp32-activation calls are avx512's.
namespace avx512bf16 {
void gemm_bf16_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
// W (m, k) rearranged for gemm_bf16_bf16_packed (k % 32 == 0): each task's rows
// k chunk by k chunk, so a task reads its weights front to back; out may be w.
void pack_rows(const uint16_t* w, int64_t m, int64_t k, uint16_t* out);
void gemm_bf16_bf16_packed(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k,
                           int threads);
// count e4m3 codes as bf16 values, exactly (gemm_f8's buffer; count % 32 == 0 or not)
void widen_f8(const uint8_t* w, int64_t count, uint16_t* out);
// gemm_f8's bf16-activation case, the codes widened in registers (no buffer)
void gemm_bf16_f8(const uint16_t* x, const uint8_t* w, const float* scale, float* y, int64_t n, int64_t m, int64_t k,
                  int threads);
}

// amx (gemm_amx.cpp) has only its gemm_bf16_bf16, for the shapes takes() accepts.
namespace amx {
bool takes(int64_t m, int64_t k);  // k % 32 == 0 and m % 16 == 0
void gemm_bf16_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads);
}

}  // namespace pagedrt::cpu
