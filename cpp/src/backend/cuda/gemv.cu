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
// Registers (ptxas, sm_90): 120 for kSteps = 4, 67 for kSteps = 2, no spills:
// 2 and 3 blocks (16 and 24 warps) per SM. The cost does not depend on n.
// Measured on H100s (1 GiB copy 2.97-2.98 TB/s), n = 1, back to back with
// programmatic dependent launch, % of copy: qkv 6144 x 4096 87-89, o_proj
// 4096 x 4096 91-92, gate_up 28672 x 4096 94-97, down 4096 x 14336 98-102,
// lm head 128256 x 4096 (fp32 out) 101-105; cuBLASLt 76, 67, 94-98, 87-90,
// 93-97. Without PDL the short ones lost ~3 us a call to launch and ramp-up
// (qkv 82, o_proj 76).
#include <cuda_bf16.h>

#include <algorithm>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/gemv.hpp"
#include "backend/cuda/launch.cuh"

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

// c (16 x 8, fp32) += A (16 x 16, bf16, row-major) * B (16 x 8, bf16, column-major)
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// One step (32 k): acc[0] takes the .x/.y half, acc[1] the .z/.w half (two
// independent mma chains). wa, wb: W rows g and g + 8; xv: x row g.
__device__ __forceinline__ void mma_step(float (&acc)[2][4], const uint4& wa, const uint4& wb, const uint4& xv) {
  mma_16816(acc[0], wa.x, wb.x, wa.y, wb.y, xv.x, xv.y);
  mma_16816(acc[1], wa.z, wb.z, wa.w, wb.w, xv.z, xv.w);
}

// x (n, k), w (m, k) bf16; y (n, m) OutT. ks = 1 << ks_log2 warps per tile.
template <int kSteps, typename OutT>
__global__ void __launch_bounds__(kThreads) gemv_kernel(const __nv_bfloat16* __restrict__ x,
                                                        const __nv_bfloat16* __restrict__ w,
                                                        OutT* __restrict__ y, int n, int m, int k,
                                                        int ks_log2) {
  __shared__ float partial[kWarps][4][32];  // (warp, accumulator, lane)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int ks = 1 << ks_log2;
  const int split = warp & (ks - 1);
  const int row0 = (blockIdx.x * (kWarps >> ks_log2) + (warp >> ks_log2)) * 16;
  const int kv = k / 8;  // 16-byte vectors per row

  // The lane's rows, clamped to the last row (a partial last tile loads rows
  // that it then does not store), and its x row (n <= 8; see above).
  const uint4* wa = reinterpret_cast<const uint4*>(w) + int64_t(min(row0 + g, m - 1)) * kv + t;
  const uint4* wb = reinterpret_cast<const uint4*>(w) + int64_t(min(row0 + g + 8, m - 1)) * kv + t;
  const uint4* xr = reinterpret_cast<const uint4*>(x) + int64_t(min(g, n - 1)) * kv + t;

  float acc[2][4] = {};
  const int chunks = k / (32 * kSteps);
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
    for (int s = 0; s < kSteps; ++s) nx[s] = __ldg(xr + (c * kSteps + s) * 4);
  };
  // W does not depend on the kernel ahead (launch.cuh): the first chunk's
  // loads overlap that kernel; x and y wait for it. (Asking L2 for more of W
  // up front, cp.async.bulk.prefetch, made batch-1 steps slower: 8, 16 and 32
  // MB per call cost 0.6%, 1.9% and 7.3% of TPOT on the H100.)
  pdl_trigger();
  if (row0 < m && split < chunks) load_w(split);
  pdl_wait();
  if (row0 < m) {
    if (split < chunks) load_x(split);
    for (int c = split; c < chunks; c += ks) {
      uint4 ca[kSteps], cb[kSteps], cx[kSteps];
#pragma unroll
      for (int s = 0; s < kSteps; ++s) ca[s] = na[s], cb[s] = nb[s], cx[s] = nx[s];
      if (c + ks < chunks) load_w(c + ks), load_x(c + ks);
#pragma unroll
      for (int s = 0; s < kSteps; ++s) mma_step(acc, ca[s], cb[s], cx[s]);
    }
    // The steps after the last whole chunk; a lane's 8 k are all in or all out (k % 8 == 0).
    for (int s = chunks * kSteps + split; s * 32 < k; s += ks) {
      uint4 va = make_uint4(0, 0, 0, 0), vb = va, vx = va;
      if (s * 4 + t < kv) {
        va = load_stream(wa + s * 4);
        vb = load_stream(wb + s * 4);
        vx = __ldg(xr + s * 4);
      }
      mma_step(acc, va, vb, vx);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) acc[0][j] += acc[1][j];

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
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int row = row0 + 8 * (j / 2) + g, tok = 2 * t + j % 2;
    if (row < m && tok < n) store(y + int64_t(tok) * m + row, acc[0][j]);
  }
}

// ks: warps per tile, a power of two up to kWarps (aim: 16 warps per SM). More splits put more loads
// in flight for shapes with few tiles; they stop where every split would have
// less than one chunk or the grid would no longer fit the GPU at once.
int choose_ks_log2(int64_t tiles, int64_t chunks, int sms, int blocks_per_sm) {
  const int64_t want_warps = int64_t(sms) * 16;
  const int64_t max_blocks = int64_t(sms) * blocks_per_sm;
  int lg = 0;
  while ((1 << lg) < kWarps && tiles * (1 << lg) < want_warps && (2 << lg) <= chunks &&
         (tiles * (2 << lg) + kWarps - 1) / kWarps <= max_blocks)
    ++lg;
  return lg;
}

template <int kSteps>
void launch_gemv(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32, int sms,
                 int blocks_per_sm, cudaStream_t stream) {
  const int64_t tiles = (m + 15) / 16;
  const int lg = choose_ks_log2(tiles, k / (32 * kSteps), sms, blocks_per_sm);
  const int64_t blocks = (tiles * (int64_t(1) << lg) + kWarps - 1) / kWarps;
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  const auto* wb = static_cast<const __nv_bfloat16*>(w);
  if (out_f32)
    launch(gemv_kernel<kSteps, float>, static_cast<unsigned>(blocks), kThreads, 0, stream, xb, wb,
           static_cast<float*>(y), int(n), int(m), int(k), lg);
  else
    launch(gemv_kernel<kSteps, __nv_bfloat16>, static_cast<unsigned>(blocks), kThreads, 0, stream, xb, wb,
           static_cast<__nv_bfloat16*>(y), int(n), int(m), int(k), lg);
}

// Resident blocks per SM of the kernel with kSteps (the smaller of its two output types).
template <int kSteps>
int occupancy() {
  int a = 0, b = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&a, gemv_kernel<kSteps, float>, kThreads, 0));
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, gemv_kernel<kSteps, __nv_bfloat16>, kThreads, 0));
  return std::max(1, std::min(a, b));
}

// 4 steps (128 k) per chunk from this k on, 2 below: at k = 576 four-step
// chunks would leave 64 k (a ninth of each row) to the unpipelined tail
// (49152 x 576 on the H200: 72% of copy bandwidth with 4 steps, 79% with 2).
constexpr int64_t kLongRow = 2048;

}  // namespace

Gemv::Gemv() {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev));
  blocks_per_sm_long_ = occupancy<4>();
  blocks_per_sm_short_ = occupancy<2>();
}

bool Gemv::supports(const void* x, const void* w, int64_t n, int64_t m, int64_t k) {
  const auto addr = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w);
  return n >= 1 && n <= kMaxRows && m >= 1 && m < (int64_t(1) << 30) && k >= 8 && k % 8 == 0 &&
         k < (int64_t(1) << 30) && addr % 16 == 0;
}

void Gemv::run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
               cudaStream_t stream) const {
  if (k >= kLongRow)
    launch_gemv<4>(x, w, y, n, m, k, out_f32, sms_, blocks_per_sm_long_, stream);
  else
    launch_gemv<2>(x, w, y, n, m, k, out_f32, sms_, blocks_per_sm_short_, stream);
}

}  // namespace pagedrt::cuda
