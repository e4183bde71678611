// backend/cuda/cuda_factory.hpp — what the rest of the core sees of the CUDA
// backend: no CUDA types, so backend.cpp compiles with or without the toolkit.
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.hpp"
#include "backend/collectives.hpp"

namespace pagedrt::cuda {

// GPUs visible to this process (0 when the driver or a device is missing).
int device_count();
// A backend on GPU `device_index` of those visible (-1: the current device);
// throws Error(Unsupported) when no GPU is visible. activation_dtype: BF16
// (the fast path) or F32 (fp32 weights, activations and KV: the validation mode).
// deterministic: the batch-invariant mode (CudaBackend).
std::unique_ptr<Backend> make_backend(ScalarType activation_dtype, int device_index = -1,
                                      bool deterministic = false);
// The collectives of tensor-parallel ranks on CUDA backends (ranks[r]: rank
// r's, a GPU each), over NCCL loaded at run time (backend/cuda/nccl.hpp).
std::vector<std::unique_ptr<Collectives>> make_collectives(const std::vector<Backend*>& ranks);

}  // namespace pagedrt::cuda
