// backend/cpu/attention.hpp — RoPE + KV-cache write, and paged attention, fp32.
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
void rope_and_cache(const BatchView& b, float* qkv, const float* cos, const float* sin,
                    const AttentionShape& s, float* k_cache, float* v_cache, int threads);

// out: (num_tokens, H D). Token t of sequence i attends to positions
// 0 .. positions[t] of sequence i, read through the page table.
void paged_attention(const BatchView& b, const float* qkv, const float* k_cache,
                     const float* v_cache, const AttentionShape& s, float scale, float* out,
                     int threads);

}  // namespace pagedrt::cpu
