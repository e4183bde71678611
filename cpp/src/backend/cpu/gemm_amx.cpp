// The AMX GEMM for bf16 activations and bf16 weights (Intel AMX-BF16: Sapphire
// Rapids and later), built with -mamx-tile -mamx-bf16 -mavx512f (CMakeLists.txt)
// on x86-64 only; gemm.cpp calls it only when the processor has AMX and Linux
// granted this process the tile state (arch_prctl: has_amx() there).
//
//   y (n, m) fp32 = x (n, k) bf16 @ W (m, k)^T bf16, fp32 accumulation.
//
// TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 one into a 16 x 16
// fp32 tile: 8,192 multiply-adds an instruction, ~16x VDPBF16PS's rate. The
// weights are the A operand as they are stored: 16 rows of W, 32 of their k
// (64 bytes a row, the row stride k). The tokens are the B operand, which
// the instruction wants in pairs of k ("VNNI": row r holds k = 2r, 2r + 1 of
// each of 16 tokens), so x is repacked per call into blocks of 16 tokens
// (n x k bf16, cheap next to the weights), fewer tokens padded with zeros.
// C tiles are (16 weight rows x 16 tokens), written transposed into y.
//
// Within this kernel every n takes the same path, one token or 512, so with
// PAGEDRT_CPU_KERNEL=amx a token's result never depends on what else is in
// the step (docs/determinism.md): AMX sums each element in its own order, not
// VDPBF16PS's (its results differ from the avx512bf16 variant's in the last
// bits). Shapes it cannot take (k not a multiple of 32, m of 16) go to the
// avx512bf16 kernel, for every n alike.
//
// Where it runs: steps of 5 tokens or more with deterministic=False (the
// default for bf16 on a processor with AMX; gemm.hpp's
// gemm_bf16_bf16_any_order), and every step with PAGEDRT_CPU_KERNEL=amx.
// Not every step by default: on a 2-core Xeon VM with AMX (SmolLM2, bf16, 2
// threads, 2026-12-05) it took 32 prompts x 128 new tokens from 254-256 to
// 618-627 output tok/s, but batch-1 decode from 83-86 to 64-70 tok/s: a
// task's 32 weight rows are 32 streams of 64-byte lines a k step (and the
// next task's 32 prefetched), where the avx512bf16 kernel streams 6; staging
// the rows through L1 with AVX-512 loads, or 48 and 64 rows a task, did not
// help. Tried since (standalone, the same VM, 2026-12-05): weights packed at
// load as the B operand in pairs of k (16 rows a contiguous stream, 1 KB a k
// step) with the tokens as A, as stored, four row groups in flight: 9.2 ms
// over 255 MB of SmolLM2 shapes at one token against 4.5 for avx512bf16 (with
// a prefetch 4 steps ahead no better); and a VDPBF16PS kernel cannot stand in
// for AMX at small n with the same bits: a probe found TDPBF16PS's sums of
// more than one pair of k differ from VDPBF16PS's pair-by-pair order (either
// pair order) in most elements.
#if defined(__x86_64__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "backend/cpu/amx_tiles.hpp"
#include "backend/cpu/gemm.hpp"

namespace pagedrt::cpu::amx {
namespace {

constexpr int kRows = 16;     // a tile's rows: weight rows (A, C) or k pairs (B)
constexpr int kK = 32;        // bf16 of k a step (64 bytes a tile row)
constexpr int kRowTiles = 2;  // weight-row tiles a task: 32 rows of W
constexpr int kTokTiles = 2;  // token tiles at once: 32 tokens

// Tiles 0-3: C (row tile i x token tile j at 2 i + j), 4-5: A, 6-7: B.
void configure() { configure_tiles(8); }

// x (n, k) into blocks of 16 tokens: block b, pair r, token j -> the two bf16
// x[16 b + j][2 r .. 2 r + 1] at uint32 (b * k / 2 + r) * 16 + j; zeros past n.
void pack_tokens(const uint16_t* x, int64_t n, int64_t k, uint32_t* out) {
  const int64_t pairs = k / 2, blocks = (n + kRows - 1) / kRows;
  std::memset(out, 0, static_cast<size_t>(blocks * pairs * kRows) * 4);
  for (int64_t t = 0; t < n; ++t) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(x + t * k);
    uint32_t* dst = out + (t / kRows) * pairs * kRows + (t % kRows);
    for (int64_t r = 0; r < pairs; ++r) dst[r * kRows] = row[r];
  }
}

// One C tile (16 weight rows x 16 tokens) into y (n, m): the tokens < n.
void store(int tile, float* scratch, float* y, int64_t t0, int64_t n, int64_t r0, int64_t m) {
  switch (tile) {  // the tile number must be a constant
    case 0: _tile_stored(0, scratch, 64); break;
    case 1: _tile_stored(1, scratch, 64); break;
    case 2: _tile_stored(2, scratch, 64); break;
    default: _tile_stored(3, scratch, 64); break;
  }
  const int64_t tokens = n - t0 < kRows ? n - t0 : kRows;
  for (int64_t j = 0; j < tokens; ++j)
    for (int i = 0; i < kRows; ++i) y[(t0 + j) * m + r0 + i] = scratch[i * kRows + j];
}

// 32 rows of W (from w) against every token: pairs of token tiles at a time.
void rows_task(const uint32_t* xp, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int64_t r0,
               float* scratch) {
  const int64_t pairs = k / 2, blocks = (n + kRows - 1) / kRows;
  const int64_t stride_w = k * 2, block = pairs * kRows;  // bytes a W row; uint32 a token block
  const uint16_t* w0 = w + r0 * k;
  const uint16_t* w1 = w0 + kRows * k;
  const int64_t r_next = r0 + kRowTiles * kRows;
  const uint16_t* next = r_next + kRowTiles * kRows <= m ? w + r_next * k : nullptr;
  for (int64_t b = 0; b < blocks; b += kTokTiles) {
    const bool two = b + 1 < blocks;
    const uint32_t* x0 = xp + b * block;
    const uint32_t* x1 = two ? x0 + block : x0;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k0 = 0; k0 < k; k0 += kK) {
      if (b == 0 && next != nullptr)  // the next task's rows, a task ahead (as the avx512bf16 kernel does)
        for (int i = 0; i < kRowTiles * kRows; ++i) {
          const char* line = reinterpret_cast<const char*>(next + i * k + k0);
          if (g_prefetch == PrefetchTo::L2)
            _mm_prefetch(line, _MM_HINT_T1);
          else
            _mm_prefetch(line, _MM_HINT_T0);
        }
      _tile_loadd(4, w0 + k0, stride_w);
      _tile_loadd(5, w1 + k0, stride_w);
      _tile_loadd(6, x0 + (k0 / 2) * kRows, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (two) {
        _tile_loadd(7, x1 + (k0 / 2) * kRows, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    const int64_t t0 = b * kRows, t1 = t0 + kRows;
    store(0, scratch, y, t0, n, r0, m);
    store(2, scratch, y, t0, n, r0 + kRows, m);
    if (two) {
      store(1, scratch, y, t1, n, r0, m);
      store(3, scratch, y, t1, n, r0 + kRows, m);
    }
  }
}

// 16 rows of W (the last, where m is an odd multiple of 16).
void row_task(const uint32_t* xp, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int64_t r0,
              float* scratch) {
  const int64_t pairs = k / 2, blocks = (n + kRows - 1) / kRows;
  const uint16_t* w0 = w + r0 * k;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint32_t* x0 = xp + b * pairs * kRows;
    _tile_zero(0);
    for (int64_t k0 = 0; k0 < k; k0 += kK) {
      _tile_loadd(4, w0 + k0, k * 2);
      _tile_loadd(6, x0 + (k0 / 2) * kRows, 64);
      _tile_dpbf16ps(0, 4, 6);
    }
    store(0, scratch, y, b * kRows, n, r0, m);
  }
}

}  // namespace

bool takes(int64_t m, int64_t k) { return k > 0 && k % kK == 0 && m > 0 && m % kRows == 0; }

void gemm_bf16_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t m, int64_t k, int threads) {
  const int64_t blocks = (n + kRows - 1) / kRows;
  // The packed tokens, in the caller's scratch (floats: the same bytes).
  uint32_t* xp = reinterpret_cast<uint32_t*>(gemm_scratch(blocks * (k / 2) * kRows));
  pack_tokens(x, n, k, xp);
  const bool parallel = threads > 1 && m * k * (n > 1 ? n : 1) > (1 << 15);
  const int64_t tasks = (m + kRowTiles * kRows - 1) / (kRowTiles * kRows);
  pagedrt::parallel(parallel ? threads : 1, [&](const Region& reg) {
    configure();  // the tile configuration is the thread's
    alignas(64) float scratch[kRows * kRows];
    for (int64_t task = reg.begin(tasks); task < reg.end(tasks); ++task) {
      const int64_t r0 = task * kRowTiles * kRows;
      if (r0 + kRowTiles * kRows <= m)
        rows_task(xp, w, y, n, m, k, r0, scratch);
      else
        row_task(xp, w, y, n, m, k, r0, scratch);
    }
    _tile_release();  // tiles back to their initial state: a context switch then saves none of them
  });
}

}  // namespace pagedrt::cpu::amx
#endif
