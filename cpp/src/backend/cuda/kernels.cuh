// backend/cuda/kernels.cuh — launchers of the CUDA backend's kernels.
//
// Kernels trust their inputs: shapes and dtypes are checked where tensors are
// made and at the op boundary (cuda_backend.cu). Token x stride arithmetic is
// int64 throughout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/paged_kv.hpp"

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
// out (n, hidden) fp32 = table (rows, hidden) T [ids - first]; zero rows for
// ids outside [first, first + rows) (a vocabulary-parallel shard)
template <typename T>
void embedding(const T* table, int64_t rows, int64_t hidden, int64_t first, const int32_t* ids, int64_t n, float* out,
               cudaStream_t s);
// A norm's output also as the input of fp8 GEMMs (fp8_rows.hpp's activations:
// bitwise quantize_act_rows of the bf16 rows it writes): codes q (n, d) e4m3,
// scale (n). Null q: none.
struct Fp8Out {
  uint8_t* q = nullptr;
  float* scale = nullptr;
};
// out = x / sqrt(mean(x^2) + eps) * w, per row of x (n, d); x fp32 or bf16, out bf16 or fp32.
// Returns whether it also wrote f8 (bf16 out, a row the one-pass kernel takes).
template <typename Tin, typename Tout>
bool rms_norm(const Tin* x, const float* w, float eps, int64_t n, int64_t d, Tout* out, cudaStream_t s,
              Fp8Out f8 = {});
// residual (n, d) fp32 += x (T); out (T) = rms_norm(residual) * w; f8 as rms_norm's
template <typename T>
bool add_rms_norm(float* residual, const T* x, const float* w, float eps, int64_t n, int64_t d, T* out,
                  cudaStream_t s, Fp8Out f8 = {});
// residual (fp32) += x (T), numel elements
template <typename T>
void add(float* residual, const T* x, int64_t numel, cudaStream_t s);
// gate_up (n, 2 I) T -> out (n, I) = silu(gate) * up
template <typename T>
void silu_mul(const T* gate_up, int64_t n, int64_t inter, T* out, cudaStream_t s);
// The same in bf16, out's rows also as f8's codes and scales (Fp8Out: the
// next fp8 GEMM's x, bitwise quantize_act_rows of the stored rows); one block
// a row. Returns false, launching nothing, where I % 8 != 0 or I > 32,768.
bool silu_mul_codes(const bf16* gate_up, int64_t n, int64_t inter, bf16* out, cudaStream_t s, Fp8Out f8);
// out row i = x row idx[i], rows of row_bytes bytes
void gather_rows(const void* x, int64_t row_bytes, const int32_t* idx, int64_t n, void* out,
                 cudaStream_t s);
// Rotates q and k of qkv (n, (H + 2 Hkv) D) in place (rotate-half RoPE, fp32
// math, cos/sin (max_pos, D/2) fp32) and writes k, v to the cache slots
// (slot < 0: not written; null caches: none written). D a multiple of 8 (v
// moves in 16-byte pieces).
template <typename T>
void rope_and_cache(T* qkv, const float* cos, const float* sin, const int32_t* positions,
                    const int64_t* slots, int64_t n, int H, int Hkv, int D, T* k_cache, T* v_cache,
                    cudaStream_t s);
// fp8 KV (paged_kv.hpp's Fp8Kv; kv_fp8.cu). quantize_kv: the k and v rows of
// qkv (n, (H + 2 Hkv) D), rotated, to their slots' codes and exponents
// (slot < 0: none), as the CPU's quantize_kv_row. dequantize_kv_blocks: block
// src[s] of kv's K and V to block s of k_out / v_out (num, block_size, Hkv,
// D) bf16, exactly. D 64 or 128.
template <typename T>
void quantize_kv(const T* qkv, const int64_t* slots, int64_t n, int H, const Fp8Kv& kv, cudaStream_t s);
void dequantize_kv_blocks(const Fp8Kv& kv, const int32_t* src, int64_t num, bf16* k_out, bf16* v_out,
                          cudaStream_t s);
// out[r] = first index of the largest value of row r of x (rows, cols) fp32;
// NaN is never chosen over a number (all NaN: 0). scratch: device memory of
// rows * kArgmaxParts * 8 bytes (each row's parts' winners).
constexpr int kArgmaxParts = 32;
// mask_of_row (rows, device) or null: row r's tokens whose bit is clear in
// mask_words[mask_of_row[r] * words_per_row ...] count as -inf (r's index < 0: no mask).
void argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, void* scratch, cudaStream_t s,
                 const int32_t* mask_of_row = nullptr, const uint32_t* mask_words = nullptr,
                 int64_t words_per_row = 0);
// block pairs[i].y = block pairs[i].x, block_bytes each (multiple of 16)
void copy_blocks(uint8_t* base, int64_t block_bytes, const int2* pairs, int n, cudaStream_t s);
// Async scheduling: tokens[fb[i].x] = fb[i].y >= 0 ? picks[fb[i].y] : draws[-1 - fb[i].y], i < n
// (the previous step's device results fed into this step's token ids).
void feed_tokens(int32_t* tokens, const int2* fb, int n, const int32_t* picks, const int32_t* draws, cudaStream_t s);
// Whole blocks between a cache (base) and page-locked host slots (host,
// mapped: written or read over the bus by the kernel), block_bytes % 16 == 0;
// to_host: pairs (cache block, slot), else (slot, cache block).
void swap_blocks(uint8_t* base, uint8_t* host, int64_t block_bytes, const int2* pairs, int n, bool to_host,
                 cudaStream_t s);

// ---- paged attention ----------------------------------------------------------
//
// The cache and the step's page table come as one PagedKv view
// (backend/paged_kv.hpp: NHD blocks; the token at position p of sequence i is
// in block kv.pages(i)[p / block_size], offset p % block_size). qkv rows:
// [q (H D) | k (Hkv D) | v (Hkv D)]; out (n, H D).
template <typename T>
struct AttentionParamsT {
  const T* qkv;
  PagedKv<T> kv;                // Hkv, D and the block size are the view's
  T* out;
  const int32_t* positions;     // (num_tokens)
  const int32_t* query_start;   // (num_seqs + 1)
  int num_heads;                // H
  float scale;
  // RoPE and the KV append inside decode attention (steps where every
  // sequence has one query token; null otherwise): q and the token's own k
  // are read unrotated from qkv and rotated at its position, and the new K and
  // V go to its slot (DecodeItem::slot) in kv and into the block's softmax
  // straight from the block.
  const float* rope_cos = nullptr;  // (max_positions, D / 2)
  const float* rope_sin = nullptr;
  // fp8 KV (kv_cache_dtype "fp8"): decode attention reads this cache (bf16
  // activations only; kv then holds no cache); null k: kv's.
  Fp8Kv fp8;
};
using AttentionParams = AttentionParamsT<bf16>;

// Flat KV slot of position `pos` of a sequence whose block table is `pages`
// (block_shift >= 0: a shift and a mask instead of an integer division).
// Kernels copy block_size and block_shift into registers before their key
// loops: read from the view inside the loop, the choice between the two
// became a branch per key (docs/results/2026-12-02.md).
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
// The bf16 kernel's shape: `warps` warps of 16 keys make a tile, `stages`
// tiles in the cp.async pipeline. 2 x 3 unless PAGEDRT_DECODE_KERNEL says
// otherwise (for benchmarks: tools/bench_cuda.py attention_sweep). On an
// H200, batch 64 x 2,048 / 256 x 1,024 / 512 x 512 took 128.8 / 265.7 / 279.9 us
// with 2 x 3 against 141.5 / 290.7 / 310.0 with 4 x 3 (docs/results/2026-12-02.md).
// S above 4 runs 4 in bf16; the fp8 cache's kernel (attention_decode_fp8.cu:
// S stages a warp) takes 2, 3, 4, 6 or 8 (5 and 7 run 4 and 6) and runs
// kFp8DecodeConfig unless told otherwise (kFp8DeepDecodeConfig where that
// plans at least 2,048 keys a block; 4 warps where 2 would cut a context into
// more than 32 splits, as for bf16: cuda_step.cu).
struct DecodeConfig {
  int warps = 2;
  int stages = 3;
};
constexpr DecodeConfig kFp8DecodeConfig{2, 4};
constexpr DecodeConfig kFp8DeepDecodeConfig{2, 6};  // contexts of long chunks (cuda_step.cu)
struct DecodePlan {
  DecodeConfig config;
  // bf16 on CUDA cores (attention_decode_cc.cu) instead of tensor cores: set
  // for steps of at most one block per SM (batch-1 decode), unless
  // PAGEDRT_DECODE_KERNEL forces one kernel.
  bool cuda_cores;
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
  // (num_items, Hkv) zeros, with more than one split: the tensor-core
  // kernel's tickets (attention_split.cuh's last_split), left zero again.
  int* counters;
  // The grid's order: (Hkv, items, splits) where set, else (items, Hkv,
  // splits). A block reads one kv head's 256-byte run of each 2 KB token row
  // (NHD, 8 kv heads, D 128); with the kv heads innermost the blocks of an
  // item run side by side and read its pages whole. Only the order in which
  // blocks start changes: no bit of the output (decode_grid, decode_block).
  bool heads_first;
};
constexpr int kMaxClusterSplits = 8;  // the portable cluster size
constexpr int kMaxDecodeSplits = 256;  // splits of one context at most
// bf16: tensor cores, keys in tiles of 16 x DecodeConfig::warps
// (attention_decode.cu), or CUDA cores where the plan says so; fp32: CUDA cores
// (attention_decode_cc.cu). kDecodeTile: the largest tile of a configuration.
constexpr int kDecodeTile = 64;
// The decode kernels' grid (DecodePlan::heads_first) and, in a kernel, its
// block's (item, kv head).
inline dim3 decode_grid(const DecodePlan& d, int num_kv_heads) {
  const auto items = static_cast<unsigned>(d.num_items), heads = static_cast<unsigned>(num_kv_heads);
  const auto splits = static_cast<unsigned>(d.num_splits);
  return d.heads_first ? dim3(heads, items, splits) : dim3(items, heads, splits);
}
__device__ __forceinline__ int2 decode_block(const DecodePlan& d) {
  return d.heads_first ? make_int2(blockIdx.y, blockIdx.x) : make_int2(blockIdx.x, blockIdx.y);
}
void decode_attention(const AttentionParamsT<bf16>& p, const DecodePlan& d, cudaStream_t s);
void decode_attention_cuda_cores(const AttentionParamsT<bf16>& p, const DecodePlan& d, cudaStream_t s);
// How many blocks of the bf16 kernel of `config` (fp8: its fp8 form) fit one SM at once.
int decode_blocks_per_sm(int head_dim, DecodeConfig config, bool fp8 = false);
void decode_attention(const AttentionParamsT<float>& p, const DecodePlan& d, cudaStream_t s);

// Prefill (bf16 only; the fp32 mode runs every token through the decode
// kernel): tiles of `rows` rows (64 or 128), a row being (query token, query
// head of the kv head's group): tiles[i] = (sequence, first row); rows of a
// sequence are q_len * G. Causal against everything in the cache up to each
// row's position.
struct PrefillPlan {
  const int2* tiles;
  int num_tiles;
  int rows;
  // Hopper's warpgroup kernel (attention_prefill_wgmma.cu) instead of the
  // mma.sync one: D = 128, rows = 128, a build with sm_90a on an sm_90 GPU.
  bool wgmma;
  // With wgmma: the warp-specialized TMA kernel (attention_prefill_ws.cu)
  // where the cache's block size allows (prefill_ws_fits), with `stages`
  // (2 or 3) K/V tiles in its ring.
  bool ws;
  int stages;
  // The persistent kernel's deal: round r of its items runs blocks in
  // reverse order where r is odd (a snake), so that where the tiles' keys
  // fall from the first item to the last (one prompt's) each block's sum of
  // keys is about the same (8,000 causal tokens: the busiest block's keys
  // 1.004x the mean, 1.064x round-robin); false: round-robin.
  bool snake;
  int num_tokens;  // the step's query tokens (rows of qkv)
};
// The tile's rows by head dim: 128 at D = 128 (8 warps; each K/V tile read
// from L2 serves twice the rows of 64), 64 at D = 64.
constexpr int prefill_rows(int head_dim) { return head_dim == 128 ? 128 : 64; }
void prefill_attention(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s);
void prefill_attention_wgmma(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s);
void prefill_attention_ws(const AttentionParams& p, const PrefillPlan& f, cudaStream_t s);
// Whether the warp-specialized kernel takes these: D = 128, G dividing 64, a
// block size that is a power of two from 8, fewer than 2^31 slots.
bool prefill_ws_fits(const AttentionParams& p);
// Whether the build holds the wgmma kernel (CUDA architectures with 90a).
bool prefill_wgmma_built();

bool attention_supported(int head_dim, int group);

}  // namespace pagedrt::cuda
