#include "backend/kv_memory.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <numeric>
#include <string>

#include "pagedrt/error.hpp"

namespace pagedrt {

int64_t KvMemory::chunk_blocks_for(int64_t block_bytes, int64_t granularity, int64_t count, int64_t target_bytes) {
  const int64_t base = granularity / std::gcd(granularity, block_bytes);  // blocks: a whole number of granules
  const int64_t chunk_bytes = base * block_bytes * count;
  const int64_t times = std::max<int64_t>(1, (target_bytes + chunk_bytes - 1) / chunk_bytes);
  return base * times;
}

int64_t KvMemory::set_geometry(const std::vector<int64_t>& shape, ScalarType dtype, int64_t granularity,
                               int64_t count, int64_t target_bytes) {
  int64_t block_bytes = static_cast<int64_t>(scalar_size(dtype));
  for (size_t i = 1; i < shape.size(); ++i) block_bytes *= shape[i];
  num_blocks_ = shape[0];
  chunk_blocks_ = chunk_blocks_for(block_bytes, granularity, count, target_bytes);
  return block_bytes;
}

HostKvMemory::HostKvMemory(const std::vector<int64_t>& shape, ScalarType dtype, int64_t count,
                           int64_t target_bytes) {
  const int64_t page = sysconf(_SC_PAGESIZE);
  block_bytes_ = set_geometry(shape, dtype, page, count, target_bytes);
  reserved_ = static_cast<size_t>(num_blocks_ * block_bytes_ + page - 1) / page * page;
  for (int64_t i = 0; i < count; ++i) {
    void* p = mmap(nullptr, reserved_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      const std::string why = std::strerror(errno);
      for (void* q : bases_) munmap(q, reserved_);
      throw Error(ErrorKind::Runtime, "out of host address space reserving a KV tensor of " +
                                          std::to_string(reserved_) + " bytes (" + why + ")");
    }
    bases_.push_back(p);
    Tensor t;
    t.shape = shape;
    t.dtype = dtype;
    t.device = Device::CPU;
    t.data = p;
    tensors_.push_back(std::move(t));  // no storage: the memory is this object's (KvCache ties them)
  }
}

HostKvMemory::~HostKvMemory() {
  for (void* p : bases_) munmap(p, reserved_);
  bases_.clear();
}

bool HostKvMemory::protect(int64_t chunk, int prot) {
  const size_t from = static_cast<size_t>(chunk * chunk_blocks_ * block_bytes_);
  const size_t to = std::min(reserved_, static_cast<size_t>((chunk + 1) * chunk_blocks_ * block_bytes_));
  bool ok = true;
  for (void* p : bases_) {
    if (prot == PROT_NONE) madvise(static_cast<char*>(p) + from, to - from, MADV_DONTNEED);
    ok = mprotect(static_cast<char*>(p) + from, to - from, prot) == 0 && ok;
  }
  return ok;
}

bool HostKvMemory::map(int64_t chunk) {
  if (protect(chunk, PROT_READ | PROT_WRITE)) return true;
  protect(chunk, PROT_NONE);  // all or nothing
  return false;
}

void HostKvMemory::unmap(int64_t chunk) { protect(chunk, PROT_NONE); }

}  // namespace pagedrt
