// backend/cuda/kernels.cuh — launchers of the CUDA backend's kernels.
//
// Kernels trust their inputs: shapes and dtypes are checked where tensors are
// made and at the op boundary (cuda_backend.cu). Token x stride arithmetic is
// int64 throughout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pagedrt::cuda {

using bf16 = __nv_bfloat16;

// Source/target element kinds of convert().
enum class Elem : int { F32 = 0, F16 = 1, BF16 = 2 };

// dst[i] = src[i] converted (round to nearest even), n elements.
void convert(const void* src, Elem src_kind, void* dst, Elem dst_kind, int64_t n, cudaStream_t s);

// T, the activation / KV element type: bf16, or float (the fp32 mode, for
// validation against the CPU). Every launcher below with T is instantiated
// for both.
//
// out (n, hidden) fp32 = table (vocab, hidden) T [ids]
template <typename T>
void embedding(const T* table, int64_t hidden, const int32_t* ids, int64_t n, float* out, cudaStream_t s);
// out = x / sqrt(mean(x^2) + eps) * w, per row of x (n, d); x fp32 or bf16, out bf16 or fp32
template <typename Tin, typename Tout>
void rms_norm(const Tin* x, const float* w, float eps, int64_t n, int64_t d, Tout* out, cudaStream_t s);
// residual (n, d) fp32 += x (T); out (T) = rms_norm(residual) * w
template <typename T>
void add_rms_norm(float* residual, const T* x, const float* w, float eps, int64_t n, int64_t d, T* out,
                  cudaStream_t s);
// residual (fp32) += x (T), numel elements
template <typename T>
void add(float* residual, const T* x, int64_t numel, cudaStream_t s);
// gate_up (n, 2 I) T -> out (n, I) = silu(gate) * up
template <typename T>
void silu_mul(const T* gate_up, int64_t n, int64_t inter, T* out, cudaStream_t s);
// out row i = x row idx[i], rows of row_bytes bytes
void gather_rows(const void* x, int64_t row_bytes, const int32_t* idx, int64_t n, void* out,
                 cudaStream_t s);
// Rotates q and k of qkv (n, (H + 2 Hkv) D) in place (rotate-half RoPE, fp32
// math, cos/sin (max_pos, D/2) fp32) and writes k, v to the cache slots
// (slot < 0: not written). D a multiple of 8 (v moves in 16-byte pieces).
template <typename T>
void rope_and_cache(T* qkv, const float* cos, const float* sin, const int32_t* positions,
                    const int64_t* slots, int64_t n, int H, int Hkv, int D, T* k_cache, T* v_cache,
                    cudaStream_t s);
// out[r] = first index of the largest value of row r of x (rows, cols) fp32;
// NaN is never chosen over a number (all NaN: 0). scratch: device memory of
// rows * kArgmaxParts * 8 bytes (each row's parts' winners).
constexpr int kArgmaxParts = 32;
void argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, void* scratch, cudaStream_t s);
// block pairs[i].y = block pairs[i].x, block_bytes each (multiple of 16)
void copy_blocks(uint8_t* base, int64_t block_bytes, const int2* pairs, int n, cudaStream_t s);

// ---- paged attention ----------------------------------------------------------
//
// k_cache, v_cache: (num_blocks, block_size, Hkv, D) T (NHD). The token at
// position p of sequence i is in block page_indices[page_indptr[i] + p / bs],
// offset p % bs. qkv rows: [q (H D) | k (Hkv D) | v (Hkv D)]; out (n, H D).
template <typename T>
struct AttentionParamsT {
  const T* qkv;
  const T* k_cache;
  const T* v_cache;
  T* out;
  const int32_t* positions;     // (num_tokens)
  const int32_t* query_start;   // (num_seqs + 1)
  const int32_t* page_indptr;   // (num_seqs + 1)
  const int32_t* page_indices;
  const int32_t* token_seq;     // (num_tokens) sequence of each token
  int num_heads, num_kv_heads, head_dim, block_size;
  int block_shift;  // log2(block_size) when it is a power of two, else -1
  float scale;
  // RoPE and the KV append inside decode attention (steps where every
  // sequence has one query token; null otherwise): q and the token's own k
  // are read unrotated from qkv and rotated at its position, and the new K and
  // V go to its slot (DecodeItem::slot) and into the block's softmax straight
  // from the block.
  const float* rope_cos = nullptr;  // (max_positions, D / 2)
  const float* rope_sin = nullptr;
  T* k_append = nullptr;            // the caches, written
  T* v_append = nullptr;
};
using AttentionParams = AttentionParamsT<bf16>;

// Flat KV slot of position `pos` through the page table (a shift and a mask
// for the usual power-of-two block sizes instead of an integer division).
__device__ __forceinline__ int64_t kv_slot(const int32_t* pages, int pos, int bs, int shift) {
  if (shift >= 0) return (int64_t(pages[pos >> shift]) << shift) + (pos & (bs - 1));
  return int64_t(pages[pos / bs]) * bs + pos % bs;
}

// Decode: one work item per listed token (any token works: it attends to
// positions 0 .. positions[t] of its sequence). The context is cut into
// `num_splits` chunks of `chunk` keys; with more than one split, partial
// results go to o_part (num_items, num_splits, H, D) fp32 and lse_part
// (num_items, num_splits, H) fp32 (log2 domain), then a merge writes out.
// An item holds what the kernel would otherwise look up one load after
// another (token -> sequence -> page table offset): made on the host.
struct DecodeItem {
  int32_t token;       // row of the batch
  int32_t context;     // keys it attends to: its position + 1
  int32_t page_start;  // its sequence's first entry in page_indices
  int32_t slot;        // its own KV slot (the fused RoPE + append writes it), or -1
};
struct DecodePlan {
  const DecodeItem* items;  // (num_items)
  int num_items;
  int num_splits;
  int chunk;
  // Set for 2 <= num_splits <= kMaxClusterSplits when the grid fits the GPU
  // at once: the split blocks of an (item, kv head) run as one thread block
  // cluster and merge through each other's shared memory, without the
  // partials in global memory or a second kernel.
  bool cluster;
  float* o_part;
  float* lse_part;
};
constexpr int kMaxClusterSplits = 8;  // the portable cluster size
template <typename T>
void decode_attention(const AttentionParamsT<T>& p, const DecodePlan& d, cudaStream_t s);

// Prefill (bf16 only; the fp32 mode runs every token through the decode
// kernel): tiles of 64 rows, a row being (query token, query head of the kv
// head's group): tiles[i] = (sequence, first row); rows of a sequence are
// q_len * G. Causal against everything in the cache up to each row's position.
struct PrefillPlan {
  const int2* tiles;
  int num_tiles;
};
constexpr int kPrefillRows = 64;
void prefill_attention(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s);

bool attention_supported(int head_dim, int group);

}  // namespace pagedrt::cuda
