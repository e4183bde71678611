#include "backend/factory.hpp"

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/gemm.hpp"
#include "pagedrt/error.hpp"

#ifdef PAGEDRT_WITH_CUDA
#include "backend/cuda/cuda_factory.hpp"
#endif

namespace pagedrt {

bool cuda_available() {
#ifdef PAGEDRT_WITH_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

ScalarType auto_activation_dtype(const std::string& device, ScalarType weight_dtype) {
  if (device == "cuda") return ScalarType::BF16;
  return weight_dtype == ScalarType::BF16 && cpu::gemm_variant() == "avx512bf16" ? ScalarType::BF16
                                                                                 : ScalarType::F32;
}

std::string cpu_gemm_info() { return cpu::gemm_variant() + ", prefetch " + cpu::gemm_prefetch_name(); }

bool cuda_built() {
#ifdef PAGEDRT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads,
                                      ScalarType activation_dtype, bool deterministic) {
  if (device == "cpu") return std::make_unique<cpu::CpuBackend>(num_threads, activation_dtype, deterministic);
  if (device == "cuda") {
#ifdef PAGEDRT_WITH_CUDA
    return cuda::make_backend(activation_dtype);
#else
    throw Error(ErrorKind::Unsupported,
                "device 'cuda': this pagedrt build has no CUDA backend (rebuild with the CUDA "
                "toolkit and PAGEDRT_CUDA=ON)");
#endif
  }
  throw Error(ErrorKind::InvalidArgument,
              "device '" + device + "' is not known (use \"auto\", \"cpu\" or \"cuda\")");
}

}  // namespace pagedrt
