// backend/cuda/cuda_check.hpp — every CUDA, cuBLAS and launch error becomes a
// pagedrt::Error naming the call, the file and the line. Nothing aborts.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "pagedrt/error.hpp"

namespace pagedrt::cuda {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  throw Error(ErrorKind::Runtime, std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                                      cudaGetErrorString(err) + ") in " + what + " at " + file + ":" +
                                      std::to_string(line));
}

[[noreturn]] inline void throw_cublas(cublasStatus_t st, const char* what, const char* file, int line) {
  throw Error(ErrorKind::Runtime, std::string("cuBLAS error ") + std::to_string(static_cast<int>(st)) +
                                      " in " + what + " at " + file + ":" + std::to_string(line));
}

// A backend precondition a caller broke (dtypes, shapes): an InvalidArgument.
inline void require(bool ok, const std::string& msg) {
  if (!ok) throw Error(ErrorKind::InvalidArgument, "cuda backend: " + msg);
}

inline size_t align16(size_t n) { return (n + 15) / 16 * 16; }

}  // namespace pagedrt::cuda

#define CUDA_CHECK(call)                                                              \
  do {                                                                                \
    cudaError_t err_ = (call);                                                        \
    if (err_ != cudaSuccess) ::pagedrt::cuda::throw_cuda(err_, #call, __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(call)                                                                \
  do {                                                                                    \
    cublasStatus_t st_ = (call);                                                          \
    if (st_ != CUBLAS_STATUS_SUCCESS) ::pagedrt::cuda::throw_cublas(st_, #call, __FILE__, __LINE__); \
  } while (0)

// After every kernel launch: a bad launch configuration shows here, not later.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

namespace pagedrt::cuda {

// A driver API function through the runtime (cudaGetDriverEntryPointByVersion:
// no -lcuda); an Error naming it and what it is `for` where the driver has none.
template <typename F>
F driver_function(const char* name, const char* for_what) {
  void* f = nullptr;
  cudaDriverEntryPointQueryResult found{};
  CUDA_CHECK(cudaGetDriverEntryPointByVersion(name, &f, 12000, cudaEnableDefault, &found));
  if (found != cudaDriverEntryPointSuccess || f == nullptr)
    throw Error(ErrorKind::Runtime, std::string("the CUDA driver has no ") + name + " (" + for_what + ")");
  return reinterpret_cast<F>(f);
}

}  // namespace pagedrt::cuda
