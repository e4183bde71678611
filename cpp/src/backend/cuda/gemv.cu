// backend/cuda/gemv.cu — the small-M GEMM (n <= 8 rows of x) of gemv.hpp.
//
// Work split. W is cut into tiles of 16 rows; a warp streams one tile over a
// slice of k, and the `ks` warps of one tile (a power of two, chosen per shape
// so that the grid has enough warps in flight) split k between them and add
// their partial sums in shared memory. A block is 8 warps = 8 / ks tiles; the
// grid is ceil(tiles * ks / 8) blocks.
//
//   W (m, k):  tile 0 (16 rows) | chunk 0: split 0 | chunk 1: split 1 | ... | chunk ks: split 0 | ...
//              tile 1           | ...
//   chunk = kSteps steps of 32 k (kSteps = 4 for k >= 2048, else 2); a tile's
//   splits take its chunks round robin, so they stream its rows side by side.
//   The < 1 chunk left over (k % (32 kSteps)) goes step by step, bounds-checked.
//
// One step of one warp: lane = 4 g + t (g = lane / 4, t = lane % 4) loads the
// 16 bytes at k0 + 8t .. k0 + 8t + 7 of W rows g and g + 8 of the tile and of
// x row min(g, n - 1): 16 rows x 64 contiguous bytes of W per load
// instruction. Those are exactly the A (W) and B (x) fragments of two
// mma.m16n8k16 once k is permuted inside the step, the same way for A and B
// (a dot product does not care about the order of its terms):
//
//   first mma:  A {a0, a1, a2, a3} = {W[g].x, W[g+8].x, W[g].y, W[g+8].y},  B {b0, b1} = {x[g].x, x[g].y}
//   second mma: the same with .z, .w
//   C (fp32): c0, c1 = row g, tokens 2t, 2t+1; c2, c3 = row g + 8.
//   Columns g >= n of B repeat row n - 1; their results are not stored.
//
// Loads in flight: the loop keeps the next chunk's loads in flight while the
// current chunk multiplies (without that, ptxas interleaves each step's loads
// with its mma and only one step is in flight): per lane up to 2 chunks x
// kSteps x 3 16-byte loads, i.e. up to 8 KB of W per warp (kSteps = 4).
// W is read with ld.global.nc.L1::no_allocate.L2::256B: read once, leave L1
// to x, and have L2 fetch whole 256-byte blocks of the row (the warp reads the
// rest of them in the same chunk; +7 to +13 points of copy bandwidth on the
// large shapes, H200). x (at most 8 x k bf16, read by every block) goes
// through the read-only cache.
//
// Registers (ptxas, sm_90): 118-122 for kSteps = 4, 71-74 for kSteps = 2, no
// spills: 2 and 3 blocks (16 and 24 warps) per SM. The cost does not depend on n.
// Measured on H100s (1 GiB copy 2.96-2.98 TB/s), n = 1, back to back with
// programmatic dependent launch, % of copy (session 4): qkv 6144 x 4096
// 92-94 (kSteps 2; 87-89 before), o_proj 4096 x 4096 91-96, gate_up 28672 x
// 4096 100-103 (94-97 as one wave of 8-tile blocks), down 4096 x 14336
// 98-101, lm head 128256 x 4096 (fp32 out) 104-105; cuBLASLt 75, 67, 94, 87, 94.
// Without PDL the short ones lost ~3 us a call to launch and ramp-up.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "backend/cuda/block_reduce.cuh"
#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/fp8_rows.cuh"
#include "backend/cuda/gemv.hpp"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/fp8.hpp"

namespace pagedrt::cuda {
namespace {

constexpr int kWarps = 8;  // per block
constexpr int kThreads = kWarps * 32;

// volatile: never executed speculatively (the tail's loads are conditional).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// x's 16 bytes: through the read-only cache from global memory, or (kQuantX)
// from the codes the block wrote to shared memory.
template <bool kShared>
__device__ __forceinline__ uint4 x_vec(const uint4* p) {
  if constexpr (kShared)
    return *p;
  else
    return __ldg(p);
}

// kQuantX's prologue: the n rows of bf16 x (n, k) as e4m3 codes into q (n, k)
// and their scales into scale (n), in shared memory, exactly as
// act_rows_kernel (fp8_rows.cu) writes them (fp8_rows.cuh: the row's largest
// magnitude, e4m3_row_scale of it, codes of x / scale), so the product is
// bitwise the one after a quantizing kernel.
__device__ void quantize_x_rows(const __nv_bfloat16* __restrict__ x, int n, int k, uint8_t* q, float* scale) {
  const int vecs = k / 8;
  for (int r = 0; r < n; ++r) {
    const uint4* xr = reinterpret_cast<const uint4*>(x + int64_t(r) * k);
    const float s = e4m3_row_scale(block_max(row_amax_part(xr, vecs, kThreads)));
    if (threadIdx.x == 0) scale[r] = s;
    row_codes_part(xr, reinterpret_cast<uint2*>(q + int64_t(r) * k), vecs, kThreads, s);
  }
  __syncthreads();  // the codes and scales are every warp's
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// c (16 x 8, fp32) += A (16 x 32, e4m3, row-major) * B (32 x 8, e4m3, column-major), sm_89+.
// Fragments as m16n8k16's with 4 codes a register: a0 row g k 4t..4t+3, a1
// row g + 8, a2 and a3 the same at k + 16; b0 k 4t..4t+3 of column g, b1 k + 16.
__device__ __forceinline__ void mma_16832_e4m3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One step (32 k of bf16, 64 k of e4m3: 16 bytes a lane): acc[0] takes the
// .x/.y half, acc[1] the .z/.w half (two independent mma chains). wa, wb: W
// rows g and g + 8; xv: x row g.
// kOneChain (the batch-invariant order, invariant_gemm.hpp): both halves into
// acc[0], .x/.y first.
template <bool kF8, bool kOneChain = false>
__device__ __forceinline__ void mma_step(float (&acc)[2][4], const uint4& wa, const uint4& wb, const uint4& xv) {
  if constexpr (kOneChain) {
    static_assert(!kF8, "the batch-invariant order is bf16's");
    mma_bf16(acc[0], wa.x, wb.x, wa.y, wb.y, xv.x, xv.y);
    mma_bf16(acc[0], wa.z, wb.z, wa.w, wb.w, xv.z, xv.w);
  } else if constexpr (kF8) {
    mma_16832_e4m3(acc[0], wa.x, wb.x, wa.y, wb.y, xv.x, xv.y);
    mma_16832_e4m3(acc[1], wa.z, wb.z, wa.w, wb.w, xv.z, xv.w);
  } else {
    mma_bf16(acc[0], wa.x, wb.x, wa.y, wb.y, xv.x, xv.y);
    mma_bf16(acc[1], wa.z, wb.z, wa.w, wb.w, xv.z, xv.w);
  }
}

// x (n, k), w (m, k) bf16; y (n, m) OutT. ks = 1 << ks_log2 warps per tile.
// kF8: x and w are e4m3 codes (16 a load, 64 k a step) with a scale per row
// of each (xscale (n), wscale (m, or 2m gated)): y = acc * wscale[row] * xscale[tok].
// kQuantX (with kF8): x is bf16 and xscale unused; every block quantizes x
// into its shared memory first (quantize_x_rows: dynamic shared memory of
// n k codes, then n scales), one quantizing kernel fewer before the GEMV.
// kGated: w is [gate; up] (2m, k) and y (n, m) = silu(x gate^T) * (x up^T),
// each rounded to bf16 first as linear() would store them (so that the
// result is bitwise silu_mul's of linear's): a tile is gate rows r .. r + 7
// (the lanes' rows g) and up rows r .. r + 7 (their rows g + 8), so a lane
// holds both factors of its outputs (c0 with c2, c1 with c3).
// kOneChain: one accumulation chain a split instead of two (the order that
// invariant_gemm.cu's kernel for n > 8 repeats; bf16 only).
template <int kSteps, typename OutT, bool kGated, bool kF8, bool kQuantX = false, bool kOneChain = false>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const void* __restrict__ x, const void* __restrict__ w,
                                                        const float* __restrict__ xscale,
                                                        const float* __restrict__ wscale, OutT* __restrict__ y,
                                                        int n, int m, int k, int ks_log2) {
  static_assert(kF8 || !kQuantX, "x is quantized for fp8 weights only");
  __shared__ float partial[kWarps][4][32];  // (warp, accumulator, lane)
  extern __shared__ __align__(16) uint8_t x_codes[];  // kQuantX: (n, k) codes, then (n) scales

  constexpr int kTileRows = kGated ? 8 : 16;  // output rows of a tile
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int ks = 1 << ks_log2;
  const int split = warp & (ks - 1);
  const int row0 = (blockIdx.x * (kWarps >> ks_log2) + (warp >> ks_log2)) * kTileRows;
  constexpr int kPerVec = kF8 ? 16 : 8;  // k of a 16-byte vector
  constexpr int kStepK = 4 * kPerVec;     // k of a step (the 4 lanes t side by side)
  const int kv = k / kPerVec;             // 16-byte vectors per row

  // The lane's rows, clamped to the last row (a partial last tile loads rows
  // that it then does not store), and its x row (n <= 8; see above).
  const int64_t ra = min(row0 + g, m - 1), rb = kGated ? m + ra : min(row0 + g + 8, m - 1);
  const uint4* wa = reinterpret_cast<const uint4*>(w) + ra * kv + t;
  const uint4* wb = reinterpret_cast<const uint4*>(w) + rb * kv + t;
  const uint4* xr = reinterpret_cast<const uint4*>(kQuantX ? static_cast<const void*>(x_codes) : x) +
                    int64_t(min(g, n - 1)) * kv + t;
  const float* xs = kQuantX ? reinterpret_cast<const float*>(x_codes + int64_t(n) * k) : xscale;

  float acc[2][4] = {};
  const int chunks = k / (kStepK * kSteps);
  uint4 na[kSteps], nb[kSteps], nx[kSteps];  // the next chunk, in flight
  auto load_w = [&](int c) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      na[s] = load_stream(wa + (c * kSteps + s) * 4);
      nb[s] = load_stream(wb + (c * kSteps + s) * 4);
    }
  };
  auto load_x = [&](int c) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) nx[s] = x_vec<kQuantX>(xr + (c * kSteps + s) * 4);
  };
  // W does not depend on the kernel ahead (launch.cuh): the first two
  // chunks' loads overlap that kernel; x and y wait for it. (Asking L2 for more of W
  // up front, cp.async.bulk.prefetch, made batch-1 steps slower: 8, 16 and 32
  // MB per call cost 0.6%, 1.9% and 7.3% of TPOT on the H100.)
  // Two chunks go out before the wait: the first into (fa, fb), the second
  // into the loop's "next" registers, so the first iteration multiplies
  // without loading and the registers in use stay two chunks' worth.
  uint4 fa[kSteps], fb[kSteps];
  pdl_trigger();
  if (row0 < m && split < chunks) {
    load_w(split);
#pragma unroll
    for (int s = 0; s < kSteps; ++s) fa[s] = na[s], fb[s] = nb[s];
    if (split + ks < chunks) load_w(split + ks);
  }
  pdl_wait();
  if constexpr (kQuantX)
    quantize_x_rows(static_cast<const __nv_bfloat16*>(x), n, k, x_codes,
                    reinterpret_cast<float*>(x_codes + int64_t(n) * k));
  if (row0 < m && split < chunks) {
    load_x(split);
    uint4 fx[kSteps];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) fx[s] = nx[s];
    if (split + ks < chunks) load_x(split + ks);
#pragma unroll
    for (int s = 0; s < kSteps; ++s) mma_step<kF8, kOneChain>(acc, fa[s], fb[s], fx[s]);
    for (int c = split + ks; c < chunks; c += ks) {
      uint4 ca[kSteps], cb[kSteps], cx[kSteps];
#pragma unroll
      for (int s = 0; s < kSteps; ++s) ca[s] = na[s], cb[s] = nb[s], cx[s] = nx[s];
      if (c + ks < chunks) load_w(c + ks), load_x(c + ks);
#pragma unroll
      for (int s = 0; s < kSteps; ++s) mma_step<kF8, kOneChain>(acc, ca[s], cb[s], cx[s]);
    }
  }
  if (row0 < m) {
    // The steps after the last whole chunk; a lane's vector is all in or all out (k % kPerVec == 0).
    for (int s = chunks * kSteps + split; s * kStepK < k; s += ks) {
      uint4 va = make_uint4(0, 0, 0, 0), vb = va, vx = va;
      if (s * 4 + t < kv) {
        va = load_stream(wa + s * 4);
        vb = load_stream(wb + s * 4);
        vx = x_vec<kQuantX>(xr + s * 4);
      }
      mma_step<kF8, kOneChain>(acc, va, vb, vx);
    }
  }
  if constexpr (!kOneChain) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[0][j] += acc[1][j];
  }

  // Splits 1.. of each tile hand their sums to split 0 (fixed order: deterministic).
  if (ks > 1) {
    if (split != 0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) partial[warp][j][lane] = acc[0][j];
    }
    __syncthreads();
    if (split != 0) return;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      for (int p = 1; p < ks; ++p) acc[0][j] += partial[warp + p][j][lane];
  }
  if (row0 >= m) return;
  // The scales of row r (of w's 2m rows when gated) and token tok: 1 for bf16.
  auto scaled = [&](float v, int r, int tok) { return kF8 ? v * wscale[r] * xs[tok] : v; };
  if constexpr (kGated) {
    const int row = row0 + g;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int tok = 2 * t + j;
      if (row < m && tok < n) {
        const float gate = round_to<__nv_bfloat16>(scaled(acc[0][j], row, tok));
        const float up = round_to<__nv_bfloat16>(scaled(acc[0][j + 2], m + row, tok));
        store(y + int64_t(tok) * m + row, silu(gate) * up);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = row0 + 8 * (j / 2) + g, tok = 2 * t + j % 2;
      if (row < m && tok < n) store(y + int64_t(tok) * m + row, scaled(acc[0][j], row, tok));
    }
  }
}

// ks: warps per tile, a power of two up to kWarps.
// - Shapes with few tiles: more splits put more loads in flight (aim: 16 warps
//   per SM), as long as every split has a chunk and the grid fits the GPU at once.
// - Then any shape splits further while every split keeps at least 4 chunks:
//   blocks of one or two tiles are small units that the block scheduler
//   spreads evenly over the SMs. One wave of large blocks does not: 224 blocks
//   of 8 tiles on 132 SMs leave 40 SMs one block and 92 two, and the 8B
//   shape's gate/up GEMV (n = 1) ran at 2.82 TB/s against 3.00 TB/s as 1,792
//   blocks of one tile (H100; the whole chain of a token's GEMMs 4.93 ->
//   4.76-4.79 ms).
int choose_ks_log2(int64_t tiles, int64_t chunks, int sms, int blocks_per_sm) {
  const int64_t want_warps = int64_t(sms) * 16;
  const int64_t max_blocks = int64_t(sms) * blocks_per_sm;
  int lg = 0;
  while ((1 << lg) < kWarps && tiles * (1 << lg) < want_warps && (2 << lg) <= chunks &&
         (tiles * (2 << lg) + kWarps - 1) / kWarps <= max_blocks)
    ++lg;
  while ((1 << lg) < kWarps && (chunks >> (lg + 1)) >= 4) ++lg;
  return lg;
}

// lg: log2 of ks; blocks: the grid (Gemv::shape). xs, ws: fp8 scales (null:
// bf16). one_chain: the batch-invariant order (bf16 only).
template <int kSteps, bool kF8, bool kOneChain = false>
void launch_gemv(const void* x, const void* w, const float* xs, const float* ws, void* y, int64_t n, int64_t m,
                 int64_t k, bool out_f32, bool gated, int lg, int64_t blocks, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(blocks);
  auto* yb = static_cast<__nv_bfloat16*>(y);
  if (gated)
    launch(gemv_kernel<kSteps, __nv_bfloat16, true, kF8, false, kOneChain>, grid, kThreads, 0, stream, x, w, xs, ws,
           yb, int(n), int(m), int(k), lg);
  else if (out_f32)
    launch(gemv_kernel<kSteps, float, false, kF8, false, kOneChain>, grid, kThreads, 0, stream, x, w, xs, ws,
           static_cast<float*>(y), int(n), int(m), int(k), lg);
  else
    launch(gemv_kernel<kSteps, __nv_bfloat16, false, kF8, false, kOneChain>, grid, kThreads, 0, stream, x, w, xs, ws,
           yb, int(n), int(m), int(k), lg);
}

// kQuantX: bf16 x quantized by each block (n * k codes and n scales of dynamic shared memory).
template <int kSteps>
void launch_gemv_quant_x(const void* x, const void* w, const float* ws, void* y, int64_t n, int64_t m, int64_t k,
                         bool out_f32, int lg, int64_t blocks, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(blocks);
  const size_t smem = static_cast<size_t>(n * k + n * 4);
  if (out_f32)
    launch(gemv_kernel<kSteps, float, false, true, true>, grid, kThreads, smem, stream, x, w, nullptr, ws,
           static_cast<float*>(y), int(n), int(m), int(k), lg);
  else
    launch(gemv_kernel<kSteps, __nv_bfloat16, false, true, true>, grid, kThreads, smem, stream, x, w, nullptr, ws,
           static_cast<__nv_bfloat16*>(y), int(n), int(m), int(k), lg);
}

// How full the last wave of `blocks` is, `slots` resident at a time (1: full).
double last_wave_fill(int64_t blocks, int64_t slots) {
  const int64_t waves = (blocks + slots - 1) / slots;
  return static_cast<double>(blocks) / static_cast<double>(waves * slots);
}

// Resident blocks per SM of the kernel with kSteps (the smallest over its variants).
template <int kSteps>
int occupancy() {
  int least = 1 << 30;
  auto take = [&](auto kernel) {
    int b = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, kThreads, 0));
    least = std::min(least, b);
  };
  take(gemv_kernel<kSteps, float, false, false>);
  take(gemv_kernel<kSteps, __nv_bfloat16, false, false>);
  take(gemv_kernel<kSteps, __nv_bfloat16, true, false>);
  take(gemv_kernel<kSteps, float, false, true>);
  take(gemv_kernel<kSteps, __nv_bfloat16, false, true>);
  take(gemv_kernel<kSteps, __nv_bfloat16, true, true>);
  return std::max(1, least);
}

// 4 steps (128 k) per chunk from this k on, 2 below: at k = 576 four-step
// chunks would leave 64 k (a ninth of each row) to the unpipelined tail
// (49152 x 576 on the H200: 72% of copy bandwidth with 4 steps, 79% with 2).
constexpr int64_t kLongRow = 2048;

}  // namespace

// kSteps = 4 (2 resident blocks per SM) for rows from kLongRow on, unless
// 2 (3 per SM) fills the GPU's waves clearly better: the 8B shape's qkv
// (6144 x 4096, n = 1) is 384 blocks, 1.45 waves of 264 with 4 steps and
// 0.97 of 396 with 2: 19.5 -> 18.4 us (H100). o_proj and down (256 blocks:
// 0.97 waves with 4 steps) and gate/up (1,792: 6.8 waves) stay at 4.
Gemv::Shape Gemv::shape(int64_t tiles, int64_t k) const {
  auto make = [&](int k_steps, int bps) {
    const int lg = choose_ks_log2(tiles, k / (32 * k_steps), sms_, bps);
    return Shape{k_steps, lg, (tiles * (int64_t(1) << lg) + kWarps - 1) / kWarps};
  };
  const Shape two = make(2, blocks_per_sm_short_);
  if (forced_steps_ == 2 || (k < kLongRow && forced_steps_ != 4)) return two;
  const Shape four = make(4, blocks_per_sm_long_);
  if (forced_steps_ == 4) return four;
  const bool two_fills = last_wave_fill(two.blocks, int64_t(sms_) * blocks_per_sm_short_) >
                         last_wave_fill(four.blocks, int64_t(sms_) * blocks_per_sm_long_) + 0.1;
  return two_fills ? two : four;
}

Gemv::Gemv() {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev));
  blocks_per_sm_long_ = occupancy<4>();
  blocks_per_sm_short_ = occupancy<2>();
  if (const char* s = std::getenv("PAGEDRT_GEMV_STEPS")) {
    if (std::string(s) == "2" || std::string(s) == "4")
      forced_steps_ = std::atoi(s);
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_GEMV_STEPS=%s is neither 2 nor 4; choosing per shape\n", s);
  }
}

bool Gemv::supports(const void* x, const void* w, int64_t n, int64_t m, int64_t k) {
  const auto addr = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w);
  return n >= 1 && n <= kMaxRows && m >= 1 && m < (int64_t(1) << 30) && k >= 8 && k % 8 == 0 &&
         k < (int64_t(1) << 30) && addr % 16 == 0;
}

bool Gemv::supports_f8(const void* x, const void* w, int64_t n, int64_t m, int64_t k) {
  return supports(x, w, n, m, k) && k % 16 == 0;
}

bool Gemv::supports_f8_quant_x(const void* x, const void* w, int64_t n, int64_t m, int64_t k) {
  return supports_f8(x, w, n, m, k) && n <= kMaxQuantXRows && n * k + n * 4 <= kMaxQuantXBytes;
}

// An fp8 row of k codes is as many bytes as a bf16 row of k / 2: the same
// chunks, so the same shape.
void Gemv::launch_any(const void* x, const void* w, const float* xs, const float* ws, void* y, int64_t n, int64_t m,
                      int64_t k, bool out_f32, bool gated, bool f8, bool invariant, cudaStream_t stream) const {
  const Shape sh = shape((m + (gated ? 7 : 15)) / (gated ? 8 : 16), f8 ? k / 2 : k);
  auto go = [&](auto steps, auto fp8, auto one_chain) {
    launch_gemv<decltype(steps)::value, decltype(fp8)::value, decltype(one_chain)::value>(
        x, w, xs, ws, y, n, m, k, out_f32, gated, sh.ks_log2, sh.blocks, stream);
  };
  using Four = std::integral_constant<int, 4>;
  using Two = std::integral_constant<int, 2>;
  using Yes = std::true_type;
  using No = std::false_type;
  if (f8)
    sh.k_steps == 4 ? go(Four{}, Yes{}, No{}) : go(Two{}, Yes{}, No{});
  else if (invariant)
    sh.k_steps == 4 ? go(Four{}, No{}, Yes{}) : go(Two{}, No{}, Yes{});
  else
    sh.k_steps == 4 ? go(Four{}, No{}, No{}) : go(Two{}, No{}, No{});
}

Gemv::Order Gemv::order(int64_t m, int64_t k) const {
  const Shape sh = shape((m + 15) / 16, k);
  return Order{sh.k_steps, 1 << sh.ks_log2};
}

void Gemv::run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
               cudaStream_t stream, bool invariant) const {
  launch_any(x, w, nullptr, nullptr, y, n, m, k, out_f32, false, false, invariant, stream);
}

void Gemv::run_silu_mul(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k,
                        cudaStream_t stream, bool invariant) const {
  launch_any(x, w, nullptr, nullptr, y, n, m, k, false, true, false, invariant, stream);
}

void Gemv::run_f8(const void* xq, const float* xs, const void* w, const float* ws, void* y, int64_t n, int64_t m,
                  int64_t k, bool out_f32, cudaStream_t stream) const {
  launch_any(xq, w, xs, ws, y, n, m, k, out_f32, false, true, false, stream);
}

void Gemv::run_f8_quant_x(const void* x, const void* w, const float* ws, void* y, int64_t n, int64_t m, int64_t k,
                          bool out_f32, cudaStream_t stream) const {
  const Shape sh = shape((m + 15) / 16, k / 2);
  if (sh.k_steps == 4)
    launch_gemv_quant_x<4>(x, w, ws, y, n, m, k, out_f32, sh.ks_log2, sh.blocks, stream);
  else
    launch_gemv_quant_x<2>(x, w, ws, y, n, m, k, out_f32, sh.ks_log2, sh.blocks, stream);
}

void Gemv::run_silu_mul_f8(const void* xq, const float* xs, const void* w, const float* ws, void* y, int64_t n,
                           int64_t m, int64_t k, cudaStream_t stream) const {
  launch_any(xq, w, xs, ws, y, n, m, k, false, true, true, false, stream);
}

}  // namespace pagedrt::cuda
