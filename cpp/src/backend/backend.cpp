#include "backend/backend.hpp"

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

void Backend::rope_cache_attention(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                                   int64_t head_dim, float scale, Tensor& k_cache, Tensor& v_cache, Tensor& out) {
  rope_and_cache(qkv, rope, num_heads, num_kv_heads, head_dim, k_cache, v_cache);
  paged_attention(qkv, k_cache, v_cache, num_heads, num_kv_heads, head_dim, scale, out);
}

void Backend::linear_silu_mul(const Tensor& x, const Tensor& gate_up_weight, int64_t n, Tensor& gate_up,
                              Tensor& out) {
  linear(x, gate_up_weight, n, gate_up);
  silu_mul(gate_up, n, out);
}

void Backend::argmax(const Tensor&, int64_t, int32_t*) {
  throw Error(ErrorKind::Unsupported, "this backend has no device argmax (check has_argmax())");
}

ScalarType auto_activation_dtype(const std::string& device, ScalarType weight_dtype) {
  if (device == "cuda") return ScalarType::BF16;
  return weight_dtype == ScalarType::BF16 && cpu::gemm_variant() == "avx512bf16" ? ScalarType::BF16
                                                                                 : ScalarType::F32;
}

bool cuda_built() {
#ifdef PAGEDRT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads,
                                      ScalarType activation_dtype) {
  if (device == "cpu") return std::make_unique<cpu::CpuBackend>(num_threads, activation_dtype);
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
