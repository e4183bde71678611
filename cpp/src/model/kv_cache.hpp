// model/kv_cache.hpp — the paged KV storage, taken once at start-up.
//
//   per layer l:  k[l], v[l]: (num_blocks, block_size, num_kv_heads, head_dim)
//   in the backend's kv_dtype() (the activations' dtype), or with fp8 KV
//   (num_blocks, block_size, row_bytes) bytes (backend/paged_kv.hpp's Fp8Kv)
//
// Which block belongs to which sequence is the BlockPool's and the block
// tables' business; this is only the memory. An elastic cache (`memory` set)
// reserves the tensors' address ranges and maps them in chunks of blocks
// (backend/kv_memory.hpp): chunk 0 at start, the rest as the block pool
// needs them.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.hpp"
#include "model/llama_config.hpp"

namespace pagedrt {

struct KvCache {
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t bytes_per_block = 0;  // all layers, K and V
  std::vector<Tensor> k;        // (num_layers) of (num_blocks, block_size, Hkv, D) or fp8 bytes
  std::vector<Tensor> v;
  std::shared_ptr<KvMemory> memory;  // elastic: the tensors' memory, chunk 0 mapped; else null

  // Bytes of one block of `block_size` tokens, all layers, K and V.
  static int64_t block_bytes(const Backend& backend, const LlamaConfig& cfg, int64_t block_size);
  // As many blocks as fit in `budget_bytes` (at least one). Throws
  // Error(InvalidArgument) if not even one block fits. `elastic`: reserved
  // and mapped in chunks of at least `chunk_bytes` (0: 1/64 of the budget,
  // at least 64 MiB; PAGEDRT_KV_CHUNK_BYTES overrides it), else taken whole.
  static KvCache allocate(Backend& backend, const LlamaConfig& cfg, int64_t block_size,
                          int64_t budget_bytes, bool elastic = false, int64_t chunk_bytes = 0);
};

}  // namespace pagedrt
