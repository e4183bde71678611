#include "backend/cuda/kv_memory.hpp"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt::cuda {
namespace {

template <typename F>
F driver(const char* name) {
  return driver_function<F>(name, "virtual memory management");
}

struct Vmm {
  PFN_cuMemGetAllocationGranularity_v10020 granularity = driver<PFN_cuMemGetAllocationGranularity_v10020>("cuMemGetAllocationGranularity");
  PFN_cuMemAddressReserve_v10020 reserve = driver<PFN_cuMemAddressReserve_v10020>("cuMemAddressReserve");
  PFN_cuMemAddressFree_v10020 free = driver<PFN_cuMemAddressFree_v10020>("cuMemAddressFree");
  PFN_cuMemCreate_v10020 create = driver<PFN_cuMemCreate_v10020>("cuMemCreate");
  PFN_cuMemRelease_v10020 release = driver<PFN_cuMemRelease_v10020>("cuMemRelease");
  PFN_cuMemMap_v10020 map = driver<PFN_cuMemMap_v10020>("cuMemMap");
  PFN_cuMemUnmap_v10020 unmap = driver<PFN_cuMemUnmap_v10020>("cuMemUnmap");
  PFN_cuMemSetAccess_v10020 access = driver<PFN_cuMemSetAccess_v10020>("cuMemSetAccess");
};

const Vmm& vmm() {
  static const Vmm v;
  return v;
}

CUmemAllocationProp device_prop(int device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  return prop;
}

void check(CUresult r, const char* what, size_t bytes) {
  if (r != CUDA_SUCCESS)
    throw Error(ErrorKind::Runtime, std::string(what) + " failed (CUresult " + std::to_string(int(r)) + ") for " +
                                        std::to_string(bytes) + " bytes of the KV pool");
}

}  // namespace

DeviceKvMemory::DeviceKvMemory(int device, const std::vector<int64_t>& shape, ScalarType dtype, int64_t count,
                               int64_t target_bytes)
    : device_(device) {
  const Vmm& v = vmm();
  const CUmemAllocationProp prop = device_prop(device);
  size_t gran = 0;
  check(v.granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity", 0);
  const int64_t block_bytes = set_geometry(shape, dtype, static_cast<int64_t>(gran), count, target_bytes);
  gran_ = gran;
  chunk_bytes_ = static_cast<size_t>(chunk_blocks_ * block_bytes);
  tensor_bytes_ = static_cast<size_t>(num_blocks_ * block_bytes);
  reserved_ = static_cast<size_t>(num_chunks()) * chunk_bytes_;  // address space: whole chunks
  handles_.assign(static_cast<size_t>(num_chunks() * count), 0);
  for (int64_t i = 0; i < count; ++i) {
    CUdeviceptr p = 0;
    const CUresult r = v.reserve(&p, reserved_, 0, 0, 0);
    if (r != CUDA_SUCCESS) {
      for (unsigned long long b : bases_) v.free(b, reserved_);
      check(r, "cuMemAddressReserve", reserved_);
    }
    bases_.push_back(p);
    Tensor t;
    t.shape = shape;
    t.dtype = dtype;
    t.device = Device::CUDA;
    t.data = reinterpret_cast<void*>(p);
    tensors_.push_back(std::move(t));
  }
}

DeviceKvMemory::~DeviceKvMemory() {
  int current = device_;
  cudaGetDevice(&current);
  cudaSetDevice(device_);   // a tensor-parallel rank's pool may go on another rank's thread
  cudaDeviceSynchronize();  // nothing queued may touch the pool past here
  for (int64_t c = 0; c < num_chunks(); ++c)
    for (size_t i = 0; i < bases_.size(); ++i) unmap_tensor(c, i);
  for (unsigned long long b : bases_) vmm().free(b, reserved_);
  cudaSetDevice(current);
}

size_t DeviceKvMemory::bytes_of(int64_t chunk) const {
  const size_t from = static_cast<size_t>(chunk) * chunk_bytes_;
  const size_t held = std::min(chunk_bytes_, tensor_bytes_ - from);
  return (held + gran_ - 1) / gran_ * gran_;  // whole granules
}

void DeviceKvMemory::unmap_tensor(int64_t chunk, size_t i) {
  unsigned long long& h = handles_[static_cast<size_t>(chunk) * bases_.size() + i];
  if (h == 0) return;
  vmm().unmap(bases_[i] + static_cast<size_t>(chunk) * chunk_bytes_, bytes_of(chunk));
  vmm().release(h);
  h = 0;
}

bool DeviceKvMemory::map(int64_t chunk) {
  const Vmm& v = vmm();
  const CUmemAllocationProp prop = device_prop(device_);
  CUmemAccessDesc access{};
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  const size_t bytes = bytes_of(chunk);
  for (size_t i = 0; i < bases_.size(); ++i) {
    const CUdeviceptr at = bases_[i] + static_cast<size_t>(chunk) * chunk_bytes_;
    CUmemGenericAllocationHandle h = 0;
    CUresult r = v.create(&h, bytes, &prop, 0);
    if (r == CUDA_SUCCESS) {
      r = v.map(at, bytes, 0, h, 0);
      if (r != CUDA_SUCCESS) v.release(h);
    }
    if (r == CUDA_SUCCESS) {
      handles_[static_cast<size_t>(chunk) * bases_.size() + i] = h;
      r = v.access(at, bytes, &access, 1);
    }
    if (r != CUDA_SUCCESS) {  // out of memory (or refused): undo this chunk, the pool is full for now
      for (size_t j = 0; j <= i; ++j) unmap_tensor(chunk, j);
      return false;
    }
  }
  return true;
}

void DeviceKvMemory::unmap(int64_t chunk) {
  for (size_t i = 0; i < bases_.size(); ++i) unmap_tensor(chunk, i);
}

std::unique_ptr<KvMemory> CudaBackend::reserve_kv(const std::vector<int64_t>& shape, ScalarType dtype, int64_t count,
                                                  int64_t chunk_bytes) {
  const int device = device_;  // this backend's GPU (a tensor-parallel rank's), whatever is current
  int vmm_supported = 0;
  const auto attribute = driver<PFN_cuDeviceGetAttribute_v2000>("cuDeviceGetAttribute");
  if (attribute(&vmm_supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device) != CUDA_SUCCESS ||
      !vmm_supported)
    return nullptr;  // (some virtual GPUs) the pool is taken whole
  return std::make_unique<DeviceKvMemory>(device, shape, dtype, count, chunk_bytes);
}

}  // namespace pagedrt::cuda
