// backend/cuda/invariant_gemm.cu — the batch-invariant GEMM of
// invariant_gemm.hpp: the own GEMV's order (one chain a split) for any n.
//
// The tiled kernel. A block computes a tile of kBM rows of W by kBN rows of x
// (y's tile, transposed); its warps are kWM x kWN, each kMT m16 tiles of W by
// kNT n8 tiles of x. It walks the steps (32 k) of the GEMV's order:
//
//   order: split 0's chunks 0, ks, 2 ks, ... (k_steps steps each), then its
//          steps past the last whole chunk (chunks k_steps + 0, + ks, ...);
//          split 1's the same from 1; ...  (a table in shared memory, built
//          once a block; the last step of a split marked)
//
// kPer steps a pipeline stage: W's kBM x 32 and x's kBN x 32 bf16 a step copied
// by cp.async into a ring of kStages stages (zeros past k, past m and past n,
// as the GEMV multiplies zeros past k). A lane (g = lane / 4, t = lane % 4)
// takes the 16 bytes at k 8t .. 8t + 7 of its rows, exactly the GEMV's
// fragments: mma.m16n8k16 on .x/.y (rows g and g + 8 of W, column g of x),
// then on .z/.w, into one running chain per split. At a split's last step
// the chain is added to the splits' sum (split 0's becomes it; kept in
// shared memory, where registers would spill) and restarts from zero; splits
// without steps add +0, as the GEMV's partials do.
//
//   shared memory: W ring (kStages kPer, kBM, 64 bytes) | x ring (kStages kPer, kBN, 64 bytes) |
//                  the splits' sums (kBM kBN fp32) | order (steps, 2 bytes)
//   A row of a stage is 64 bytes, so the 8 lanes of a quarter-warp read two
//   consecutive rows' 128 bytes: no bank conflicts.
//
// Blocks are numbered in groups of kGroup tiles of W by every tile of x, so
// the blocks resident at once share their W rows and x rows in L2.
#include "backend/cuda/invariant_gemm.hpp"

#include <cuda_bf16.h>

#include <string>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/mma.cuh"

namespace pagedrt::cuda {
namespace {

constexpr int kStepK = 32;           // k of a step
constexpr int kRowBytes = 64;        // a row's bytes in a stage (one step of bf16)
constexpr uint16_t kLastOfSplit = 0x8000;
constexpr int kGroup = 8;            // tiles of W a group of blocks shares
constexpr int kOrderBytes = static_cast<int>(InvariantGemm::kMaxK / kStepK) * 2;

// Steps of split p (Gemv::Order): its chunks' and its steps' past the chunks.
__device__ __forceinline__ int split_steps(int p, int chunks, int tail, int k_steps, int ks) {
  const int c = p < chunks ? (chunks - 1 - p) / ks + 1 : 0;
  const int s = p < tail ? (tail - 1 - p) / ks + 1 : 0;
  return c * k_steps + s;
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <int kBM, int kBN, int kWM, int kWN, int kStages, int kPer, typename OutT>
__global__ void __launch_bounds__(kWM* kWN * 32)
    invariant_gemm_kernel(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                          OutT* __restrict__ y, int n, int m, int k, int k_steps, int ks) {
  constexpr int kThreads = kWM * kWN * 32;
  constexpr int kMT = kBM / (kWM * 16), kNT = kBN / (kWN * 8);
  static_assert(kMT * kWM * 16 == kBM && kNT * kWN * 8 == kBN, "warp tiles cover the block tile");
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* w_ring = smem;
  constexpr int kSlots = kStages * kPer;  // one step's rows each
  uint8_t* x_ring = smem + kSlots * kBM * kRowBytes;
  float* sums = reinterpret_cast<float*>(x_ring + kSlots * kBN * kRowBytes);  // (kMT kNT 4, kThreads)
  uint16_t* order = reinterpret_cast<uint16_t*>(sums + kMT * kNT * 4 * kThreads);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_m = warp % kWM, warp_n = warp / kWM;

  // This block's tile (grouped numbering, above).
  const int tiles_m = (m + kBM - 1) / kBM, tiles_n = (n + kBN - 1) / kBN;
  const int per_group = kGroup * tiles_n;
  const int first_m = static_cast<int>(blockIdx.x) / per_group * kGroup;
  const int group_m = min(kGroup, tiles_m - first_m);
  const int in_group = static_cast<int>(blockIdx.x) % per_group;
  const int m0 = (first_m + in_group % group_m) * kBM;
  const int n0 = in_group / group_m * kBN;

  // The order of steps: thread p < ks writes split p's.
  const int steps = (k + kStepK - 1) / kStepK;
  const int chunks = k / (kStepK * k_steps);
  const int tail = steps - chunks * k_steps;
  if (tid < ks) {
    int i = 0;
    for (int q = 0; q < tid; ++q) i += split_steps(q, chunks, tail, k_steps, ks);
    const int first = i;
    for (int c = tid; c < chunks; c += ks)
      for (int s = 0; s < k_steps; ++s) order[i++] = static_cast<uint16_t>(c * k_steps + s);
    for (int s = chunks * k_steps + tid; s < steps; s += ks) order[i++] = static_cast<uint16_t>(s);
    if (i > first) order[i - 1] |= kLastOfSplit;
  }
  int empty = 0;  // splits without a step: the last ones
  for (int p = 0; p < ks; ++p) empty += split_steps(p, chunks, tail, k_steps, ks) == 0;
  pdl_trigger();
  __syncthreads();
  pdl_wait();

  // Each thread copies the same 16-byte vector q of a step for kWCopies rows
  // of W and kXCopies of x: their addresses are set once here (rows past m or
  // n read nothing and write zeros).
  constexpr int kWCopies = kBM * 4 / kThreads, kXCopies = kBN * 4 / kThreads;
  static_assert(kWCopies * kThreads == kBM * 4 && kXCopies * kThreads == kBN * 4, "whole copies a thread");
  const int kv = k / 8;  // 16-byte vectors of a row
  const int q = tid % 4;
  const __nv_bfloat16* w_src[kWCopies];
  const __nv_bfloat16* x_src[kXCopies];
  bool w_in[kWCopies], x_in[kXCopies];
#pragma unroll
  for (int j = 0; j < kWCopies; ++j) {
    const int r = (tid + j * kThreads) / 4;
    w_in[j] = m0 + r < m;
    w_src[j] = w + int64_t(w_in[j] ? m0 + r : 0) * k + q * 8;
  }
#pragma unroll
  for (int j = 0; j < kXCopies; ++j) {
    const int r = (tid + j * kThreads) / 4;
    x_in[j] = n0 + r < n;
    x_src[j] = x + int64_t(x_in[j] ? n0 + r : 0) * k + q * 8;
  }
  auto load = [&](int slot, int step) {
    const bool k_in = step * 4 + q < kv;
    uint8_t* wd = w_ring + slot * kBM * kRowBytes + tid * 16;
#pragma unroll
    for (int j = 0; j < kWCopies; ++j)
      cp_async16(wd + j * kThreads * 16, w_src[j] + (k_in ? step * kStepK : 0), w_in[j] && k_in ? 16 : 0);
    uint8_t* xd = x_ring + slot * kBN * kRowBytes + tid * 16;
#pragma unroll
    for (int j = 0; j < kXCopies; ++j)
      cp_async16(xd + j * kThreads * 16, x_src[j] + (k_in ? step * kStepK : 0), x_in[j] && k_in ? 16 : 0);
  };

  // The running chain in registers; the splits' sum in shared memory (each
  // thread its own words, kThreads apart: no conflicts), where registers
  // would spill. each(f): f(a, b, j) for every accumulator of the thread.
  auto each = [](auto&& f) {
#pragma unroll
    for (int a = 0; a < kMT; ++a)
#pragma unroll
      for (int b = 0; b < kNT; ++b)
#pragma unroll
        for (int j = 0; j < 4; ++j) f(a, b, j);
  };
  float acc[kMT][kNT][4];
  each([&](int a, int b, int j) { acc[a][b][j] = 0.f; });
  float* sum = sums + tid;
  auto sum_at = [&](int a, int b, int j) -> float& { return sum[((a * kNT + b) * 4 + j) * kThreads]; };
  bool folded = false;  // a split's chain is in the sum

  // A stage is kPer consecutive steps of the order (the last one may be short).
  const int stages = (steps + kPer - 1) / kPer;
  auto load_stage = [&](int stage, int first) {
#pragma unroll
    for (int e = 0; e < kPer; ++e)
      if (first + e < steps) load(stage * kPer + e, order[first + e] & ~kLastOfSplit);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < stages) load_stage(s, s * kPer);
    cp_async_commit();
  }
  for (int i = 0; i < stages; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage i is in; every warp is done with stage i - 1, which the next load reuses
    const int next = i + kStages - 1;
    if (next < stages) load_stage(next % kStages, next * kPer);
    cp_async_commit();

#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int at = i * kPer + e;  // the step's place in the order
      if (at >= steps) break;
      const uint8_t* ws = w_ring + ((i % kStages) * kPer + e) * kBM * kRowBytes;
      const uint8_t* xs = x_ring + ((i % kStages) * kPer + e) * kBN * kRowBytes;
      uint4 wa[kMT], wb[kMT];  // rows g and g + 8 of each m16 tile; x's fragments one n8 tile at a time
#pragma unroll
      for (int a = 0; a < kMT; ++a) {
        const int r = (warp_m * kMT + a) * 16 + g;
        wa[a] = *reinterpret_cast<const uint4*>(ws + r * kRowBytes + t * 16);
        wb[a] = *reinterpret_cast<const uint4*>(ws + (r + 8) * kRowBytes + t * 16);
      }
#pragma unroll
      for (int b = 0; b < kNT; ++b) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xs + ((warp_n * kNT + b) * 8 + g) * kRowBytes + t * 16);
#pragma unroll
        for (int a = 0; a < kMT; ++a) {
          mma_bf16(acc[a][b], wa[a].x, wb[a].x, wa[a].y, wb[a].y, xv.x, xv.y);
          mma_bf16(acc[a][b], wa[a].z, wb[a].z, wa[a].w, wb[a].w, xv.z, xv.w);
        }
      }
      if (order[at] & kLastOfSplit) {
        each([&](int a, int b, int j) {
          sum_at(a, b, j) = folded ? sum_at(a, b, j) + acc[a][b][j] : acc[a][b][j];
          acc[a][b][j] = 0.f;
        });
        folded = true;
      }
    }
  }

  each([&](int a, int b, int j) {
    float v = sum_at(a, b, j);
    for (int e = 0; e < empty; ++e) v += 0.f;
    const int row = m0 + (warp_m * kMT + a) * 16 + g + 8 * (j / 2);
    const int tok = n0 + (warp_n * kNT + b) * 8 + 2 * t + j % 2;
    if (row < m && tok < n) store(y + int64_t(tok) * m + row, v);
  });
}

// One configuration: the block tile, warps and stages, launched for bf16 or fp32 y.
template <int kBM, int kBN, int kWM, int kWN, int kStages, int kPer>
struct Tiled {
  static constexpr int kThreads = kWM * kWN * 32;
  static constexpr size_t kFixed = size_t(kStages) * kPer * (kBM + kBN) * kRowBytes + size_t(kBM) * kBN * 4;  // rings, sums

  // The most dynamic shared memory a call asks for (k = kMaxK), allowed on the current GPU.
  static void allow() {
    const int most = static_cast<int>(kFixed + kOrderBytes);
    CUDA_CHECK(cudaFuncSetAttribute(invariant_gemm_kernel<kBM, kBN, kWM, kWN, kStages, kPer, float>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, most));
    CUDA_CHECK(cudaFuncSetAttribute(invariant_gemm_kernel<kBM, kBN, kWM, kWN, kStages, kPer, __nv_bfloat16>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, most));
  }

  static void run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
                  Gemv::Order order, cudaStream_t stream) {
    const size_t smem = kFixed + size_t((k + kStepK - 1) / kStepK) * 2;
    const int64_t blocks = (m + kBM - 1) / kBM * ((n + kBN - 1) / kBN);
    if (blocks >= (int64_t(1) << 31) || n >= (int64_t(1) << 31))
      throw Error(ErrorKind::InvalidArgument, "InvariantGemm: " + std::to_string(n) + " rows of x are too many");
    auto go = [&](auto kernel, auto* out) {
      launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream,
             static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(w), out, int(n), int(m),
             int(k), order.k_steps, order.ks);
    };
    if (out_f32)
      go(invariant_gemm_kernel<kBM, kBN, kWM, kWN, kStages, kPer, float>, static_cast<float*>(y));
    else
      go(invariant_gemm_kernel<kBM, kBN, kWM, kWN, kStages, kPer, __nv_bfloat16>, static_cast<__nv_bfloat16*>(y));
  }
};

// n <= 8: the GEMV. 9 ... 64 rows: blocks of 32 rows of W by 16, 32 or 64 of
// x (2 warps, each 16 rows of W by all of the block's x), stages of 4 steps,
// 6 or 4 of them: W streams through many blocks (the 8B shape's smallest,
// 4,096 rows, makes 128), with 48-72 KB of loads in flight a block. More:
// 128 x 128 blocks (16 warps of 32 x 32), 3 stages of 2 steps. Measured on
// H200s (session 25, docs/determinism.md): 10-63% of the roofline at 16 ...
// 128 rows, 24-26% from 2,048 (cuBLASLt's wgmma kernels: 57-110%). Nsight
// Compute with 8 warps of 32 x 64: 2 warps a scheduler, 0.45 of them
// eligible, an issue every 2.7 cycles, mostly waiting on fixed-latency
// dependencies; 16 warps measured the same. An mma.sync kernel will not
// reach wgmma's rate; wgmma sums as mma.sync does (tools/mma_order_probe.cu),
// so a wgmma kernel in this order is the way on.
using Tiled16 = Tiled<32, 16, 2, 1, 6, 4>;
using Tiled32 = Tiled<32, 32, 2, 1, 6, 4>;
using Tiled64 = Tiled<32, 64, 2, 1, 4, 4>;
using Tiled128 = Tiled<128, 128, 4, 4, 3, 2>;

}  // namespace

// Set while no stream is being recorded (a kernel's attribute is not a
// stream operation; the backend makes its Gemm before any step).
InvariantGemm::InvariantGemm(const Gemv& gemv) : gemv_(gemv) {
  Tiled16::allow();
  Tiled32::allow();
  Tiled64::allow();
  Tiled128::allow();
}

void InvariantGemm::run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
                        cudaStream_t stream) const {
  if (n == 0) return;
  if (!supports_shape(m, k) || (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w)) % 16 != 0)
    throw Error(ErrorKind::InvalidArgument,
                "InvariantGemm: a (" + std::to_string(m) + ", " + std::to_string(k) +
                    ") weight needs k a multiple of 8 up to " + std::to_string(kMaxK) +
                    " and 16-byte aligned x and W");
  if (n <= Gemv::kMaxRows) return gemv_.run(x, w, y, n, m, k, out_f32, stream, true);
  const Gemv::Order order = gemv_.order(m, k);
  if (n <= 16)
    Tiled16::run(x, w, y, n, m, k, out_f32, order, stream);
  else if (n <= 32)
    Tiled32::run(x, w, y, n, m, k, out_f32, order, stream);
  else if (n <= 64)
    Tiled64::run(x, w, y, n, m, k, out_f32, order, stream);
  else
    Tiled128::run(x, w, y, n, m, k, out_f32, order, stream);
}

bool InvariantGemm::run_silu_mul(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k,
                                 cudaStream_t stream) const {
  if (n > Gemv::kMaxRows || !Gemv::supports(x, w, n, 2 * m, k)) return false;
  gemv_.run_silu_mul(x, w, y, n, m, k, stream, true);
  return true;
}

}  // namespace pagedrt::cuda
