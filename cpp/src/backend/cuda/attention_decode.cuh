// backend/cuda/attention_decode.cuh — what the tensor-core decode kernels
// share: the bf16 one (attention_decode.cu) and the fp8-cache one
// (attention_decode_fp8.cu). Both give a block a (token, kv head, split), W
// warps of 16 keys per tile, the G <= 8 query heads of the kv head as the
// rows of an m16n8k16 A operand; they differ in how K and V reach the B
// operands. After the key loop each warp holds its online softmax's o, m and
// l; finish_decode() merges the warps and then the splits.
#pragma once

#include <cooperative_groups.h>

#include "backend/cuda/attention_split.cuh"
#include "backend/cuda/kernels.cuh"
#include "backend/cuda/mma.cuh"

namespace pagedrt::cuda {

constexpr int kMaxGroup = 8;

// 4 bytes global -> shared (src_bytes 0: zeros).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void unpack_bf16x2(uint32_t r, float& lo, float& hi) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r));
  lo = f.x;
  hi = f.y;
}

// Where a kernel's epilogue keeps its partial results in shared memory:
// `warps` (over the pipeline's stages, free once the key loop is done:
// (W, 8, D) fp32 outputs, then (W, 8) m and l; also the in-block merge's
// (splits, 8) lse values), `out` ((8, D) fp32: this split's result, for the
// cluster) and `lse` ((8) fp32).
template <int D, int W>
struct DecodeEpilogueSmem {
  static constexpr size_t warp_o = 0;
  static constexpr size_t warp_m = warp_o + size_t(W) * kMaxGroup * D * 4;
  static constexpr size_t warp_l = warp_m + size_t(W) * kMaxGroup * 4;
  static constexpr size_t warps_end = warp_l + size_t(W) * kMaxGroup * 4;
  static constexpr size_t lse_values = size_t(kMaxDecodeSplits) * kMaxGroup * 4;
  // Bytes the area over the stages must have.
  static constexpr size_t need = warps_end > lse_values ? warps_end : lse_values;
};

template <int D, int W>
__device__ void merge_decode_block(const AttentionParams& p, const DecodePlan& d, unsigned char* smem, float* sm_o,
                                   float* sm_lse, int item, int kvh, int t, int split);

// The end of a decode block: its W warps' online softmax results (o: the
// C fragments of D / 8 n-tiles, rows lane / 4, the zero rows 8..15 in
// o[n][2..3]; m, l: per lane's row, l not yet summed over the row's 4
// lanes) merged into the split's result, which goes to the output (one
// split), to the cluster's merge, or to o_part / lse_part for the last split
// block to merge. o[n][e] of lane holds dim n * kN + ((lane % 4) * 2 + e) * kC
// (bf16: kN 8, kC 1; the fp8 kernel permutes V's columns: kN 1, kC D / 8).
// `out` and `lse`: DecodeEpilogueSmem's areas past the stages.
template <int D, int W, int kN, int kC>
__device__ void finish_decode(const AttentionParams& p, const DecodePlan& d, unsigned char* smem, float* sm_o,
                              float* sm_lse, int item, int kvh, int t, int split, const float (&o)[D / 8][4],
                              float m, float l) {
  using E = DecodeEpilogueSmem<D, W>;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int H = p.num_heads, Hkv = p.kv.num_kv_heads, G = H / Hkv;
  cp_async_wait<0>();
  __syncthreads();
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  float* wo = reinterpret_cast<float*>(smem + E::warp_o);
  float* wm = reinterpret_cast<float*>(smem + E::warp_m);
  float* wl = reinterpret_cast<float*>(smem + E::warp_l);
  const int g = lane / 4;
  if (g < G) {
    float* dst = wo + (warp * kMaxGroup + g) * D + (lane % 4) * 2 * kC;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) dst[n * kN] = o[n][0], dst[n * kN + kC] = o[n][1];
    if (lane % 4 == 0) wm[warp * kMaxGroup + g] = m, wl[warp * kMaxGroup + g] = l;
  }
  merge_decode_block<D, W>(p, d, smem, sm_o, sm_lse, item, kvh, t, split);
}

// finish_decode's second half: the W warps' results (DecodeEpilogueSmem's
// warp_o, warp_m, warp_l, written by every warp) merged into the split's
// result, which goes to the output, the cluster's merge, or o_part / lse_part.
template <int D, int W>
__device__ void merge_decode_block(const AttentionParams& p, const DecodePlan& d, unsigned char* smem, float* sm_o,
                                   float* sm_lse, int item, int kvh, int t, int split) {
  using E = DecodeEpilogueSmem<D, W>;
  const int tid = threadIdx.x;
  const int H = p.num_heads, Hkv = p.kv.num_kv_heads, G = H / Hkv;
  const float* wo = reinterpret_cast<const float*>(smem + E::warp_o);
  const float* wm = reinterpret_cast<const float*>(smem + E::warp_m);
  const float* wl = reinterpret_cast<const float*>(smem + E::warp_l);
  __syncthreads();
  const int NS = d.num_splits;
  for (int idx = tid; idx < G * D; idx += blockDim.x) {
    const int gg = idx / D, dd = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) M = fmaxf(M, wm[w * kMaxGroup + gg]);
    float Lsum = 0.0f, O = 0.0f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < W; ++w) {
        const float wgt = exp2f(wm[w * kMaxGroup + gg] - M);
        Lsum += wl[w * kMaxGroup + gg] * wgt;
        O += wo[(w * kMaxGroup + gg) * D + dd] * wgt;
      }
    }
    const int h = kvh * G + gg;
    const float val = Lsum > 0.0f ? O / Lsum : 0.0f, lse = Lsum > 0.0f ? M + log2f(Lsum) : -INFINITY;
    if (NS == 1) {
      store_f(p.out + int64_t(t) * H * D + int64_t(h) * D + dd, val);
    } else if (d.cluster) {
      sm_o[gg * D + dd] = val;
      if (dd == 0) sm_lse[gg] = lse;
    } else {
      const int64_t part = int64_t(item) * NS + split;
      d.o_part[(part * H + h) * D + dd] = val;
      if (dd == 0) d.lse_part[part * H + h] = lse;
    }
  }
  // Splits in global memory: the last block of (item, kv head) to finish
  // merges them (the G x S lse values over the free stages).
  if (NS > 1 && !d.cluster) {
    if (last_split(d.counters + int64_t(item) * Hkv + kvh, NS))
      merge_splits_in_block(p, d, item, kvh, t, reinterpret_cast<float*>(smem));
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // A cluster of the S split blocks of (item, kv head): each block merges a
  // slice of the G x D outputs from every block's shared memory, then all
  // wait until every slice is read before their shared memory goes away.
  if (NS > 1 && d.cluster) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();
    for (int idx = split * blockDim.x + tid; idx < G * D; idx += NS * blockDim.x) {
      const int gg = idx / D, dd = idx % D;
      const float v = merge_splits(
          NS, [&](int r) { return *cluster.map_shared_rank(&sm_lse[gg], r); },
          [&](int r) { return *cluster.map_shared_rank(&sm_o[gg * D + dd], r); });
      store_f(p.out + int64_t(t) * H * D + int64_t(kvh * G + gg) * D + dd, v);
    }
    cluster.sync();
  }
#endif
}

// The fp8-cache kernel (attention_decode_fp8.cu) of W warps and S stages, for
// attention_decode.cu's dispatch: its launch and its blocks per SM.
template <int D, int W, int S>
void launch_decode_fp8(const AttentionParams& p, const DecodePlan& d, dim3 grid, cudaStream_t s);
template <int D, int W, int S>
int decode_fp8_blocks_per_sm();

}  // namespace pagedrt::cuda
