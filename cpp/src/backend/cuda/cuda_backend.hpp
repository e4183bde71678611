// backend/cuda/cuda_backend.hpp — the CUDA backend (sm_90 first): bf16
// weights, activations and KV cache, fp32 accumulation, fp32 residual stream
// and logits. Every op is queued on one stream; to_host() waits for it.
//
// Per step: begin_step() packs the BatchView into pinned memory and uploads it
// with one asynchronous copy, and builds the attention plan (which tokens
// decode, how the context is split, which 64-row prefill tiles exist; on the
// very first step, lazily in paged_attention(), once the head counts are
// known) and uploads it the same way; every layer reuses both. Decode steps
// of a few sequences run as recorded CUDA graphs (run_step()).
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <tuple>
#include <array>
#include <vector>

#include "backend/backend.hpp"
#include "backend/cuda/gemm.hpp"
#include "backend/cuda/kernels.cuh"

namespace pagedrt::cuda {

// A pinned host buffer and a device buffer of the same size, for uploads that
// recur (batch, plan, block copies). The event guards the host side's reuse.
class Staging {
 public:
  Staging() = default;
  ~Staging();
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  // Host memory for `bytes`, once the previous upload from it has finished.
  uint8_t* host(size_t bytes);
  uint8_t* device() const { return dev_; }
  void upload(size_t bytes, cudaStream_t stream);

 private:
  uint8_t* host_ = nullptr;
  uint8_t* dev_ = nullptr;
  size_t cap_ = 0;
  cudaEvent_t done_ = nullptr;
};

class CudaBackend final : public Backend {
 public:
  // activation_dtype BF16: bf16 weights, activations and KV (the fast path);
  // F32: fp32 everywhere (the validation mode: the CPU backend's numbers up to
  // the order of fp32 sums).
  // device_index: the GPU (of those visible), -1 for the current one.
  // deterministic: the batch-invariant mode (issue 22, docs/determinism.md):
  // a token's every result has the same bits whatever else is in its step,
  // however its sequence's tokens are split between prefill chunks and
  // decode steps, with or without CUDA graphs. Every GEMM shape runs one
  // pinned cuBLASLt algorithm for all n (Gemm); attention runs every token of
  // a bf16 model through the prefill kernel's tiles (plan_attention), and
  // every token of an fp32 one through the CUDA-core kernel unsplit; RoPE and
  // the KV append are never fused into attention. fp8 weights and caches are
  // not served in it.
  explicit CudaBackend(ScalarType activation_dtype, int device_index = -1, bool deterministic = false);
  ~CudaBackend() override;
  int device_index() const override { return device_; }
  cudaStream_t stream() const { return stream_; }  // every op's (the NCCL calls' too: backend/cuda/nccl.hpp)
  void make_current() override;
  void forget_steps() override;  // on its own GPU, the caller's given back; throws nothing
  void mark_step_end() override;  // an event on the stream
  bool step_finished() override;  // that event's state; a failure names the GPU
  Device device() const override { return Device::CUDA; }
  ScalarType activation_dtype() const override { return act_; }
  int64_t memory_free() const override;
  std::unique_ptr<KvMemory> reserve_kv(const std::vector<int64_t>& shape, ScalarType dtype, int64_t count,
                                       int64_t chunk_bytes) override;  // kv_memory.cu
  void synchronize() override;
  void check_attention(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) const override;

  Tensor load_weight(const std::vector<WeightView>& parts, ScalarType dtype) override;
  // fp8 weights (W8A8): bf16 activations on an sm_89+ GPU; linear() quantizes
  // x per token (fp8_rows.hpp) and multiplies e4m3 codes (Gemm::run_f8).
  bool has_fp8_weights() const override { return fp8_weights_; }
  bool fp8_shape_ok(int64_t rows, int64_t k) const override { return rows % 16 == 0 && k % 16 == 0; }
  void warm_linear(const Tensor& weight, int64_t max_rows, ScalarType out_dtype) override;
  bool warm_linear_into_residual(const Tensor& weight, int64_t max_rows) override;
  void warm_linear_silu_mul(const Tensor& gate_up_weight, int64_t max_rows) override;
  int64_t glu_min_rows() const override;
  int64_t gemm_picks_asked() const override;
  int64_t fp8_codes_taken() const override { return fp8_codes_taken_; }
  int64_t fp8_x_quantized_in_gemv() const override { return fp8_gemv_quantized_; }
  std::vector<int64_t> decode_plan(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) override;
  std::vector<int64_t> prefill_plan(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) override;
  Tensor empty(std::vector<int64_t> shape, ScalarType dtype) override;
  Tensor from_host(const Tensor& host) override;

  void begin_step(const BatchView& batch) override;
  // Decode steps of up to kMaxRecordedDecodeTokens sequences (padded:
  // padded_tokens), and steps of up to kMaxRecordedTokens tokens none of
  // whose sequences has more than kMaxRecordedQuery (speculative verify
  // steps: a sequence's last token and its proposals), are recorded into a
  // CUDA graph per key, the second time the key comes, and replayed
  // (PAGEDRT_CUDA_GRAPHS=0 turns this off).
  void run_step(uint64_t key, const std::function<void()>& body) override;
  void embedding(const Tensor& table, int64_t first_id, Tensor& out) override;
  void rms_norm(const Tensor& x, const Tensor& weight, float eps, int64_t n, Tensor& out) override;
  void add_rms_norm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps, int64_t n,
                    Tensor& out) override;
  void linear(const Tensor& x, const Tensor& weight, int64_t n, Tensor& out) override;
  bool linear_into_residual(const Tensor& x, const Tensor& weight, int64_t n, Tensor& residual) override;
  void add(Tensor& residual, const Tensor& x, int64_t n) override;
  void rope_and_cache(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, Tensor& k_cache, Tensor& v_cache) override;
  void paged_attention(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
                       Tensor& out) override;
  void silu_mul(const Tensor& gate_up, int64_t n, Tensor& out) override;
  // Decode-only steps: RoPE and the KV append inside decode attention.
  void rope_cache_attention(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, float scale, Tensor& k_cache, Tensor& v_cache, Tensor& out) override;
  // The prefill tiles that hold a logit row (AttentionPlan::logit_prefill), every decode item.
  void rope_cache_attention_logit_rows(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                                       int64_t head_dim, float scale, Tensor& k_cache, Tensor& v_cache,
                                       Tensor& out) override;
  // n <= 8 rows (bf16): SiLU·mul in the own GEMV's epilogue.
  void linear_silu_mul(const Tensor& x, const Tensor& gate_up_weight, int64_t n, Tensor& gate_up,
                       Tensor& out) override;
  void gather_rows(const Tensor& x, Tensor& out) override;
  void copy_blocks(Tensor& cache, const std::vector<BlockCopy>& copies) override;
  std::shared_ptr<void> host_alloc(size_t bytes) override;
  void swap_blocks(Tensor& cache, const std::vector<BlockCopy>& pairs, void* host, bool to_host) override;
  void to_host(const Tensor& src, int64_t numel, float* dst) override;
  bool has_argmax() const override { return true; }
  void argmax(const Tensor& logits, int64_t rows, int32_t* out, const RowMasks& masks) override;
  bool has_sample() const override { return sample_; }
  void sample(const Tensor& logits, const SampleRow* rows, int64_t n, const LogitEdit* edits, int64_t num_edits,
              int32_t* out, DrawLogprobs* logprobs, const DrawMasks& masks) override;  // sampling.cu
  bool defers_results() const override { return true; }
  void begin_results(bool defer) override;
  int32_t end_results() override;
  void collect(int32_t ticket) override;
  uint32_t* mask_gate(size_t words) override;
  const uint32_t* queue_gated_masks(uint64_t id, size_t words) override;
  void open_mask_gate(uint64_t id) override;
  void download(const Tensor& src, void* dst) override;

 private:
  // Device pointers into batch_ (valid for the current step).
  struct StepArrays {
    const int32_t* token_ids = nullptr;
    const int32_t* positions = nullptr;
    const int64_t* slot_mapping = nullptr;
    const int32_t* query_start = nullptr;
    const int32_t* page_indptr = nullptr;
    const int32_t* page_indices = nullptr;
    const int32_t* logits_indices = nullptr;
    const int32_t* token_seq = nullptr;
  };
  struct AttentionPlan {
    uint64_t step = ~0ull;
    int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
    DecodePlan decode{};
    PrefillPlan prefill{};
    // prefill's tiles that hold one of the step's logit rows (its last layer,
    // rope_cache_attention_logit_rows); all of them in a recordable step,
    // whose recording keeps its tile count.
    PrefillPlan logit_prefill{};
    bool slots_fit = true;  // every decode item's KV slot fits its int32 (the fused append)
    // Decode's grid is at most a block an SM (batch-1 decode): latency, not
    // bandwidth (the CUDA-core kernel's steps; an fp8 cache's fused append).
    bool decode_one_wave = false;
    // fp8 KV with prefill tiles: the prefill sequences' blocks, dequantized
    // to bf16 into fp8_scratch_ before the prefill kernel (its page table:
    // fp8_pages, page_indices with those entries renumbered 0 .. num_fp8_pages).
    const int32_t* fp8_src = nullptr;    // (num_fp8_pages) cache blocks
    const int32_t* fp8_pages = nullptr;  // (page_indptr[num_seqs]) renumbered page table
    int64_t num_fp8_pages = 0;
  };
  void plan_attention(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
  // Whether this step may be recorded: graphs on, few tokens, few per sequence.
  bool recordable() const;
  void clear_graphs(bool split_steps_only = false);  // split steps only: those keyed with the partials
  // (model key, batch arrays, plan arrays, partials, decode items, splits,
  // chunk, sequences, prefill tiles): everything a recording holds by value
  using GraphKey = std::tuple<uint64_t, const void*, const void*, const void*, int, int, int, int, int>;
  static constexpr int32_t kMaxRecordedTokens = 64;        // any step of up to 17 tokens a sequence
  static constexpr int32_t kMaxRecordedDecodeTokens = 512;  // decode steps (one token a sequence; padded)
  static constexpr int32_t kMaxRecordedQuery = 17;  // 1 + the most proposals a step verifies (16)
  static constexpr size_t kMaxGraphs = 128;
  // paged_attention with the plan's prefill tiles, or its logit_prefill ones (logit_rows_only).
  void attend(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, int64_t num_heads,
              int64_t num_kv_heads, int64_t head_dim, float scale, Tensor& out, bool logit_rows_only);
  void paged_attention_fp8(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, float scale, Tensor& out, const PrefillPlan& f);
  template <typename T>
  AttentionParamsT<T> attention_params(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache, int64_t H,
                                       int64_t Hkv, int64_t D, float scale, Tensor& out) const;
  void upload_chunked(const uint8_t* src, size_t bytes, uint8_t* dst, int src_kind, int dst_kind, size_t elem);
  // The stacked parts as e4m3 codes with a scale per row (codes kept, others quantized on the device).
  Tensor load_fp8_weight(const std::vector<WeightView>& parts);
  // x (n, k) quantized per token into fp8_act_ (grown first where it is too
  // small); returns the codes, *scale the (n) scales.
  const uint8_t* quantize_act(const Tensor& x, int64_t n, int64_t k, const float** scale);
  // Whether the op before (a norm, silu_mul) wrote x's (n, k) codes into fp8_act_ (fp8_pending_).
  bool fp8_codes_pending(const Tensor& x, int64_t n, int64_t k) const {
    return fp8_pending_.x == x.data && fp8_pending_.n == n && fp8_pending_.k == k;
  }
  void ensure_fp8_act(int64_t n, int64_t k);
  // fp8_act_'s layout for x (n, k): its bytes, and where the scales start.
  static size_t fp8_act_scale_offset(int64_t n, int64_t k) { return (static_cast<size_t>(n * k) + 15) / 16 * 16; }
  static size_t fp8_act_size(int64_t n, int64_t k) {
    return fp8_act_scale_offset(n, k) + static_cast<size_t>(n) * 4;
  }

  int device_ = 0;
  int num_sms_ = 132;
  bool deterministic_ = false;  // the batch-invariant mode (the constructor)
  cudaEvent_t step_end_ = nullptr;  // mark_step_end()'s
  ScalarType act_ = ScalarType::BF16;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Gemm> gemm_;

  BatchView host_{};   // the caller's arrays, valid during the step
  uint64_t step_ = 0;
  Staging batch_, plan_, copies_, masks_;
  // Results of a step (argmax's picks, sample's draws), two steps' worth for
  // async scheduling: a step uses slot_ (begin_results alternates it); a
  // deferred step's copies to the caller wait in pending_ until collect().
  struct HostCopy {
    const void* src;  // pinned
    void* dst;
    size_t bytes;
  };
  Staging picks_[2], samples_[2];
  const int32_t* draws_dev_[2] = {};  // sample()'s tokens on the device, per slot
  std::vector<HostCopy> pending_[2];
  cudaEvent_t results_done_[2] = {};
  int slot_ = 0;
  bool defer_ = false;
  Tensor processed_;  // sample(): the processed rows of draws with edits or masks (grown as needed)
  // mask_gate(): the host buffer (pinned), its device copy, their capacity
  // in words, and the event after the last gated copy; the gate's flag
  // (pinned and mapped: the stream waits on it, cuStreamWaitValue32, until
  // open_mask_gate writes an id at least the one queued) and the last id queued.
  uint32_t* gate_host_ = nullptr;
  uint32_t* gate_dev_ = nullptr;
  size_t gate_cap_ = 0;
  cudaEvent_t gate_copied_ = nullptr;
  volatile uint32_t* gate_flag_ = nullptr;
  void* gate_flag_dev_ = nullptr;
  uint32_t gate_queued_ = 0;
  // PAGEDRT_GATE_TIMING=1 (diagnostics): timed events around each gated copy
  // (before the wait, after the copy) and at its step's end_results; the
  // destructor prints the medians of forward (previous end to this wait),
  // stall (the wait and copy) and picks (copy to results).
  bool gate_timing_ = false;
  bool gate_pending_timing_ = false;
  std::vector<std::array<cudaEvent_t, 3>> gate_events_;  // ring of (before wait, after copy, results)
  size_t gate_event_next_ = 0;
  std::vector<std::array<float, 3>> gate_ms_;  // (forward, stall, picks)
  void time_gates(size_t slot);
  StepArrays dev_{};
  AttentionPlan plan_info_{};
  std::vector<BlockCopy> last_copies_;  // what copies_ holds on the device
  Staging swaps_[2];                    // swap_blocks' pairs: [0] into the pool, [1] out of it
  std::vector<BlockCopy> last_swaps_[2];  // what each holds on the device
  bool fp8_weights_ = false;      // has_fp8_weights()
  int64_t fp8_max_k_ = 0;         // the longest row of the fp8 weights loaded (0: none)
  uint8_t* fp8_act_ = nullptr;    // fp8 weights: x's codes (n, k), then its scales (n); grown in begin_step
  size_t fp8_act_bytes_ = 0;
  // The op (a norm, silu_mul) whose output's codes fp8_act_ holds (written
  // with it: fp8_norm_out), for the next linear to take instead of quantizing
  // x again; any linear clears it, as does begin_step. x null: none.
  struct Fp8Pending {
    const void* x = nullptr;
    int64_t n = 0, k = 0;
  } fp8_pending_;
  int64_t fp8_codes_taken_ = 0;  // linears that took a norm's or silu_mul's codes
  int64_t fp8_gemv_quantized_ = 0;  // fp8 linears whose GEMV quantized x itself (Gemm::run_f8_quant_x)
  // Where a norm of (n, d) bf16 rows writes its codes as well (none: q null):
  // with fp8 weights and the fusions on, where fp8_act_ holds them.
  Fp8Out fp8_norm_out(const Tensor& out, int64_t n, int64_t d) const;
  bf16* fp8_scratch_ = nullptr;  // fp8 KV prefill: (2, pages, block_size, Hkv, D) bf16, grown as needed
  size_t fp8_scratch_bytes_ = 0;
  float* partials_ = nullptr;  // decode splits: merge tickets (tickets_bytes_), then partials (o, lse)
  size_t partials_bytes_ = 0, tickets_bytes_ = 0;
  bool graphs_enabled_ = true;
  bool graph_log_ = false;  // PAGEDRT_GRAPH_LOG=1: each key run first or recorded, on stderr (diagnostics)
  // PAGEDRT_GRAPH_LOG=1: when begin_step began (its host time, to run_step's start, goes in run_step's line)
  std::chrono::steady_clock::time_point begin_start_{};
  // Decode splits of up to kMaxClusterSplits merge inside a thread block
  // cluster (sm_90) instead of a second kernel (PAGEDRT_DECODE_CLUSTERS=0: never).
  bool clusters_ = true;
  bool fuse_ = true;  // rope_cache_attention and linear_silu_mul fuse (PAGEDRT_CUDA_FUSE=0: never, for A/B runs)
  // fp8 linears of up to 2 rows quantize x inside the GEMV (Gemm::run_f8_quant_x;
  // PAGEDRT_FP8_GEMV_QUANT=0 or PAGEDRT_CUDA_FUSE=0: a kernel of its own, for A/B runs)
  bool gemv_quant_x_ = true;
  // The bf16 decode kernel's shape (PAGEDRT_DECODE_KERNEL=WxS, for
  // benchmarks; unset, 2 x 3, and 4 x 3 for contexts 2 x 3 would cut into
  // more than 32 splits). decode_slots_: how many blocks of a shape the GPU
  // holds at once, per head dim (made when first asked): the split policy
  // counts waves of them.
  DecodeConfig decode_config_{};
  // PAGEDRT_DECODE_KERNEL=WxS forces the tensor-core kernel, =cc the
  // CUDA-core one; unset, the plan picks per step (DecodePlan::cuda_cores).
  enum class DecodeKernel { Auto, TensorCores, CudaCores } decode_kernel_ = DecodeKernel::Auto;
  int prefill_rows_ = 0;  // PAGEDRT_PREFILL_ROWS=64 or 128 (A/B runs); 0: prefill_rows(head dim)
  // Prefill tiles of 128 rows at D = 128 on a wgmma kernel: on an sm_90 GPU
  // with a build that has it, unless PAGEDRT_PREFILL_KERNEL=mma; the
  // warp-specialized one (attention_prefill_ws.cu) unless =wgmma asks for
  // the first; PAGEDRT_PREFILL_STAGES=2|3 sets its ring (A/B runs).
  bool prefill_wgmma_ = false;
  bool prefill_ws_ = true;
  int prefill_stages_ = 2;
  int decode_splits_ = 0;  // PAGEDRT_DECODE_SPLITS: 0 = the plan chooses
  // PAGEDRT_PREFILL_DEAL=rounds: a prompt's prefill tiles dealt to the
  // persistent kernel's blocks round-robin, as before session 44 (A/B runs).
  bool prefill_snake_ = true;
  bool decode_heads_first_ = true;  // PAGEDRT_DECODE_GRID=items: the decode grid's items innermost (A/B runs)
  bool sample_ = true;  // sampled rows drawn on the GPU (PAGEDRT_CUDA_SAMPLE=0: on the host, for A/B runs)
  std::map<std::pair<int, int>, int> decode_slots_;  // (head dim, fp8 x 100 + warps x 10 + stages) -> blocks the GPU holds
  int64_t decode_slots(int64_t head_dim, DecodeConfig config);
  std::map<GraphKey, cudaGraphExec_t> graphs_;
  // Keys run directly, not yet recorded, and the step (step_) each was last
  // seen at: a key seen again within record_window_ steps is recorded
  // (PAGEDRT_GRAPH_RECORD_WINDOW; 0: whenever it comes again).
  std::map<GraphKey, uint64_t> seen_at_;
  uint64_t record_window_ = 32;

  // weight upload: two pinned chunks, two device chunks (for conversions)
  uint8_t* load_host_[2] = {nullptr, nullptr};
  uint8_t* load_dev_[2] = {nullptr, nullptr};
  cudaEvent_t load_done_[2] = {nullptr, nullptr};
};

}  // namespace pagedrt::cuda
