#include "model/kv_cache.hpp"

#include "pagedrt/error.hpp"

namespace pagedrt {

int64_t KvCache::block_bytes(const Backend& backend, const LlamaConfig& cfg, int64_t block_size) {
  const int64_t per_layer = block_size * cfg.num_kv_heads * cfg.head_dim *
                            static_cast<int64_t>(scalar_size(backend.kv_dtype()));  // K or V
  return per_layer * 2 * cfg.num_layers;
}

KvCache KvCache::allocate(Backend& backend, const LlamaConfig& cfg, int64_t block_size,
                          int64_t budget_bytes) {
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
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    std::vector<int64_t> shape = {kv.num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim};
    kv.k.push_back(backend.empty(shape, dtype));
    kv.v.push_back(backend.empty(shape, dtype));
  }
  return kv;
}

}  // namespace pagedrt
