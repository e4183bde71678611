// backend/cuda/glu_gemm.cu — silu(x @ gate^T) * (x @ up^T) in one Hopper
// GEMM (glu_gemm.hpp has the scheme).
#include "backend/cuda/glu_gemm.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "backend/cuda/cuda_check.hpp"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/mma.cuh"
#include "backend/cuda/tensor_map.hpp"
#include "backend/cuda/tma.cuh"
#include "backend/cuda/wgmma.cuh"

// The compilation passes without sm_90a see an empty kernel body, and would
// warn that its constants and helpers go unused.
#pragma nv_diag_suppress 177

namespace pagedrt::cuda {
namespace {

constexpr int BM = 128;  // rows of x a tile (64 a consumer warpgroup)
constexpr int BF = 128;  // features a tile: its 128 gate rows and 128 up rows of W
constexpr int BK = 64;   // k a stage: one 128-byte swizzled row of each operand row
constexpr int kThreads = 384, kStages = 4;
constexpr int kGroup = 8;  // feature tiles whose row tiles are walked together (L2 reuse)
constexpr uint32_t kXBytes = BM * 128, kWBytes = BF * 128;
constexpr uint32_t kStage = kXBytes + 2 * kWBytes;  // x's rows | gate's rows | up's rows: 48 KB
constexpr uint32_t kSmem = kStages * kStage + 1024;  // slack to align the ring to 1,024

// silu(g) with the fast exponential and division: the epilogue runs while
// the tensor cores wait (~5% of a tile's time with expf and an IEEE
// division, ~1% so); y's rounding to bf16 (2^-9) dwarfs their error (~2^-21).
__device__ __forceinline__ float silu_fast(float g) { return __fdividef(g, 1.0f + __expf(-g)); }

struct GluArgs {
  __nv_bfloat16* y;  // (n, inter)
  int n, inter, k_steps;
  int units_m, tiles_f, num_units;  // a unit: C row tiles (a cluster's) of one feature tile
};

// Unit u's first row tile and first feature: groups of kGroup feature tiles,
// each walked unit row by unit row (a row's kGroup units adjacent), so the
// blocks resident at once share x's and W's tiles in L2.
__device__ __forceinline__ void unit_of(int u, const GluArgs& a, int& mt, int& f0) {
  const int per_group = kGroup * a.units_m, group = u / per_group, in = u % per_group;
  const int width = min(kGroup, a.tiles_f - group * kGroup);
  mt = in / width;
  f0 = (group * kGroup + in % width) * BF;
}

// C = 1: a block loads its whole stage. C = 2: clusters of two blocks on two
// row tiles of the same features; each loads its x rows, and one of W's two
// boxes (rank 0 gate's, rank 1 up's) multicast into both, so W crosses from
// L2 once per two tiles. A stage is then free once the consumers of both
// blocks are done with it: each consumer warp arrives on both blocks'
// "empty" barriers.
template <int C>
__global__ void __launch_bounds__(kThreads, 1)
    glu_gemm_kernel(const __grid_constant__ CUtensorMap xmap, const __grid_constant__ CUtensorMap wmap, GluArgs a) {
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  __shared__ alignas(8) uint64_t bar_mem[2 * kStages];  // full, then empty, a stage each
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u, bars = smem_addr(bar_mem);
  auto full = [&](int st) { return bars + 8 * st; };
  auto empty = [&](int st) { return bars + 8 * (kStages + st); };
  const int tid = threadIdx.x;
  const int rank = C > 1 ? static_cast<int>(cluster_rank()) : 0;
  const int first_unit = static_cast<int>(blockIdx.z) / C, unit_step = static_cast<int>(gridDim.z) / C;

  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full(st), 1);       // the producer's arrival + the bytes
      mbar_init(empty(st), 8 * C);  // a lane of each consumer warp of the cluster
    }
    mbar_fence_init();
  }
  if (C > 1)
    cluster_sync();  // both blocks' barriers initialized before any copy lands in them
  else
    __syncthreads();  // the last block-wide barrier: the producer's idle threads leave

  if (tid < 128) {  // the producer: one thread issues every copy
    setmaxnreg_dec<24>();
    if (tid != 0) return;
    bool waited = false;
    int it = 0;
    for (int u = first_unit; u < a.num_units; u += unit_step) {
      int mt, f0;
      unit_of(u, a, mt, f0);
      const int m0 = (mt * C + rank) * BM;
      for (int s = 0; s < a.k_steps; ++s, ++it) {
        const int st = it % kStages;
        if (it >= kStages) mbar_wait(empty(st), ((it / kStages) & 1) ^ 1);  // the phase fill it - kStages released
        const uint32_t dst = base + st * kStage;
        mbar_arrive_expect_tx(full(st), kStage);
        // W depends on no kernel: the first stage's W before the wait for the
        // kernel ahead (launch.cuh), x after it.
        if (C == 1) {
          tma_load_2d(dst + kXBytes, &wmap, full(st), s * BK, f0);
          tma_load_2d(dst + kXBytes + kWBytes, &wmap, full(st), s * BK, a.inter + f0);
        } else {
          tma_load_2d_multicast(dst + kXBytes + rank * kWBytes, &wmap, full(st), s * BK, rank * a.inter + f0,
                                (1u << C) - 1);
        }
        if (!waited) {
          pdl_wait();
          waited = true;
        }
        tma_load_2d(dst, &xmap, full(st), s * BK, m0);
      }
    }
    // The other block's consumers arrive on this block's barriers, and its
    // copies land here, until they are done with the last stages: this block
    // leaves after them.
    if (C > 1)
      for (int j = max(0, it - kStages); j < it; ++j) mbar_wait(empty(j % kStages), (j / kStages) & 1);
    return;
  }

  setmaxnreg_inc<240>();
  const int ct = tid - 128, c = ct / 128, warp = (ct % 128) / 32, lane = ct % 32;
  const int g = lane / 4, cc = (lane % 4) * 2;
  auto release = [&](int st) {
    if (C == 1) {
      mbar_arrive_lane0(empty(st), lane);
    } else {
#pragma unroll
      for (int r = 0; r < C; ++r) mbar_arrive_cluster_lane0(empty(st), r, lane);
    }
  };
  float acc[128];  // rows 64c + 16 warp + g (+ 8) of the tile; columns 0-127 gate, 128-255 up (wgmma.cuh)
  pdl_wait();      // y may still be read by the kernel ahead
  int it = 0;
  for (int u = first_unit; u < a.num_units; u += unit_step) {
    int mt, f0;
    unit_of(u, a, mt, f0);
    const int m0 = (mt * C + rank) * BM;
    for (int s = 0; s < a.k_steps; ++s, ++it) {
      const int st = it % kStages;
      mbar_wait(full(st), (it / kStages) & 1);
      const uint32_t x_at = base + st * kStage + c * 64 * 128, w_at = base + st * kStage + kXBytes;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < BK / 16; ++ks)
        wgmma_m64n256_ss(acc, gmma_desc(x_at + ks * 32, 16, 1024), gmma_desc(w_at + ks * 32, 16, 1024),
                         s > 0 || ks > 0);
      wgmma_commit();
      wgmma_wait<1>();  // fill it - 1's products are done: its stage is free; fill it's run on
      if (s > 0) release((it + kStages - 1) % kStages);
    }
    wgmma_wait<0>();
    wgmma_hold(acc);
    release((it + kStages - 1) % kStages);

    // y's rows r and r + 8, features f0 + 8j + cc .. + 1 (I is even: a pair is
    // all in or all out), while the producer fills the next unit's stages.
    const int r = m0 + 64 * c + 16 * warp + g;
    __nv_bfloat16* y0 = r < a.n ? a.y + int64_t(r) * a.inter + f0 + cc : nullptr;
    __nv_bfloat16* y8 = r + 8 < a.n ? a.y + int64_t(r + 8) * a.inter + f0 + cc : nullptr;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      if (f0 + 8 * j + cc >= a.inter) break;
      const float* d = acc + 4 * j;  // gate; d[64 ..] the same features' up
      if (y0)
        *reinterpret_cast<uint32_t*>(y0 + 8 * j) = pack_bf16x2(silu_fast(d[0]) * d[64], silu_fast(d[1]) * d[65]);
      if (y8)
        *reinterpret_cast<uint32_t*>(y8 + 8 * j) = pack_bf16x2(silu_fast(d[2]) * d[66], silu_fast(d[3]) * d[67]);
    }
  }
#else
  __trap();  // built without sm_90a: prefill_wgmma_built() is false and nothing launches this
#endif
}

// The most blocks a launch runs at once: C x the clusters the GPU holds (a
// block an SM; a two-block cluster needs two free SMs of one GPC).
template <int C>
int resident_blocks(int sms) {
  if (C == 1) return sms;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim = {1, 1, static_cast<unsigned>(C)};
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1, 1, static_cast<unsigned>(sms / C * C));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmem;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, glu_gemm_kernel<C>, &cfg));
  return std::max(1, clusters) * C;
}

// Blocks along the grid's z (launch_clusters' cluster dimension), one a
// resident slot, each walking every (gridDim.z / C)-th unit.
template <int C>
void launch_glu(const CUtensorMap& xm, const CUtensorMap& wm, const GluArgs& a, int blocks, cudaStream_t stream) {
  const dim3 grid(1, 1, static_cast<unsigned>(std::min(a.num_units * C, blocks)));
  launch_clusters(glu_gemm_kernel<C>, grid, dim3(kThreads), kSmem, C, stream, xm, wm, a);
}

}  // namespace

GluGemm::GluGemm(bool enabled) {
  if (const char* v = std::getenv("PAGEDRT_GLU_GEMM")) {
    const long long rows = std::atoll(v);
    if ((rows == 0 && std::strcmp(v, "0") == 0) || (rows >= 1 && rows <= (1 << 20)))
      min_rows_ = rows;
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_GLU_GEMM=%s is neither 0 nor a row count; using %lld\n", v,
                   static_cast<long long>(kDefaultMinRows));
  }
  int dev = 0;
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  sms_ = prop.multiProcessorCount;
  available_ = enabled && min_rows_ > 0 && prop.major == 9 && prop.minor == 0 && prefill_wgmma_built() &&
               prop.sharedMemPerBlockOptin >= kSmem;
  if (const char* v = std::getenv("PAGEDRT_GLU_CLUSTER")) {
    if (std::strcmp(v, "1") == 0 || std::strcmp(v, "2") == 0)
      cluster_ = v[0] - '0';
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_GLU_CLUSTER=%s is neither 1 nor 2; using %d\n", v, cluster_);
  }
  if (!available_) return;
  if (cluster_ == 1) {
    CUDA_CHECK(cudaFuncSetAttribute(glu_gemm_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(kSmem)));
    blocks_ = resident_blocks<1>(sms_);
  } else {
    CUDA_CHECK(cudaFuncSetAttribute(glu_gemm_kernel<2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(kSmem)));
    blocks_ = resident_blocks<2>(sms_);
  }
  // A diagnostic: fewer blocks than the occupancy query allows (whole
  // clusters), said on stderr with the query's count. Session 48's clusters
  // of two ran at half the single blocks' rate at every M, as if half the
  // launch's clusters waited for the others (its schedule is static).
  if (const char* v = std::getenv("PAGEDRT_GLU_BLOCKS")) {
    const int cap = std::atoi(v) / cluster_ * cluster_;
    const bool capped = cap >= cluster_ && cap < blocks_;
    std::fprintf(stderr, "pagedrt: GluGemm: %d SMs, clusters of %d, %d blocks resident by the occupancy query%s\n",
                 sms_, cluster_, blocks_, capped ? "; capped by PAGEDRT_GLU_BLOCKS" : "");
    if (capped) blocks_ = cap;
  }
}

bool GluGemm::takes(const void* x, const void* w, const void* y, int64_t n, int64_t inter, int64_t k) const {
  const auto addr = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(y);
  const int64_t units = (n / BM + 1) * (inter / BF + 1);  // at least the launch's units (an int)
  return available_ && n >= min_rows_ && n < (int64_t(1) << 30) && inter >= 8 && inter % 8 == 0 &&
         2 * inter < (int64_t(1) << 30) && k >= 8 && k % 8 == 0 && k < (int64_t(1) << 30) && addr % 16 == 0 &&
         units < (int64_t(1) << 30);
}

void GluGemm::run(const void* x, const void* w, void* y, int64_t n, int64_t inter, int64_t k,
                  cudaStream_t stream) const {
  // x (n, k) and W (2 I, k) row-major, read in boxes of 64 k by 128 rows.
  const uint64_t xdims[2] = {uint64_t(k), uint64_t(n)}, wdims[2] = {uint64_t(k), uint64_t(2 * inter)};
  const uint64_t stride[1] = {uint64_t(k) * 2};
  const uint32_t xbox[2] = {BK, BM}, wbox[2] = {BK, BF};
  const CUtensorMap xm = tensor_map_bf16(x, 2, xdims, stride, xbox, "the gate/up GEMM's input rows");
  const CUtensorMap wm = tensor_map_bf16(w, 2, wdims, stride, wbox, "the gate/up GEMM's weights");
  GluArgs a{static_cast<__nv_bfloat16*>(y), static_cast<int>(n), static_cast<int>(inter),
            static_cast<int>((k + BK - 1) / BK), static_cast<int>(((n + BM - 1) / BM + cluster_ - 1) / cluster_),
            static_cast<int>((inter + BF - 1) / BF), 0};
  a.num_units = a.units_m * a.tiles_f;
  if (cluster_ == 1)
    launch_glu<1>(xm, wm, a, blocks_, stream);
  else
    launch_glu<2>(xm, wm, a, blocks_, stream);
}

}  // namespace pagedrt::cuda
