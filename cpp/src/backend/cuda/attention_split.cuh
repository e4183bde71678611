// backend/cuda/attention_split.cuh — split-KV decode: how the splits of one
// (token, head) merge, shared by the bf16 and fp32 decode kernels.
//
// A split writes its normalized output o and its log2-sum-exp lse (an empty
// split 0 and -inf), either to DecodePlan::o_part / lse_part (then
// merge_decode_splits() runs a second kernel) or into its shared memory for
// the other blocks of its thread block cluster (DecodePlan::cluster). The
// tensor-core kernel's last split block of an (item, kv head) merges the
// partials itself (last_split, merge_splits_in_block); the CUDA-core kernel's
// go to the merge kernel.
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
      acc = fmaf(w, os, acc);
    }
  }
  return W > 0.0f ? acc / W : 0.0f;
}

// merge_splits for 4 consecutive output elements of one head (their lse is
// the same): the same operations in the same order on each, so each equals
// merge_splits bitwise. Unrolled deeper, so that more loads are in flight.
template <typename Lse, typename O4>
__device__ __forceinline__ float4 merge_splits4(int S, Lse lse, O4 o) {
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, lse(s));
  float W = 0.0f;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (M != -INFINITY) {
#pragma unroll 16
    for (int s = 0; s < S; ++s) {
      const float4 os = o(s);
      const float ls = lse(s);
      const float w = ls == -INFINITY ? 0.0f : exp2f(ls - M);
      W += w;
      acc.x = fmaf(w, os.x, acc.x);
      acc.y = fmaf(w, os.y, acc.y);
      acc.z = fmaf(w, os.z, acc.z);
      acc.w = fmaf(w, os.w, acc.w);
    }
  }
  if (!(W > 0.0f)) return make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  return make_float4(acc.x / W, acc.y / W, acc.z / W, acc.w / W);
}

// Whether this block, which has written its split's o_part / lse_part, is
// the last of the S split blocks of its (item, kv head) to finish: a ticket
// from `counter` ((item, kv head)'s entry of DecodePlan::counters). The last
// resets the counter for the next launch (every other block has taken its
// ticket by then). Every thread of the block calls it.
__device__ __forceinline__ bool last_split(int* counter, int S) {
  __shared__ int last;
  __threadfence();  // this thread's partials, visible before the ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1) == S - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// out = the merge of every split of (item, kv head kvh), by the last split
// block (last_split): the G x S lse values to `lse_s` (shared memory, S * G
// floats) first, then 4 output elements a thread. Equal bitwise to the merge
// kernel's result (merge_splits4). Partials are read through L2 (__ldcg):
// other SMs wrote them.
template <typename T>
__device__ void merge_splits_in_block(const AttentionParamsT<T>& p, const DecodePlan& d, int item, int kvh,
                                      int token, float* lse_s) {
  const int H = p.num_heads, G = H / p.kv.num_kv_heads, D = p.kv.head_dim, S = d.num_splits;
  const int64_t part0 = int64_t(item) * S;
  for (int i = threadIdx.x; i < S * G; i += blockDim.x)
    lse_s[i] = __ldcg(d.lse_part + (part0 + i / G) * H + kvh * G + i % G);
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D / 4; idx += blockDim.x) {
    const int g = idx / (D / 4), dd = idx % (D / 4) * 4, h = kvh * G + g;
    const float4 v = merge_splits4(
        S, [&](int s) { return lse_s[s * G + g]; },
        [&](int s) { return __ldcg(reinterpret_cast<const float4*>(d.o_part + ((part0 + s) * H + h) * D + dd)); });
    T* out = p.out + int64_t(token) * H * D + int64_t(h) * D + dd;
    store_f(out, v.x);
    store_f(out + 1, v.y);
    store_f(out + 2, v.z);
    store_f(out + 3, v.w);
  }
}

// out = the merge of the o_part / lse_part the decode kernel wrote (d.num_splits > 1,
// not in clusters): a kernel of (items, H) blocks.
template <typename T>
void merge_decode_splits(const AttentionParamsT<T>& p, const DecodePlan& d, cudaStream_t s);

}  // namespace pagedrt::cuda
