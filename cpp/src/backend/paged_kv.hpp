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
#pragma once

#include <cstdint>

namespace pagedrt {

// Copy-on-write: block `src`'s K/V (every layer) is copied into block `dst`
// before the step that writes `dst`.
struct BlockCopy {
  int32_t src = 0;
  int32_t dst = 0;
};

}  // namespace pagedrt
