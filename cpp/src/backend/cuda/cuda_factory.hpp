// backend/cuda/cuda_factory.hpp — what the rest of the core sees of the CUDA
// backend: no CUDA types, so backend.cpp compiles with or without the toolkit.
#pragma once

#include <memory>

#include "backend/backend.hpp"

namespace pagedrt::cuda {

// GPUs visible to this process (0 when the driver or a device is missing).
int device_count();
// A backend on the current device; throws Error(Unsupported) when no GPU is
// visible. activation_dtype: BF16 (the fast path) or F32 (fp32 weights,
// activations and KV: the validation mode).
std::unique_ptr<Backend> make_backend(ScalarType activation_dtype);

}  // namespace pagedrt::cuda
