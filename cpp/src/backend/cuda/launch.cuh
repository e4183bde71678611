// backend/cuda/launch.cuh — kernel launches with programmatic dependent launch
// (PDL, sm_90).
//
// A kernel launched with launch() may start before the kernel ahead of it in
// the stream has finished: as soon as every block of that one has passed
// pdl_trigger() (or exited). It must call pdl_wait() before it reads anything
// an earlier kernel writes, or writes anything an earlier kernel reads. Every
// kernel of a decode step triggers first thing, so a chain of small kernels
// (norm, attention) lets the next GEMV start early: its weights do not
// depend on anything, so it loads its first two chunks of them while the
// small kernels run (gemv.cu), and the ~1-3 us of launch and ramp-up between
// consecutive kernels of a batch-1 step mostly disappear. A waiting kernel's
// blocks hold their SM slots, but only after the kernel ahead is fully
// resident (it has triggered), so nothing can starve it. pdl_wait() returns
// at once in a kernel launched without PDL.
//
// Before pdl_wait(), read only what no step writes (weights, norm weights,
// RoPE tables). The step's own uploads are not safe there although they
// precede its first kernel: in replays of recorded steps (CUDA graphs),
// decode attention reading its plan and page table before the wait saw the
// previous step's values.
//
// PAGEDRT_CUDA_PDL=0 in the environment when the backend is made launches
// everything plainly (for A/B runs); set_pdl() is called by the backend.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "backend/cuda/cuda_check.hpp"

namespace pagedrt::cuda {

void set_pdl(bool on);
bool pdl_enabled();

// kernel<<<grid, block, smem, stream>>>(args...), with PDL when enabled, in
// thread block clusters of (1, 1, cluster_z) blocks when cluster_z > 1
// (sm_90; grid.z a multiple of cluster_z).
template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, unsigned cluster_z,
                     cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl_enabled()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_z > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = 1;
    attr[n].val.clusterDim.y = 1;
    attr[n++].val.clusterDim.z = cluster_z;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = n;
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  launch_clusters(kernel, grid, block, smem, 1, stream, std::forward<Args>(args)...);
}

// Waits until the kernels ahead in the stream have finished and their writes
// are visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream be scheduled (it still waits for this
// one's completion in its own pdl_wait()).
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

}  // namespace pagedrt::cuda
