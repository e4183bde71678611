#include "backend/cuda/gemm.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.hpp"

namespace pagedrt::cuda {

namespace {

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, value) == 0;
}

// The band of n a searched algorithm serves: n rounded up to a power of two, at least 16.
int64_t band_of(int64_t n) {
  int64_t b = 16;
  while (b < n) b <<= 1;
  return b;
}

}  // namespace

Gemm::Gemm(cudaStream_t stream, bool deterministic)
    : stream_(stream),
      own_gemv_(!env_is("PAGEDRT_CUDA_GEMV", "0") && !deterministic),
      deterministic_(deterministic),
      glu_(own_gemv_) {  // declared after own_gemv_: the GLU GEMM where the own GEMV may run
  search_ = env_is("PAGEDRT_GEMM_SEARCH", "1") && !deterministic;
  bands_ = !env_is("PAGEDRT_GEMM_BANDS", "0");
  invariant_own_ = deterministic && !env_is("PAGEDRT_DET_GEMM", "cublaslt");
  if (const char* v = std::getenv("PAGEDRT_DET_GEMM"); v && std::strcmp(v, "own") != 0 && std::strcmp(v, "cublaslt") != 0)
    std::fprintf(stderr, "pagedrt: PAGEDRT_DET_GEMM=%s is neither 'own' nor 'cublaslt'; using 'own'\n", v);
  if (const char* v = std::getenv("PAGEDRT_DET_GEMM_N")) {
    const long long n = std::atoll(v);
    if (n >= 1 && n <= 65536)
      pin_n_ = n;
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_DET_GEMM_N=%s is not a row count from 1 to 65536; using %lld\n", v,
                   static_cast<long long>(kPinN));
  }
  if (const char* v = std::getenv("PAGEDRT_GEMM_RESIDUAL")) {
    const long long rows = std::atoll(v);
    if ((rows == 0 && std::strcmp(v, "0") == 0) || (rows >= 9 && rows <= (1 << 20)))
      residual_min_rows_ = rows;
    else
      std::fprintf(stderr, "pagedrt: PAGEDRT_GEMM_RESIDUAL=%s is neither 0 nor a row count from 9 up; using %lld\n",
                   v, static_cast<long long>(kResidualMinRows));
  }
  if (deterministic) residual_min_rows_ = 0;
  CUBLAS_CHECK(cublasLtCreate(&handle_));
  CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
  if (search_) {
    int dev = 0, l2 = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    flush_bytes_ = std::max<size_t>(2 * static_cast<size_t>(l2), 8u << 20);
    CUDA_CHECK(cudaMalloc(&flush_, flush_bytes_));
    CUDA_CHECK(cudaEventCreate(&ev_[0]));
    CUDA_CHECK(cudaEventCreate(&ev_[1]));
  }
}

Gemm::~Gemm() {
  for (auto& kv : plans_) {
    destroy(kv.second);
  }
  for (cudaEvent_t e : ev_)
    if (e) cudaEventDestroy(e);
  if (flush_) cudaFree(flush_);
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

void Gemm::run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
               bool in_f32) {
  if (n == 0) return;
  if (in_f32) return run_cublaslt(x, w, y, n, m, k, true, true);
  if (invariant_takes(m, k)) return invariant_.run(x, w, y, n, m, k, out_f32, stream_);
  if (own_gemv_ && Gemv::supports(x, w, n, m, k)) return gemv_.run(x, w, y, n, m, k, out_f32, stream_);
  run_cublaslt(x, w, y, n, m, k, out_f32, false);
}

void Gemm::require_no_fp8(const char* what) const {
  if (deterministic_)
    throw Error(ErrorKind::Unsupported, std::string(what) + ": fp8 GEMMs have no batch-invariant algorithm "
                                                            "(deterministic=True on CUDA takes bf16 or fp32 weights)");
}

bool Gemm::run_accumulate(const void* x, const void* w, float* y, int64_t n, int64_t m, int64_t k) {
  if (residual_min_rows_ == 0 || n < residual_min_rows_) return false;
  // The fp32-output plan of the shape (the same layouts; beta is the call's).
  Plan& p = plan(n, m, k, /*out_f32=*/true, In::BF16, x, w, y, nullptr, nullptr, /*accumulate=*/true);
  launch(p, n, m, k, In::BF16, x, w, y, /*beta=*/1.0f);
  return true;
}

void Gemm::run_f8(const void* xq, const float* xs, const void* w, const float* ws, void* y, int64_t n, int64_t m,
                  int64_t k, bool out_f32) {
  if (n == 0) return;
  require_no_fp8("Gemm::run_f8");
  if (own_gemv_ && Gemv::supports_f8(xq, w, n, m, k)) return gemv_.run_f8(xq, xs, w, ws, y, n, m, k, out_f32, stream_);
  Plan& p = plan(n, m, k, out_f32, In::F8, xq, w, y, ws, xs);
  set_scales(p, ws, xs);  // this call's (a recording keeps them by value)
  launch(p, n, m, k, In::F8, xq, w, y);
}

bool Gemm::run_f8_quant_x(const void* x, const void* w, const float* ws, void* y, int64_t n, int64_t m, int64_t k,
                          bool out_f32) {
  if (n == 0) return true;
  require_no_fp8("Gemm::run_f8_quant_x");
  if (!own_gemv_ || !Gemv::supports_f8_quant_x(x, w, n, m, k)) return false;
  gemv_.run_f8_quant_x(x, w, ws, y, n, m, k, out_f32, stream_);
  return true;
}

bool Gemm::run_silu_mul_f8(const void* xq, const float* xs, const void* w, const float* ws, void* y, int64_t n,
                           int64_t m, int64_t k) {
  if (n == 0) return true;
  require_no_fp8("Gemm::run_silu_mul_f8");
  if (!own_gemv_ || !Gemv::supports_f8(xq, w, n, 2 * m, k)) return false;
  gemv_.run_silu_mul_f8(xq, xs, w, ws, y, n, m, k, stream_);
  return true;
}

bool Gemm::run_silu_mul(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k) {
  if (n == 0) return true;
  if (deterministic_)  // n <= 8 in the GEMV's batch-invariant order; else run() and silu_mul, bitwise the same
    return invariant_takes(2 * m, k) && invariant_.run_silu_mul(x, w, y, n, m, k, stream_);
  if (glu_.takes(x, w, y, n, m, k)) {
    glu_.run(x, w, y, n, m, k, stream_);
    return true;
  }
  if (!own_gemv_ || !Gemv::supports(x, w, n, 2 * m, k)) return false;
  gemv_.run_silu_mul(x, w, y, n, m, k, stream_);
  return true;
}

// Column-major view: C (m x n, ld m) = op(A) * B with A = W seen as (k x m, ld k)
// transposed, B = x seen as (k x n, ld k). C is y row-major (n, m).
// fp8 (In::F8): e4m3 A and B (A transposed, as cuBLASLt's fp8 GEMMs want),
// scaled by vectors: A's per row of W (m), B's per row of x (n).
Gemm::Plan Gemm::make_plan(int64_t n, int64_t m, int64_t k, bool out_f32, In in) const {
  const cudaDataType_t in_type = in == In::F32 ? CUDA_R_32F : in == In::F8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  Plan p;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (in == In::F8) {
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)));
  }
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, in_type, k, m, k));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, in_type, k, n, k));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, out_f32 ? CUDA_R_32F : CUDA_R_16BF, m, n, m));
  return p;
}

int Gemm::heuristic(const Plan& p, cublasLtMatmulHeuristicResult_t* res, int count, int64_t n, int64_t m,
                    int64_t k, In in) const {
  cublasLtMatmulPreference_t pref;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &workspace_bytes_, sizeof(workspace_bytes_)));
  int found = 0;
  ++picks_asked_;
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, count, res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0)
    throw Error(ErrorKind::Runtime, std::string("cuBLASLt has no algorithm for a ") +
                                        (in == In::F32 ? "fp32" : in == In::F8 ? "fp8 (per-row scaled)" : "bf16") +
                                        " GEMM of n=" + std::to_string(n) + " m=" + std::to_string(m) +
                                        " k=" + std::to_string(k));
  return found;
}

bool Gemm::accepts(const Plan& p, const cublasLtMatmulAlgo_t& algo) const {
  cublasLtMatmulHeuristicResult_t r{};
  return cublasLtMatmulAlgoCheck(handle_, p.op, p.a, p.b, p.c, p.c, &algo, &r) == CUBLAS_STATUS_SUCCESS &&
         r.state == CUBLAS_STATUS_SUCCESS && r.workspaceSize <= workspace_bytes_;
}

void Gemm::destroy(Plan& p) {
  cublasLtMatrixLayoutDestroy(p.a);
  cublasLtMatrixLayoutDestroy(p.b);
  cublasLtMatrixLayoutDestroy(p.c);
  cublasLtMatmulDescDestroy(p.op);
}

cublasStatus_t Gemm::matmul(const Plan& p, const cublasLtMatmulAlgo_t& algo, const void* x, const void* w,
                            void* y, float beta) {
  const float alpha = 1.0f;
  return cublasLtMatmul(handle_, p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &algo,
                        workspace_, workspace_bytes_, stream_);
}

cublasLtMatmulAlgo_t Gemm::first_pick(const Plan& p, int64_t n, int64_t m, int64_t k, In in) const {
  cublasLtMatmulHeuristicResult_t first{};
  heuristic(p, &first, 1, n, m, k, in);
  return first.algo;
}

cublasLtMatmulAlgo_t Gemm::band_pick(const Plan& p, int64_t n, int64_t m, int64_t k, bool out_f32, In in,
                                     const float* a_scale, const float* b_scale) {
  const int64_t band = band_of(n);
  auto it = band_pick_.find(PickKey{band, m, k, out_f32, in});
  if (it == band_pick_.end()) {
    cublasLtMatmulAlgo_t algo{};
    if (band == n) {
      algo = first_pick(p, n, m, k, in);
    } else {
      Plan top = make_plan(band, m, k, out_f32, in);
      try {
        if (in == In::F8) set_scales(top, a_scale, b_scale);
        algo = first_pick(top, band, m, k, in);
      } catch (...) {
        destroy(top);
        throw;
      }
      destroy(top);
    }
    it = band_pick_.emplace(PickKey{band, m, k, out_f32, in}, algo).first;
  }
  return it->second;
}

void Gemm::warm(const void* w, int64_t m, int64_t k, bool out_f32, bool in_f32, bool in_f8, const float* ws,
                int64_t max_n, int64_t min_n) {
  if (deterministic_ || search_ || !bands_ || max_n < 1) return;
  const In in = in_f32 ? In::F32 : in_f8 ? In::F8 : In::BF16;
  if (in_f32) out_f32 = true;
  std::vector<int64_t> bands;  // not yet picked
  for (int64_t band = 16;; band <<= 1) {
    if (band >= min_n && band_pick_.count(PickKey{band, m, k, out_f32, in}) == 0) bands.push_back(band);
    if (band >= max_n) break;
  }
  if (bands.empty()) return;
  // Scratch rows for one run of each band's algorithm at the band's smallest
  // n (x, y and fp8's per-row scales; their contents do not matter): the
  // first launch of a cuBLASLt kernel loads it (~1-2 ms of host time). At
  // most kWarmScratchBytes: a band whose rows need more gets its pick only.
  constexpr size_t kWarmScratchBytes = size_t{512} << 20;
  const size_t in_size = in == In::F32 ? 4 : in == In::F8 ? 1 : 2;
  const size_t row_bytes = static_cast<size_t>(k) * in_size + static_cast<size_t>(m) * (out_f32 ? 4 : 2) + 4;
  int64_t rows = 0;  // the most rows a run takes
  for (const int64_t band : bands)
    if (static_cast<size_t>(band / 2 + 1) * row_bytes + 512 <= kWarmScratchBytes) rows = band / 2 + 1;
  auto round_up = [](size_t b) { return (b + 255) / 256 * 256; };
  const size_t x_bytes = round_up(rows * k * in_size), y_bytes = round_up(rows * m * (out_f32 ? 4 : 2));
  uint8_t* scratch = nullptr;
  if (rows > 0 && cudaMalloc(&scratch, x_bytes + y_bytes + rows * 4) != cudaSuccess) {
    cudaGetLastError();  // no room: the picks only
    scratch = nullptr;
  }
  for (const int64_t band : bands) {
    const int64_t n = band / 2 + 1;  // the band's smallest n: band_pick asks at its top
    const bool runs = scratch != nullptr && n <= rows;
    Plan run = make_plan(n, m, k, out_f32, in);
    try {
      if (in == In::F8) set_scales(run, ws, runs ? reinterpret_cast<const float*>(scratch + x_bytes + y_bytes) : ws);
      const cublasLtMatmulAlgo_t algo = band_pick(run, n, m, k, out_f32, in, ws, ws);
      if (runs) matmul(run, algo, scratch, w, scratch + x_bytes);  // a refusal: the step takes the n's own pick
    } catch (const Error&) {  // no algorithm at this band: the step that needs one says so
      destroy(run);
      break;
    }
    destroy(run);
  }
  if (scratch != nullptr) {
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    CUDA_CHECK(cudaFree(scratch));
  }
}

void Gemm::launch(Plan& p, int64_t n, int64_t m, int64_t k, In in, const void* x, const void* w, void* y,
                  float beta) {
  cublasStatus_t st = matmul(p, p.algo, x, w, y, beta);
  if (st != CUBLAS_STATUS_SUCCESS && p.from_band) {  // refused before anything ran: this n's own pick
    p.algo = first_pick(p, n, m, k, in);
    st = matmul(p, p.algo, x, w, y, beta);
  }
  p.from_band = false;
  CUBLAS_CHECK(st);
}

// Milliseconds of one run of `algo` (the least of three, L2 flushed before each),
// or a negative number where cuBLASLt refuses it.
float Gemm::time_algo(const Plan& p, const cublasLtMatmulAlgo_t& algo, const void* x, const void* w, void* y,
                      float beta) {
  if (matmul(p, algo, x, w, y, beta) != CUBLAS_STATUS_SUCCESS) return -1.0f;  // also the warm-up run
  float best = -1.0f;
  for (int rep = 0; rep < 3; ++rep) {
    CUDA_CHECK(cudaMemsetAsync(flush_, rep, flush_bytes_, stream_));
    CUDA_CHECK(cudaEventRecord(ev_[0], stream_));
    if (matmul(p, algo, x, w, y, beta) != CUBLAS_STATUS_SUCCESS) return -1.0f;
    CUDA_CHECK(cudaEventRecord(ev_[1], stream_));
    CUDA_CHECK(cudaEventSynchronize(ev_[1]));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, ev_[0], ev_[1]));
    if (best < 0.0f || ms < best) best = ms;
  }
  return best;
}

void Gemm::choose(Plan& p, const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
                  bool accumulate) {
  const BandKey band{band_of(n), m, k, out_f32};
  auto known = band_algo_.find(band);
  if (known != band_algo_.end()) {
    p.algo = accepts(p, known->second) ? known->second : first_pick(p, n, m, k, In::BF16);
    p.final = true;
    return;
  }
  cublasLtMatmulHeuristicResult_t res[kSearchCandidates];
  const int found = heuristic(p, res, kSearchCandidates, n, m, k, In::BF16);
  p.algo = res[0].algo;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;  // p.final stays false: search on a direct call
  // An accumulating call's y is its input (the residual): the candidates run
  // on scratch rows of y's size, with beta = 1 as the call will (none where
  // there is no room: the heuristic's pick).
  void* out = y;
  if (accumulate && found > 1 && cudaMalloc(&out, static_cast<size_t>(n) * m * sizeof(float)) != cudaSuccess) {
    cudaGetLastError();
    out = nullptr;
  }
  float best = -1.0f;
  for (int i = 0; i < found && found > 1 && out != nullptr; ++i) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS || res[i].workspaceSize > workspace_bytes_) continue;
    const float ms = time_algo(p, res[i].algo, x, w, out, accumulate ? 1.0f : 0.0f);
    if (ms >= 0.0f && (best < 0.0f || ms < best)) best = ms, p.algo = res[i].algo;
  }
  cudaGetLastError();  // a refused candidate leaves no sticky error; clear a non-sticky one
  if (out != nullptr && out != y) {
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    CUDA_CHECK(cudaFree(out));
  }
  band_algo_.emplace(band, p.algo);
  p.final = true;
}

void Gemm::set_scales(Plan& p, const float* a_scale, const float* b_scale) {
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale)));
}

Gemm::Plan& Gemm::plan(int64_t n, int64_t m, int64_t k, bool out_f32, In in, const void* x, const void* w, void* y,
                       const float* a_scale, const float* b_scale, bool accumulate) {
  const ShapeKey key{n, m, k, out_f32, in};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    Plan p = make_plan(n, m, k, out_f32, in);
    try {
      if (in == In::F8) set_scales(p, a_scale, b_scale);  // before the heuristic looks at the plan
      if (deterministic_) {
        p.algo = pinned(m, k, out_f32, in);
        p.final = true;
        if (!accepts(p, p.algo))
          throw Error(ErrorKind::Unsupported,
                      "deterministic=True on CUDA: cuBLASLt refuses the algorithm pinned for m=" + std::to_string(m) +
                          " k=" + std::to_string(k) + " at n=" + std::to_string(n) +
                          " (deterministic=True cannot run this shape in the same order as the others)");
      } else if (search_ && in == In::BF16) {
        choose(p, x, w, y, n, m, k, out_f32, accumulate);
      } else {
        p.from_band = bands_ && band_of(n) != n;
        p.algo = bands_ ? band_pick(p, n, m, k, out_f32, in, a_scale, b_scale) : first_pick(p, n, m, k, in);
        p.final = true;
      }
    } catch (...) {
      destroy(p);
      throw;
    }
    it = plans_.emplace(key, p).first;
  } else if (!it->second.final) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
    if (capture == cudaStreamCaptureStatusNone) choose(it->second, x, w, y, n, m, k, out_f32, accumulate);
  }
  return it->second;
}

// The first of the heuristic's candidates (asked at n = pin_n_, then at 256,
// 16 and 1) whose configuration splits no k (one split, no reduction scheme)
// and that cuBLASLt accepts at every probe n (gemm.hpp). Where none is, the
// error counts why each was refused.
const cublasLtMatmulAlgo_t& Gemm::pinned(int64_t m, int64_t k, bool out_f32, In in) {
  const PinKey key{m, k, out_f32, in};
  auto it = pinned_.find(key);
  if (it != pinned_.end()) return it->second;
  int seen = 0, bad_state = 0, no_config = 0, split = 0;
  std::string refused_at;
  for (const int64_t ask : {pin_n_, int64_t{256}, int64_t{16}, int64_t{1}}) {
    cublasLtMatmulHeuristicResult_t res[kPinCandidates];
    Plan rep = make_plan(ask, m, k, out_f32, in);
    int found = 0;
    try {
      found = heuristic(rep, res, kPinCandidates, ask, m, k, in);
    } catch (const Error&) {
      found = 0;
    }
    destroy(rep);
    for (int i = 0; i < found; ++i) {
      ++seen;
      if (res[i].state != CUBLAS_STATUS_SUCCESS) {
        ++bad_state;
        continue;
      }
      int32_t splits = 1;
      uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
      size_t written = 0;
      if (cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits,
                                               sizeof(splits), &written) != CUBLAS_STATUS_SUCCESS ||
          cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                                               sizeof(scheme), &written) != CUBLAS_STATUS_SUCCESS) {
        ++no_config;
        continue;
      }
      if (splits > 1 || scheme != CUBLASLT_REDUCTION_SCHEME_NONE) {
        ++split;
        continue;
      }
      int64_t refused = 0;
      for (int64_t n : kPinProbes) {
        Plan probe = make_plan(n, m, k, out_f32, in);
        const bool ok = accepts(probe, res[i].algo);
        destroy(probe);
        if (!ok) {
          refused = n;
          break;
        }
      }
      if (refused == 0) return pinned_.emplace(key, res[i].algo).first->second;
      refused_at += (refused_at.empty() ? "" : ", ") + std::to_string(refused);
    }
  }
  throw Error(ErrorKind::Unsupported,
              std::string("deterministic=True on CUDA: none of cuBLASLt's ") + std::to_string(seen) +
                  " candidates for a " + (in == In::F32 ? "fp32" : "bf16") + " GEMM of a (" + std::to_string(m) +
                  ", " + std::to_string(k) + ") weight with " + (out_f32 ? "fp32" : "bf16") +
                  " output splits no k and runs every n (" + std::to_string(bad_state) + " not runnable, " +
                  std::to_string(no_config) + " without a readable configuration, " + std::to_string(split) +
                  " splitting k, the rest refused at n = " + (refused_at.empty() ? "-" : refused_at) +
                  "); this model cannot run batch-invariant here");
}

void Gemm::pin(int64_t m, int64_t k, bool in_f32) {
  if (!deterministic_) return;
  if (in_f32) {
    pinned(m, k, true, In::F32);
  } else if (!invariant_takes(m, k)) {
    pinned(m, k, false, In::BF16);
    pinned(m, k, true, In::BF16);  // an lm head's (fp32 logits)
  }
}

void Gemm::run_cublaslt(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
                        bool in_f32) {
  Plan& p = plan(n, m, k, out_f32, in_f32 ? In::F32 : In::BF16, x, w, y);
  launch(p, n, m, k, in_f32 ? In::F32 : In::BF16, x, w, y);
}

}  // namespace pagedrt::cuda
