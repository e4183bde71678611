// backend/cuda/nccl.hpp — tensor parallelism's collectives over NCCL, one GPU
// a rank (backend/collectives.hpp), for ranks on CUDA backends.
//
// NCCL is loaded at run time (dlopen): PAGEDRT_NCCL_LIBRARY if set (the
// Python package sets it to the nvidia-nccl wheel's library when that is
// installed), else libnccl.so.2 from the loader's path. pagedrt builds and
// runs without it; only tensor_parallel_size > 1 on CUDA needs it. The few
// declarations used are NCCL's stable C ABI (nccl.h), written out here so
// that the build needs no NCCL headers.
//
// All ranks' communicators come from one ncclCommInitAll in this process;
// each rank's thread issues its own rank's calls on its backend's stream (so
// they are captured with the rest of a recorded step, Backend::run_step).
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <vector>

#include "backend/collectives.hpp"

namespace pagedrt::cuda {

class CudaBackend;

// The collectives of `ranks` (rank r's backend at r, each on its own GPU).
// Throws Error(Unsupported) naming the library when NCCL cannot be loaded,
// Error(Runtime) with NCCL's message when its set-up fails.
std::vector<std::unique_ptr<Collectives>> nccl_collectives(const std::vector<CudaBackend*>& ranks);

}  // namespace pagedrt::cuda
