// backend/cuda/kv_memory.hpp — the elastic KV pool's GPU memory (KvMemory,
// backend/kv_memory.hpp) through CUDA virtual memory management: each
// tensor's address range reserved once (cuMemAddressReserve), and per chunk
// and tensor a physical allocation (cuMemCreate) mapped into it (cuMemMap,
// cuMemSetAccess) or unmapped and released. The driver's functions come
// through the runtime (cudaGetDriverEntryPointByVersion: no -lcuda).
#pragma once

#include <cstdint>
#include <vector>

#include "backend/kv_memory.hpp"

namespace pagedrt::cuda {

class DeviceKvMemory final : public KvMemory {
 public:
  // `count` tensors of `shape` and `dtype` on `device`; chunks of at least `target_bytes`.
  DeviceKvMemory(int device, const std::vector<int64_t>& shape, ScalarType dtype, int64_t count, int64_t target_bytes);
  ~DeviceKvMemory() override;
  bool map(int64_t chunk) override;
  void unmap(int64_t chunk) override;

 private:
  void unmap_tensor(int64_t chunk, size_t i);
  size_t bytes_of(int64_t chunk) const;  // the chunk's mapping per tensor: the last holds only its blocks
  int device_ = 0;
  std::vector<unsigned long long> bases_;  // CUdeviceptr per tensor
  std::vector<unsigned long long> handles_;  // (chunks, count) CUmemGenericAllocationHandle; 0: unmapped
  size_t reserved_ = 0;   // bytes per tensor (whole granules)
  size_t chunk_bytes_ = 0;  // bytes per tensor and chunk
  size_t tensor_bytes_ = 0;  // the blocks' bytes per tensor
  size_t gran_ = 0;
};

}  // namespace pagedrt::cuda
