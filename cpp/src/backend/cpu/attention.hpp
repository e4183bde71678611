// backend/cpu/attention.hpp — RoPE + KV-cache write, and paged attention.
//
// Element type T of the activations and the cache: float, or uint16_t holding
// bf16 bits (the CPU backend's bfloat16 mode). Arithmetic is fp32 either way;
// bf16 values are rounded (to nearest even) only where they are stored.
#pragma once

#include <cstdint>

#include "backend/backend.hpp"

namespace pagedrt::cpu {

struct AttentionShape {
  int64_t num_heads = 0;     // H
  int64_t num_kv_heads = 0;  // Hkv
  int64_t head_dim = 0;      // D
  int64_t block_size = 0;
};

// qkv: (num_tokens, (H + 2 Hkv) D); cos/sin: (max_positions, D / 2);
// k_cache/v_cache: (num_blocks, block_size, Hkv, D).
template <typename T>
void rope_and_cache(const BatchView& b, T* qkv, const float* cos, const float* sin,
                    const AttentionShape& s, T* k_cache, T* v_cache, int threads);

// out: (num_tokens, H D). Token t of sequence i attends to positions
// 0 .. positions[t] of sequence i, read through the page table. The work is
// split over `threads` as (tile of a sequence's query tokens, kv head) items.
template <typename T>
void paged_attention(const BatchView& b, const T* qkv, const T* k_cache, const T* v_cache,
                     const AttentionShape& s, float scale, T* out, int threads);

}  // namespace pagedrt::cpu
