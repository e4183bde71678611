// backend/cuda/gemm.hpp — y = x @ W^T on the GPU, bf16 operands, fp32 accumulation.
//
//   x: (n, k) bf16, row-major        W: (m, k) bf16, row-major (a checkpoint's layout)
//   y: (n, m) bf16 or fp32, row-major
//
// The seam for own kernels: Gemm::run() picks the implementation per shape.
// n <= 8 rows with k a multiple of 8 go to the own small-M kernel (gemv.hpp,
// decode); everything else, and the fp32
// validation mode, to cuBLASLt with its heuristic's first pick, asked once per
// band of n (n rounded up to a power of two, at least 16: the pick for the
// band's top n, with m, k, the output and operand types) and used for every n
// in the band (where cuBLASLt refuses it at some n, that n's own pick: the
// call's status says so, nothing is launched). Asking per exact n cost 1-2
// ms of host time per new shape on an H100 (CUDA 13), 3-11 ms a step of a
// never-seen token count on a SmolLM2-sized model, where known counts launch
// in 2 ms: a serving run's mixed steps, whose token counts rarely repeat,
// paid it again and again (session 35: tools/bench_cuda.py new_shapes).
// PAGEDRT_GEMM_BANDS=0 asks per exact n (the rule before, for A/B runs).
//
// Algorithm search (PAGEDRT_GEMM_SEARCH=1; off by default): the first call of
// a band of n — n rounded up to a power of two, at least 16, with m, k and the
// output type — times up to kSearchCandidates of the heuristic's picks on that
// call's own operands (L2 flushed before each timed run, as a model's next
// layer finds it) and keeps the fastest for the band; later calls in the band
// reuse it where cuBLASLt accepts it for their n (cublasLtMatmulAlgoCheck).
// Calls made while the stream is recorded into a CUDA graph cannot be timed:
// they take the first pick until a direct call searches. It is off because
// it did not pay: on the H200 (2026-12-02, tools/bench_cuda.py gemm, the 8B
// projections at 10 values of n from 1 to 8,192) the searched pick was within
// noise of the first pick on every shape (17 of 40 rows at >= 85% of the
// roofline either way), and a timed choice can differ between processes; at
// odd n (300 ... 8,000: bench_cuda.py gemm_odd, 2026-12-02) the sum over the
// shapes was 1% apart, and so was taking the heuristic's pick for n rounded
// up to a multiple of 256, 512 or 1,024 rows (not kept). (Asking the
// heuristic for a new shape measured +0.02 ms then, 8B prefill sizes on the
// H200; on an H100 with CUDA 13 it cost 1-2 ms a shape: the bands above.)
//
// Batch-invariant mode (deterministic: Runtime(deterministic=True), issue 22):
// a row of y must have the same bits whatever n is. The default kernels do
// not hold that across n: the own GEMV splits k between warps, cuBLASLt picks
// its algorithm (tile, split-k) per n. Here:
// - bf16 weights with k a multiple of 8 (every Llama shape): InvariantGemm
//   (invariant_gemm.hpp), the own GEMV's order of sums for every n: the GEMV
//   itself (one chain a split) at n <= 8, a tiled kernel walking the same
//   steps above. The fused SiLU·mul GEMV runs at n <= 8 in that order.
// - fp32 (the validation mode), other bf16 shapes, and every bf16 shape with
//   PAGEDRT_DET_GEMM=cublaslt (faster at large n until InvariantGemm's tiled
//   kernel is: docs/determinism.md): every n of a weight
//   shape (m, k, output and operand types) runs one cuBLASLt algorithm,
//   pinned when the weight loads (pin()): the first of the heuristic's
//   candidates, asked at n = kPinN (64; PAGEDRT_DET_GEMM_N for A/B runs),
//   then at 256, 16 and 1, that splits no k (one split, no reduction
//   scheme) and that cuBLASLt accepts at every probe n (kPinProbes). (Asked
//   without workspace, the H200's cuBLASLt offered none: 2026-12-05.)
//   Without a k split each element of y is one accumulation chain over k in
//   the kernel's fixed order, and the tiles only decide which block computes
//   it. A shape no candidate serves, or an n the pinned algorithm refuses,
//   throws (never a silent fallback to another order; Unsupported, naming
//   the shape and why each candidate was refused). The pick is the
//   heuristic's, never timed: a timed choice could differ between processes,
//   and results must reproduce across them.
// Both are checked on the GPU (tests/test_cuda_determinism.py). fp8 operands
// are not served (the Runtime refuses deterministic=True with fp8 weights on
// CUDA).
//
// Environment, read when a Gemm is made (once per backend), for A/B runs:
//   PAGEDRT_CUDA_GEMV=0    every shape to cuBLASLt
//   PAGEDRT_GEMM_BANDS=0   cuBLASLt's heuristic asked per exact n, not per band (above)
//   PAGEDRT_GEMM_SEARCH=1  time cuBLASLt's candidates once per band (above)
//   PAGEDRT_DET_GEMM=cublaslt  the batch-invariant mode's bf16 GEMMs on pinned cuBLASLt
//                          algorithms instead of InvariantGemm (another order of sums,
//                          so other bits; faster at large n, slower at n <= 8: docs/determinism.md)
//   PAGEDRT_DET_GEMM_N=N   the n whose heuristic picks the pinned algorithms (batch-invariant mode)
//   PAGEDRT_GEMM_RESIDUAL=N  the residual add in the GEMM from N rows up (9 and more; off by
//                          default: kResidualMinRows); 0: off
//   PAGEDRT_GLU_GEMM=N     the gate/up GEMM with the SiLU·mul epilogue (glu_gemm.hpp) from N rows
//                          (off by default; not with PAGEDRT_CUDA_GEMV=0)
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "backend/cuda/gemv.hpp"
#include "backend/cuda/glu_gemm.hpp"
#include "backend/cuda/invariant_gemm.hpp"

namespace pagedrt::cuda {

class Gemm {
 public:
  static constexpr int kSearchCandidates = 8;
  static constexpr int kPinCandidates = 32;
  static constexpr int64_t kPinN = 64;
  // run_accumulate's default fewest rows: 0, off. From a threshold up, a
  // row's o_proj and down products skip the bf16 rounding they get below it,
  // so its logits would depend on how many rows share its step (a seeded
  // request sampled other tokens alone than in a busy batch: session 48, the
  // H100), for ~1% of a long prefill (session 45).
  static constexpr int64_t kResidualMinRows = 0;
  // n at which a pinned algorithm must be accepted: batch-1 decode, the own
  // kernel's edge, odd sizes, a large prefill.
  static constexpr int64_t kPinProbes[] = {1, 2, 7, 8, 9, 17, 63, 64, 65, 255, 256, 1000, 4096, 16384};

  // deterministic: the batch-invariant mode (above).
  explicit Gemm(cudaStream_t stream, bool deterministic = false);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // out_f32 selects fp32 output (logits); otherwise bf16. in_f32: x and W are
  // fp32 (the validation mode; cuBLASLt, pure fp32 compute, no TF32) and so is y.
  void run(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
           bool in_f32 = false);
  // y (n, m) bf16 = silu(x @ gate^T) * (x @ up^T), w = [gate; up] (2m, k) bf16,
  // in one kernel where an own kernel takes the shape: the small-M GEMV
  // (n <= 8) or, from GluGemm::min_rows() rows, the Hopper GEMM with the
  // SiLU·mul in its epilogue (glu_gemm.hpp); returns false (and does
  // nothing) where none does: then run() and a SiLU·mul kernel.
  bool run_silu_mul(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k);

  // y (n, m) fp32 += x (n, k) bf16 @ W (m, k)^T bf16 in one cuBLASLt GEMM
  // (beta = 1, y read and written by its epilogue, in place): the residual
  // add of o_proj and down fused into the GEMM, so the norm after it reads
  // the residual alone (a prompt's add_rms_norm moved 12 bytes a hidden
  // element, the rms_norm after this 6). Only from residual_min_rows() rows
  // up (PAGEDRT_GEMM_RESIDUAL; off by default, kResidualMinRows says why;
  // at 64, cuBLASLt's rows, measured on an H100 in session 45, the 8B
  // shape: 8,000-token prefill 1-2 ms faster, decode at 64 / 128 / 256
  // sequences 0.3-0.6%, 16 sequences no faster), not in the batch-invariant
  // mode (the search times its candidates on scratch rows); returns false
  // (and does nothing) where it does not take the call: then run() and an
  // add.
  bool run_accumulate(const void* x, const void* w, float* y, int64_t n, int64_t m, int64_t k);
  // The fewest rows run_silu_mul's GEMM with the SiLU·mul epilogue takes (0: none).
  int64_t glu_min_rows() const { return glu_.min_rows(); }
  // The fewest rows run_accumulate takes (0: it takes none).
  int64_t residual_min_rows() const { return residual_min_rows_; }

  // fp8: y (n, m) = (xq (n, k) @ w (m, k)^T) * ws[r] * xs[t] for e4m3 codes
  // xq, w with fp32 scales per token xs (n) and per output channel ws (m):
  // the own kernel for n <= 8 (Gemv::run_f8), else cuBLASLt's fp8 GEMM with
  // outer-vector scales (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F). k % 16 == 0.
  void run_f8(const void* xq, const float* xs, const void* w, const float* ws, void* y, int64_t n, int64_t m,
              int64_t k, bool out_f32);
  // run_f8 on bf16 x, quantized per token inside the own kernel
  // (Gemv::run_f8_quant_x: n <= 2); false (and nothing done) where it does
  // not take the call: then quantize_act_rows and run_f8.
  bool run_f8_quant_x(const void* x, const void* w, const float* ws, void* y, int64_t n, int64_t m, int64_t k,
                      bool out_f32);
  // silu(gate) * up, as run_silu_mul, on fp8 [gate; up] with ws (2m); false where the own kernel does not take it.
  bool run_silu_mul_f8(const void* xq, const float* xs, const void* w, const float* ws, void* y, int64_t n, int64_t m,
                       int64_t k);

  // The batch-invariant mode: pins the cuBLASLt algorithms of a (m, k)
  // weight's GEMMs now where InvariantGemm does not take them (in_f32: fp32;
  // bf16 operands: bf16 and fp32 output), so that a shape
  // no algorithm serves fails when the model loads, not in a request's step.
  // Nothing in the default mode.
  void pin(int64_t m, int64_t k, bool in_f32);

  // Prepares now every band of n from 16 up to max_n's for an (m, k)
  // weight w's GEMMs (in: bf16, fp32 or fp8 operands; fp8 with the weight's
  // scales ws), so that no step waits for it: asks cuBLASLt's heuristic for
  // the band's pick and runs that algorithm once at the band's smallest n on
  // scratch rows (a cuBLASLt kernel's first launch loads it). A band's first
  // sighting in a step cost 7-10 ms of host time on an H100 with SmolLM2's
  // shapes (session 36), paid in the first requests of a run. Nothing where
  // picks are not asked per band (PAGEDRT_GEMM_BANDS=0, the search, the
  // batch-invariant mode); a band cuBLASLt has no algorithm for is left to
  // the step that needs it (which then fails as it would have).
  void warm(const void* w, int64_t m, int64_t k, bool out_f32, bool in_f32, bool in_f8, const float* ws,
            int64_t max_n, int64_t min_n = 1);
  // Bands searched so far (for tests and benchmarks).
  size_t searched_bands() const { return band_algo_.size(); }
  // Times cuBLASLt's heuristic was asked (tests).
  int64_t picks_asked() const { return picks_asked_; }
  bool deterministic() const { return deterministic_; }

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool final = false;  // false: the heuristic's pick, made while recording; search when a direct call comes
    bool from_band = false;  // the band's pick, not yet run at this n: the n's own pick where cuBLASLt refuses it
  };
  enum class In { BF16, F32, F8 };  // the operands' type
  using ShapeKey = std::tuple<int64_t, int64_t, int64_t, bool, In>;  // n, m, k, out_f32, operands
  using BandKey = std::tuple<int64_t, int64_t, int64_t, bool>;         // band of n, m, k, out_f32
  using PinKey = std::tuple<int64_t, int64_t, bool, In>;               // m, k, out_f32, operands
  using PickKey = std::tuple<int64_t, int64_t, int64_t, bool, In>;     // band of n, m, k, out_f32, operands

  void run_cublaslt(const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
                    bool in_f32);
  Plan make_plan(int64_t n, int64_t m, int64_t k, bool out_f32, In in) const;
  // The plan of a shape, made (and its algorithm picked) on first use; fp8
  // plans get the scales given; accumulate: the call adds into y (beta = 1).
  Plan& plan(int64_t n, int64_t m, int64_t k, bool out_f32, In in, const void* x, const void* w, void* y,
             const float* a_scale = nullptr, const float* b_scale = nullptr, bool accumulate = false);
  static void set_scales(Plan& p, const float* a_scale, const float* b_scale);  // an fp8 plan's scale vectors
  static void destroy(Plan& p);  // its descriptor and layouts
  // cuBLASLt's heuristic picks for the plan, best first (at least one, or throws).
  int heuristic(const Plan& p, cublasLtMatmulHeuristicResult_t* res, int count, int64_t n, int64_t m, int64_t k,
                In in) const;
  // The algorithm for a bf16 plan: the band's, or found by timing the
  // candidates on x, w, y (on scratch rows for an accumulating call's y).
  void choose(Plan& p, const void* x, const void* w, void* y, int64_t n, int64_t m, int64_t k, bool out_f32,
              bool accumulate);
  bool accepts(const Plan& p, const cublasLtMatmulAlgo_t& algo) const;
  float time_algo(const Plan& p, const cublasLtMatmulAlgo_t& algo, const void* x, const void* w, void* y,
                  float beta);
  // y = x W^T (+ y where beta is 1) with `algo` on the stream; the status,
  // unchecked (a search tries candidates cuBLASLt may refuse).
  cublasStatus_t matmul(const Plan& p, const cublasLtMatmulAlgo_t& algo, const void* x, const void* w, void* y,
                        float beta = 0.0f);
  // The heuristic's first pick for the plan (throws when there is none).
  cublasLtMatmulAlgo_t first_pick(const Plan& p, int64_t n, int64_t m, int64_t k, In in) const;
  // The heuristic's first pick for n's band (asked at the band's top n once).
  cublasLtMatmulAlgo_t band_pick(const Plan& p, int64_t n, int64_t m, int64_t k, bool out_f32, In in,
                                 const float* a_scale, const float* b_scale);
  // matmul with the plan's algorithm; a band's pick that cuBLASLt refuses at
  // this n is replaced by the n's own first pick (once) and run again.
  void launch(Plan& p, int64_t n, int64_t m, int64_t k, In in, const void* x, const void* w, void* y,
              float beta = 0.0f);
  // The batch-invariant mode's algorithm of a weight shape (made on first use; throws where none serves).
  const cublasLtMatmulAlgo_t& pinned(int64_t m, int64_t k, bool out_f32, In in);
  void require_no_fp8(const char* what) const;
  // The batch-invariant mode's bf16 GEMMs of an (m, k) weight run InvariantGemm (else pinned cuBLASLt).
  bool invariant_takes(int64_t m, int64_t k) const { return invariant_own_ && InvariantGemm::supports_shape(m, k); }

  cudaStream_t stream_;
  bool own_gemv_ = true;  // false: PAGEDRT_CUDA_GEMV=0
  bool search_ = false;   // true: PAGEDRT_GEMM_SEARCH=1
  bool bands_ = true;     // false: PAGEDRT_GEMM_BANDS=0
  bool deterministic_ = false;
  bool invariant_own_ = false;  // the batch-invariant mode's bf16 GEMMs: InvariantGemm (PAGEDRT_DET_GEMM=own, the default)
  int64_t pin_n_ = kPinN;  // PAGEDRT_DET_GEMM_N
  int64_t residual_min_rows_ = kResidualMinRows;  // PAGEDRT_GEMM_RESIDUAL (0: run_accumulate takes nothing)
  Gemv gemv_;
  InvariantGemm invariant_{gemv_};  // the batch-invariant mode's bf16 GEMMs
  GluGemm glu_;  // gate/up with SiLU·mul (PAGEDRT_GLU_GEMM); off in the batch-invariant mode and with PAGEDRT_CUDA_GEMV=0
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 32u << 20;
  void* flush_ = nullptr;  // written before each timed run to evict W from L2
  size_t flush_bytes_ = 0;
  cudaEvent_t ev_[2] = {nullptr, nullptr};
  std::map<ShapeKey, Plan> plans_;
  std::map<BandKey, cublasLtMatmulAlgo_t> band_algo_;  // searched (PAGEDRT_GEMM_SEARCH=1)
  std::map<PickKey, cublasLtMatmulAlgo_t> band_pick_;  // the heuristic's, per band
  std::map<PinKey, cublasLtMatmulAlgo_t> pinned_;
  mutable int64_t picks_asked_ = 0;
};

}  // namespace pagedrt::cuda
