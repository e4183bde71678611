#include "model/kv_cache.hpp"

#include <algorithm>
#include <cstdlib>

#include "pagedrt/error.hpp"

namespace pagedrt {

namespace {

// One block of one layer's K (or V) cache: (block_size, row) elements.
std::vector<int64_t> block_shape(ScalarType dtype, const LlamaConfig& cfg, int64_t block_size) {
  if (dtype == ScalarType::F8E4M3) {
    if (!fp8_block_size_ok(block_size))
      throw Error(ErrorKind::InvalidArgument, "kv_cache_dtype 'fp8' needs a block_size that is a power of two or "
                                              "a multiple of 16, got " + std::to_string(block_size));
    return {block_size, fp8_row_bytes(block_size, cfg.num_kv_heads, cfg.head_dim)};  // paged_kv.hpp's Fp8Kv
  }
  return {block_size, cfg.num_kv_heads, cfg.head_dim};
}

}  // namespace

int64_t KvCache::block_bytes(const Backend& backend, const LlamaConfig& cfg, int64_t block_size) {
  int64_t per_layer = static_cast<int64_t>(scalar_size(backend.kv_dtype()));  // K or V
  for (int64_t d : block_shape(backend.kv_dtype(), cfg, block_size)) per_layer *= d;
  return per_layer * 2 * cfg.num_layers;
}

KvCache KvCache::allocate(Backend& backend, const LlamaConfig& cfg, int64_t block_size,
                          int64_t budget_bytes, bool elastic, int64_t chunk_bytes) {
  KvCache kv;
  kv.block_size = block_size;
  const ScalarType dtype = backend.kv_dtype();
  kv.bytes_per_block = block_bytes(backend, cfg, block_size);
  kv.num_blocks = budget_bytes / kv.bytes_per_block;
  if (kv.num_blocks < 1)
    throw Error(ErrorKind::InvalidArgument,
                "kv_cache_bytes=" + std::to_string(budget_bytes) + " holds no KV block (one block of " +
                    std::to_string(block_size) + " tokens needs " + std::to_string(kv.bytes_per_block) +
                    " bytes for this model)");
  std::vector<int64_t> shape = block_shape(dtype, cfg, block_size);
  shape.insert(shape.begin(), kv.num_blocks);
  if (elastic) {
    if (const char* env = std::getenv("PAGEDRT_KV_CHUNK_BYTES")) chunk_bytes = std::atoll(env);
    if (chunk_bytes <= 0) chunk_bytes = std::max<int64_t>(64ll << 20, kv.num_blocks * kv.bytes_per_block / 64);
    kv.memory = backend.reserve_kv(shape, dtype, 2 * cfg.num_layers, chunk_bytes);
  }
  if (!kv.memory) {
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      kv.k.push_back(backend.empty(shape, dtype));
      kv.v.push_back(backend.empty(shape, dtype));
    }
    return kv;
  }
  if (!kv.memory->map(0))
    throw Error(ErrorKind::Runtime, "out of device memory mapping the KV pool's first chunk (" +
                                        std::to_string(kv.memory->chunk_blocks()) + " blocks)");
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    for (int which = 0; which < 2; ++which) {
      Tensor t = kv.memory->tensors()[static_cast<size_t>(2 * l + which)];
      t.storage = std::shared_ptr<void>(kv.memory, t.data);  // the tensors keep the memory alive
      (which == 0 ? kv.k : kv.v).push_back(std::move(t));
    }
  }
  return kv;
}

}  // namespace pagedrt
