// backend/cpu/cpu_backend.hpp — the CPU backend: fp32 or bf16 weights; fp32
// activations and KV cache (the oracle every other backend is tested
// against), or bf16 ones (half the KV memory, and the same rounding points as
// the CUDA backend, which makes it that backend's matched-precision
// reference); AVX2/AVX-512 kernels where the build has them, on the calling
// thread's team (backend/team.hpp).
#pragma once

#include <algorithm>
#include <atomic>
#include <vector>

#include "backend/backend.hpp"
#include "backend/cpu/attention.hpp"

namespace pagedrt::cpu {

class CpuBackend final : public Backend {
 public:
  // activation_dtype: F32 or BF16 (activations between ops and the KV cache;
  // the residual stream and every accumulation stay fp32)
  // deterministic: every kernel gives a row the same bits whatever the batch
  // (the default). false changes prefill attention's summation order and, on
  // a processor with AMX, takes AMX tiles for the bf16 GEMMs of steps of
  // kAmxMinTokens tokens or more (gemm.hpp).
  explicit CpuBackend(int num_threads, ScalarType activation_dtype = ScalarType::F32, bool deterministic = true);
  Device device() const override { return Device::CPU; }
  ScalarType activation_dtype() const override { return act_; }
  bool has_fp8_weights() const override { return true; }
  int num_threads() const { return threads_; }
  // Cores lent to the structured-output masks while they are filled beside
  // the forward: each op's team leaves them free (at most the cores less n,
  // at least 1) until lent 0; a team that leaves enough cores idle already
  // keeps its size. Threads split rows, never a reduction, so no result changes.
  void lend_threads(int n) override { lent_.store(std::max(0, n), std::memory_order_relaxed); }
  void share_host(int ranks) override { cores_ = std::max(1, all_cores_ / std::max(1, ranks)); }
  int host_threads() const override { return team(); }

  Tensor load_weight(const std::vector<WeightView>& parts, ScalarType dtype) override;
  Tensor load_linear_weight(const std::vector<WeightView>& parts, ScalarType dtype) override;
  Tensor empty(std::vector<int64_t> shape, ScalarType dtype) override;
  Tensor from_host(const Tensor& host) override { return host; }
  std::unique_ptr<KvMemory> reserve_kv(const std::vector<int64_t>& shape, ScalarType dtype, int64_t count,
                                       int64_t chunk_bytes) override {
    return std::make_unique<HostKvMemory>(shape, dtype, count, chunk_bytes);
  }

  void begin_step(const BatchView& batch) override { batch_ = batch; }
  void embedding(const Tensor& table, int64_t first_id, Tensor& out) override;
  void rms_norm(const Tensor& x, const Tensor& weight, float eps, int64_t n, Tensor& out) override;
  void add_rms_norm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps, int64_t n,
                    Tensor& out) override;
  void linear(const Tensor& x, const Tensor& weight, int64_t n, Tensor& out) override;
  void add(Tensor& residual, const Tensor& x, int64_t n) override;
  void rope_and_cache(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, Tensor& k_cache, Tensor& v_cache) override;
  void paged_attention(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                       Tensor& out) override;
  void rope_cache_attention_logit_rows(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                                       int64_t head_dim, float scale, Tensor& k_cache, Tensor& v_cache,
                                       Tensor& out) override;
  void silu_mul(const Tensor& gate_up, int64_t n, Tensor& out) override;
  void gather_rows(const Tensor& x, Tensor& out) override;
  void copy_blocks(Tensor& cache, const std::vector<BlockCopy>& copies) override;
  void swap_blocks(Tensor& cache, const std::vector<BlockCopy>& pairs, void* host, bool to_host) override;
  void to_host(const Tensor& src, int64_t numel, float* dst) override;
  void download(const Tensor& src, void* dst) override;
  // The host sampler's greedy pick (first index of the largest, NaN never
  // chosen), done where the logits are: steps of plain greedy rows copy no
  // logits, and async scheduling (engine/engine.hpp) feeds the ids forward.
  bool has_argmax() const override { return true; }
  void argmax(const Tensor& logits, int64_t rows, int32_t* out, const RowMasks& masks) override;

 private:
  // paged_attention; logit_rows_only: the step's logit rows alone (cpu::paged_attention)
  void attend(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, int64_t num_heads,
              int64_t num_kv_heads, int64_t head_dim, float scale, Tensor& out, bool logit_rows_only);
  int team() const { return std::max(1, std::min(threads_, cores_ - lent_.load(std::memory_order_relaxed))); }

  int threads_;
  int all_cores_ = 1;  // the processors this process may run on (host_processors)
  int cores_ = 1;      // those, or a tensor-parallel rank's share of them (share_host)
  std::atomic<int> lent_{0};
  bool deterministic_ = true;
  ScalarType act_;
  BatchView batch_;
  std::vector<float> x32_, y32_;  // fp32 staging of bf16 GEMM operands
};

}  // namespace pagedrt::cpu
