// backend/hd.hpp — PAGEDRT_HD: a function both the host and CUDA kernels call
// (__host__ __device__ under nvcc, plain inline elsewhere).
#pragma once

#if defined(__CUDACC__)
#define PAGEDRT_HD __host__ __device__ __forceinline__
#else
#define PAGEDRT_HD inline
#endif
