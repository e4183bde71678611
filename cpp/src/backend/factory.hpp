// backend/factory.hpp — which backends this build has, and making one.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backend/backend.hpp"
#include "backend/collectives.hpp"

namespace pagedrt {

// `device` is "cpu" or "cuda"; throws Error(Unsupported) for a device this
// build lacks. activation_dtype: F32 or BF16 (both devices; on CUDA, F32 is
// the all-fp32 validation mode). `num_threads` <= 0 means all cores.
// deterministic: batch-invariant kernels (CpuBackend; CudaBackend's mode, which
// the Runtime asks for only with bf16 or fp32 weights and a bf16 or fp32 cache).
// device_index (CUDA): the GPU of those visible, -1 the current one (the CPU ignores it).
std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads,
                                      ScalarType activation_dtype, bool deterministic = true, int device_index = -1);

// The collectives of a tensor-parallel model's ranks (ranks[r]: rank r's
// backend): in memory for CPU backends (a HostGroup, which `group` keeps
// alive), over NCCL for CUDA ones (backend/cuda/nccl.hpp; `group` stays empty).
std::vector<std::unique_ptr<Collectives>> make_collectives(const std::string& device,
                                                           const std::vector<Backend*>& ranks,
                                                           std::shared_ptr<void>& group);

// activation_dtype "auto": bf16 on CUDA; on the CPU bf16 when the weights
// are bf16 and the processor multiplies bf16 natively (AVX-512 BF16: twice
// the GEMM rate of fp32 FMA), fp32 otherwise (the exact oracle).
ScalarType auto_activation_dtype(const std::string& device, ScalarType weight_dtype);

// deterministic unset (RuntimeConfig::deterministic): on where the
// batch-invariant kernels cost nothing measurable (issue 22's rule: < 2%),
// i.e. on the CPU, but for bf16 activations with bf16 or fp8 weights on a
// processor with AMX, where deterministic=False multiplies steps of 5 tokens
// or more and prefill attention on AMX tiles (cpu/gemm.hpp,
// cpu/attention_amx.cpp: 3.4x the prefill rate, 2.4x batched decode on a
// 2-core Xeon VM) and the batch-invariant kernels cannot; off on CUDA (1.4x
// batch-1 TPOT there: docs/determinism.md).
bool auto_deterministic(const std::string& device, ScalarType weight_dtype, ScalarType activation_dtype,
                        bool fp8_weights);

bool cuda_built();      // this build has the CUDA backend
bool cuda_available();  // ... and a GPU is visible
int cuda_device_count();  // the GPUs visible (0 without the CUDA backend)

}  // namespace pagedrt
