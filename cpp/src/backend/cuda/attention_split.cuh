// backend/cuda/attention_split.cuh — split-KV decode: how the splits of one
// (token, head) merge, shared by the bf16 and fp32 decode kernels.
//
// A split writes its normalized output o and its log2-sum-exp lse (an empty
// split 0 and -inf), either to DecodePlan::o_part / lse_part (then
// merge_decode_splits() runs a second kernel) or into its shared memory for
// the other blocks of its thread block cluster (DecodePlan::cluster).
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/kernels.cuh"

namespace pagedrt::cuda {

__device__ __forceinline__ void store_f(bf16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }

// The log-sum-exp merge of S split results of one output element, in split
// order: lse(s) the split's log2-sum-exp (-inf: empty), o(s) its normalized
// output. The merge kernel and the cluster merges call it (bitwise alike).
template <typename Lse, typename O>
__device__ __forceinline__ float merge_splits(int S, Lse lse, O o) {
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, lse(s));
  float W = 0.0f, acc = 0.0f;
  if (M != -INFINITY) {
#pragma unroll 8
    for (int s = 0; s < S; ++s) {
      const float os = o(s), ls = lse(s);
      const float w = ls == -INFINITY ? 0.0f : exp2f(ls - M);
      W += w;
      acc += w * os;
    }
  }
  return W > 0.0f ? acc / W : 0.0f;
}

// out = the merge of the o_part / lse_part the decode kernel wrote (d.num_splits > 1,
// not in clusters): a kernel of (items, H) blocks.
template <typename T>
void merge_decode_splits(const AttentionParamsT<T>& p, const DecodePlan& d, cudaStream_t s);

}  // namespace pagedrt::cuda
