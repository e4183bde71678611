#include "backend/factory.hpp"

#include "backend/cpu/cpu_backend.hpp"
#include "backend/cpu/gemm.hpp"
#include "pagedrt/error.hpp"

#ifdef PAGEDRT_WITH_CUDA
#include "backend/cuda/cuda_factory.hpp"
#endif

namespace pagedrt {

bool cuda_available() { return cuda_device_count() > 0; }

int cuda_device_count() {
#ifdef PAGEDRT_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

ScalarType auto_activation_dtype(const std::string& device, ScalarType weight_dtype) {
  if (device == "cuda") return ScalarType::BF16;
  return weight_dtype == ScalarType::BF16 && cpu::gemm_bf16_native() ? ScalarType::BF16 : ScalarType::F32;
}

bool auto_deterministic(const std::string& device, ScalarType weight_dtype, ScalarType activation_dtype,
                        bool fp8_weights) {
  if (device != "cpu") return false;
  const bool amx_would_run = activation_dtype == ScalarType::BF16 &&
                             (weight_dtype == ScalarType::BF16 || fp8_weights) && cpu::gemm_amx_for_large_steps();
  return !amx_would_run;
}

std::string cpu_gemm_info() {
  return cpu::gemm_variant() + (cpu::packs_bf16_rows(32) ? " (packed weights)" : "") + ", prefetch " +
         cpu::gemm_prefetch_name();
}

bool cuda_built() {
#ifdef PAGEDRT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads,
                                      ScalarType activation_dtype, bool deterministic, int device_index) {
  if (device == "cpu") return std::make_unique<cpu::CpuBackend>(num_threads, activation_dtype, deterministic);
  if (device == "cuda") {
#ifdef PAGEDRT_WITH_CUDA
    return cuda::make_backend(activation_dtype, device_index, deterministic);
#else
    throw Error(ErrorKind::Unsupported,
                "device 'cuda': this pagedrt build has no CUDA backend (rebuild with the CUDA "
                "toolkit and PAGEDRT_CUDA=ON)");
#endif
  }
  throw Error(ErrorKind::InvalidArgument,
              "device '" + device + "' is not known (use \"auto\", \"cpu\" or \"cuda\")");
}

std::vector<std::unique_ptr<Collectives>> make_collectives(const std::string& device,
                                                           const std::vector<Backend*>& ranks,
                                                           std::shared_ptr<void>& group) {
  if (device == "cuda") {
#ifdef PAGEDRT_WITH_CUDA
    return cuda::make_collectives(ranks);
#else
    throw Error(ErrorKind::Unsupported, "device 'cuda': this pagedrt build has no CUDA backend");
#endif
  }
  auto host = std::make_shared<HostGroup>(static_cast<int>(ranks.size()));
  std::vector<std::unique_ptr<Collectives>> comms;
  for (size_t r = 0; r < ranks.size(); ++r) comms.push_back(host->rank(static_cast<int>(r)));
  group = host;
  return comms;
}

}  // namespace pagedrt
