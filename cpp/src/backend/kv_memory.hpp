// backend/kv_memory.hpp — KV tensors whose memory comes and goes in chunks.
//
// An elastic KV pool reserves the address range of every K and V tensor
// once, at its full size, and backs it with memory a chunk of blocks at a
// time (the block pool maps chunks as it hands out blocks, and gives unused
// ones back after a while without work: engine/block_pool.hpp). The
// tensors' addresses never move, so kernels, recorded CUDA graphs and TMA
// descriptors see one fixed pool.
//
//   tensor i (count of them, shape (num_blocks, ...)):
//     [ chunk 0 | chunk 1 | ... ]   chunk c: blocks [c * chunk_blocks, (c + 1) * chunk_blocks)
//
// CUDA: virtual memory management (cuMemAddressReserve, then cuMemCreate +
// cuMemMap per chunk and tensor; backend/cuda/kv_memory.hpp). CPU: anonymous
// mappings whose pages arrive on first touch; an unmapped chunk is PROT_NONE
// (a stray read or write of it faults, as on the GPU, so the CPU tests catch
// one) and unmapping hands its pages back (madvise MADV_DONTNEED).
#pragma once

#include <cstdint>
#include <vector>

#include "backend/tensor.hpp"

namespace pagedrt {

class KvMemory {
 public:
  virtual ~KvMemory() = default;
  KvMemory(const KvMemory&) = delete;
  KvMemory& operator=(const KvMemory&) = delete;

  // The reserved tensors, each (num_blocks, ...) as asked; only mapped
  // chunks may be read or written.
  const std::vector<Tensor>& tensors() const { return tensors_; }
  int64_t chunk_blocks() const { return chunk_blocks_; }
  int64_t num_chunks() const { return (num_blocks_ + chunk_blocks_ - 1) / chunk_blocks_; }
  // Backs chunk c of every tensor with memory; false, with nothing changed,
  // when the device has none to give now.
  virtual bool map(int64_t chunk) = 0;
  // Gives chunk c's memory back (its contents are lost). The caller makes
  // sure that nothing queued still reads or writes it.
  virtual void unmap(int64_t chunk) = 0;

  // Blocks per chunk: each tensor's share a multiple of `granularity`
  // bytes, and the chunk (all `count` tensors) at least `target_bytes`.
  static int64_t chunk_blocks_for(int64_t block_bytes, int64_t granularity, int64_t count, int64_t target_bytes);

 protected:
  KvMemory() = default;
  // Sets num_blocks_ and chunk_blocks_ for `count` tensors of `shape` in
  // chunks of granules of `granularity` bytes (chunk_blocks_for); returns a
  // block's bytes in one tensor.
  int64_t set_geometry(const std::vector<int64_t>& shape, ScalarType dtype, int64_t granularity, int64_t count,
                       int64_t target_bytes);
  std::vector<Tensor> tensors_;
  int64_t num_blocks_ = 0;
  int64_t chunk_blocks_ = 1;
};

// Host memory (the CPU backend's reserve_kv).
class HostKvMemory final : public KvMemory {
 public:
  // `count` tensors of `shape` and `dtype`; chunks of at least `target_bytes`.
  HostKvMemory(const std::vector<int64_t>& shape, ScalarType dtype, int64_t count, int64_t target_bytes);
  ~HostKvMemory() override;
  bool map(int64_t chunk) override;  // readable and writable; pages arrive as they are touched
  void unmap(int64_t chunk) override;

 private:
  bool protect(int64_t chunk, int prot);
  std::vector<void*> bases_;
  size_t reserved_ = 0;  // bytes per tensor
  int64_t block_bytes_ = 0;
};

}  // namespace pagedrt
