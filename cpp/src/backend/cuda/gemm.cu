#include "backend/cuda/gemm.hpp"

#include <cstdlib>
#include <cstring>

#include "backend/cuda/cuda_check.hpp"

namespace pagedrt::cuda {

Gemm::Gemm(cudaStream_t stream) : stream_(stream) {
  const char* env = std::getenv("PAGEDRT_CUDA_GEMV");
  own_gemv_ = !(env && std::strcmp(env, "0") == 0);
  CUBLAS_CHECK(cublasLtCreate(&handle_));
  CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

Gemm::~Gemm() {
  for (auto& kv : plans_) {
    cublasLtMatrixLayoutDestroy(kv.second.a);
    cublasLtMatrixLayoutDestroy(kv.second.b);
    cublasLtMatrixLayoutDestroy(kv.second.c);
    cublasLtMatmulDescDestroy(kv.second.op);
  }
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

void Gemm::run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
               bool in_f32) {
  if (n == 0) return;
  if (in_f32) return run_cublaslt(x, w, y, n, m, k, true, true);
  if (own_gemv_ && Gemv::supports(x, w, n, m, k)) return gemv_.run(x, w, y, n, m, k, out_f32, stream_);
  run_cublaslt(x, w, y, n, m, k, out_f32, false);
}

bool Gemm::run_silu_mul(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k) {
  if (n == 0) return true;
  if (!own_gemv_ || !Gemv::supports(x, w, n, 2 * m, k)) return false;
  gemv_.run_silu_mul(x, w, y, n, m, k, stream_);
  return true;
}

// Column-major view: C (m x n, ld m) = op(A) * B with A = W seen as (k x m, ld k)
// transposed, B = x seen as (k x n, ld k). C is y row-major (n, m).
void Gemm::run_cublaslt(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k,
                        bool out_f32, bool in_f32) {
  auto key = std::make_tuple(n, m, k, out_f32, in_f32);
  const cudaDataType_t in_type = in_f32 ? CUDA_R_32F : CUDA_R_16BF;
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    Plan p;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, in_type, k, m, k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, in_type, k, n, k));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, out_f32 ? CUDA_R_32F : CUDA_R_16BF, m, n, m));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                      &workspace_bytes_, sizeof(workspace_bytes_)));
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, 1, &res, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
      cublasLtMatrixLayoutDestroy(p.a);
      cublasLtMatrixLayoutDestroy(p.b);
      cublasLtMatrixLayoutDestroy(p.c);
      cublasLtMatmulDescDestroy(p.op);
      throw Error(ErrorKind::Runtime, std::string("cuBLASLt has no algorithm for a ") + (in_f32 ? "fp32" : "bf16") +
                                          " GEMM of n=" + std::to_string(n) +
                                          " m=" + std::to_string(m) + " k=" + std::to_string(k));
    }
    p.algo = res.algo;
    it = plans_.emplace(key, p).first;
  }
  const Plan& p = it->second;
  const float alpha = 1.0f, beta = 0.0f;
  CUBLAS_CHECK(cublasLtMatmul(handle_, p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo,
                              workspace_, workspace_bytes_, stream_));
}

}  // namespace pagedrt::cuda
