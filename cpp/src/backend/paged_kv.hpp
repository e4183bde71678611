// backend/paged_kv.hpp — the paged KV cache as the kernels see it.
//
// Per layer, K and V each (NHD layout):
//
//   cache: (num_blocks, block_size, num_kv_heads, head_dim)
//
//   a token's K/V live at flat slot  s = block_id * block_size + offset;
//   sequence i's blocks are page_indices[page_indptr[i] .. page_indptr[i+1]),
//   so its token at position p is in block page_indices[page_indptr[i] + p / block_size]
//   at offset p % block_size, i.e. at element s * num_kv_heads * head_dim + h * head_dim
//   for kv head h.
//
// Which block belongs to which sequence is the engine's business (block pool,
// block tables); the batch (backend.hpp's BatchView) carries the page table
// of one step in CSR form.
//
// No sequence lengths: a query token attends to positions 0 .. its own
// position, so each kernel bounds its keys by the query's position + 1 (a
// decode item's context, a prefill row's causal limit). A per-sequence length
// would be wrong for every prefill row but the last, and would have to agree
// with the positions anyway.
//
// Read by: cpu/attention.cpp and cpu_backend.cpp (RoPE + append), and on the
// GPU cuda/attention_decode.cu, attention_decode_cc.cu and attention_prefill.cu
// (through AttentionParamsT::kv).
#pragma once

#include <cstdint>

#include "backend/hd.hpp"

namespace pagedrt {

// One layer's paged K and V with one step's page table: what the attention
// kernels read and the KV append writes, on the CPU and on the GPU. The
// backends fill it from the layer's cache tensors and the step's BatchView;
// the kernels trust it.
template <typename T>
struct PagedKv {
  T* k = nullptr;                         // (num_blocks, block_size, num_kv_heads, head_dim)
  T* v = nullptr;                         // the same layout
  int32_t block_size = 0;                 // tokens per block
  int32_t block_shift = -1;               // log2(block_size) when a power of two, else -1
  int32_t num_kv_heads = 0;               // Hkv
  int32_t head_dim = 0;                   // D
  int64_t num_blocks = 0;                 // blocks in the cache (where a kernel needs its bounds)
  int64_t token_stride = 0;               // elements from one slot to the next (NHD: Hkv * D)
  int64_t head_stride = 0;                // elements from one kv head to the next (NHD: D)
  const int32_t* page_indptr = nullptr;   // (num_seqs + 1): sequence i's blocks are
  const int32_t* page_indices = nullptr;  //   page_indices[page_indptr[i] .. page_indptr[i + 1])

  // Element offset of kv head `h` of flat slot `slot` in k or v.
  PAGEDRT_HD int64_t slot_offset(int64_t slot, int64_t h) const { return slot * token_stride + h * head_stride; }
  // Sequence `seq`'s block table.
  PAGEDRT_HD const int32_t* pages(int seq) const { return page_indices + page_indptr[seq]; }
};

// log2(block_size) when it is a power of two, else -1 (the views' block_shift).
inline int32_t block_shift_of(int64_t block_size) {
  for (int sh = 0; sh < 31; ++sh)
    if ((int64_t{1} << sh) == block_size) return sh;
  return -1;
}

// The NHD view of `k`/`v` (num_blocks, block_size, num_kv_heads, head_dim) with
// a page table.
template <typename T>
PagedKv<T> nhd_paged_kv(T* k, T* v, int64_t block_size, int64_t num_kv_heads, int64_t head_dim,
                        const int32_t* page_indptr, const int32_t* page_indices) {
  PagedKv<T> kv;
  kv.k = k;
  kv.v = v;
  kv.block_size = static_cast<int32_t>(block_size);
  kv.block_shift = block_shift_of(block_size);
  kv.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  kv.head_dim = static_cast<int32_t>(head_dim);
  kv.token_stride = num_kv_heads * head_dim;
  kv.head_stride = head_dim;
  kv.page_indptr = page_indptr;
  kv.page_indices = page_indices;
  return kv;
}

// fp8 KV blocks (kv_cache_dtype "fp8"). A layer's K (or V) cache is a byte
// tensor (num_blocks, block_size, row_bytes); block b, block_bytes =
// block_size * row_bytes bytes at b * block_bytes, holds
//
//   codes (block_size, Hkv, D) e4m3, then
//   exps  (Hkv, block_size) int8, padded to 16 bytes (fp8_exp_bytes),
//
// and element d of kv head h of the token at offset o is
// e4m3_to_float(code[o][h][d]) * 2^exps[h][o] (backend/fp8.hpp's
// kv_row_exponent). Each row carries its own power-of-two scale: quantizing
// a token needs nothing but its own values (so results stay batch-invariant,
// docs/determinism.md), no row saturates, and the scale costs 1 byte in D
// (a block of 16 tokens, 8 kv heads, D 128: 16,512 bytes against 65,536 in
// bf16). Blocks stay whole byte ranges, so copy-on-write, swaps and the
// elastic pool move them as any other cache's.
constexpr int64_t fp8_exp_bytes(int64_t block_size, int64_t num_kv_heads) {
  return (block_size * num_kv_heads + 15) / 16 * 16;
}
// Bytes of one token row of the tensor: a whole number when block_size is a
// power of two or a multiple of 16 (fp8_block_size_ok).
constexpr int64_t fp8_row_bytes(int64_t block_size, int64_t num_kv_heads, int64_t head_dim) {
  return num_kv_heads * head_dim + fp8_exp_bytes(block_size, num_kv_heads) / block_size;
}
constexpr bool fp8_block_size_ok(int64_t block_size) {
  return block_size > 0 && (block_size % 16 == 0 || (block_size & (block_size - 1)) == 0);
}

struct Fp8Kv {
  uint8_t* k = nullptr;                   // (num_blocks, block_bytes)
  uint8_t* v = nullptr;
  int32_t block_size = 0;
  int32_t block_shift = -1;               // log2(block_size) when a power of two, else -1
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int64_t num_blocks = 0;
  int64_t block_bytes = 0;
  int64_t exp_start = 0;                  // block_size * Hkv * D: where a block's exps begin
  const int32_t* page_indptr = nullptr;   // as PagedKv's
  const int32_t* page_indices = nullptr;

  // Byte offsets, in k or v, of the codes and of the exponent of kv head h of
  // the token at offset o of block `block`.
  PAGEDRT_HD int64_t code_offset(int64_t block, int64_t o, int64_t h) const {
    return block * block_bytes + (o * num_kv_heads + h) * head_dim;
  }
  PAGEDRT_HD int64_t exp_offset(int64_t block, int64_t o, int64_t h) const {
    return block * block_bytes + exp_start + h * block_size + o;
  }
  // The same for the token at a flat slot (block * block_size + offset).
  PAGEDRT_HD int64_t slot_code_offset(int64_t slot, int64_t h) const {
    return code_offset(slot_block(slot), slot_in_block(slot), h);
  }
  PAGEDRT_HD int64_t slot_exp_offset(int64_t slot, int64_t h) const {
    return exp_offset(slot_block(slot), slot_in_block(slot), h);
  }
  PAGEDRT_HD int64_t slot_block(int64_t slot) const { return block_shift >= 0 ? slot >> block_shift : slot / block_size; }
  PAGEDRT_HD int64_t slot_in_block(int64_t slot) const {
    return block_shift >= 0 ? slot & (block_size - 1) : slot % block_size;
  }
  PAGEDRT_HD const int32_t* pages(int seq) const { return page_indices + page_indptr[seq]; }
};

// The Fp8Kv of byte caches k/v (num_blocks, block_size, row_bytes) with a page table.
inline Fp8Kv fp8_paged_kv(uint8_t* k, uint8_t* v, int64_t num_blocks, int64_t block_size, int64_t num_kv_heads,
                          int64_t head_dim, const int32_t* page_indptr, const int32_t* page_indices) {
  Fp8Kv kv;
  kv.k = k;
  kv.v = v;
  kv.block_size = static_cast<int32_t>(block_size);
  kv.block_shift = block_shift_of(block_size);
  kv.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  kv.head_dim = static_cast<int32_t>(head_dim);
  kv.num_blocks = num_blocks;
  kv.block_bytes = block_size * fp8_row_bytes(block_size, num_kv_heads, head_dim);
  kv.exp_start = block_size * num_kv_heads * head_dim;
  kv.page_indptr = page_indptr;
  kv.page_indices = page_indices;
  return kv;
}

// Copy-on-write: block `src`'s K/V (every layer) is copied into block `dst`
// before the step that writes `dst`.
struct BlockCopy {
  int32_t src = 0;
  int32_t dst = 0;
};

}  // namespace pagedrt
