#include "backend/backend.hpp"

#include "backend/cpu/cpu_backend.hpp"
#include "pagedrt/error.hpp"

namespace pagedrt {

std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads) {
  if (device == "cpu") return std::make_unique<cpu::CpuBackend>(num_threads);
  if (device == "cuda")
    throw Error(ErrorKind::Unsupported,
                "device 'cuda': this pagedrt build has no CUDA backend (rebuild with the CUDA "
                "toolkit and PAGEDRT_CUDA=ON)");
  throw Error(ErrorKind::InvalidArgument,
              "device '" + device + "' is not known (use \"auto\", \"cpu\" or \"cuda\")");
}

}  // namespace pagedrt
