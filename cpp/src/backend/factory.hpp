// backend/factory.hpp — which backends this build has, and making one.
#pragma once

#include <memory>
#include <string>

#include "backend/backend.hpp"

namespace pagedrt {

// `device` is "cpu" or "cuda"; throws Error(Unsupported) for a device this
// build lacks. activation_dtype: F32 or BF16 (both devices; on CUDA, F32 is
// the all-fp32 validation mode). `num_threads` <= 0 means all cores.
// deterministic (CPU): batch-invariant kernels (CpuBackend); CUDA ignores it
// (the Runtime refuses deterministic=True there).
std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads,
                                      ScalarType activation_dtype, bool deterministic = true);

// activation_dtype "auto": bf16 on CUDA; on the CPU bf16 when the weights
// are bf16 and the processor multiplies bf16 natively (AVX-512 BF16: twice
// the GEMM rate of fp32 FMA), fp32 otherwise (the exact oracle).
ScalarType auto_activation_dtype(const std::string& device, ScalarType weight_dtype);

bool cuda_built();      // this build has the CUDA backend
bool cuda_available();  // ... and a GPU is visible

}  // namespace pagedrt
