// backend/backend.hpp — the ops a model forward is written against.
//
// One Backend per device. The engine builds a BatchView on the host once per
// step; begin_step() hands it to the backend (a device backend uploads it
// once, the "plan"), then every layer's ops read it. The paged KV cache's
// layout is backend/paged_kv.hpp's.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend/kv_memory.hpp"
#include "backend/paged_kv.hpp"
#include "backend/tensor.hpp"

namespace pagedrt {

// Where a fed-back token comes from: source >= 0: row `source` of that step's
// argmax; else its draw -1 - source (Backend::sample's order).
struct TokenFeedback {
  int32_t token = 0;
  int32_t source = 0;
};

// One engine step, flattened. All arrays are host memory owned by the caller
// and valid until the step ends.
struct BatchView {
  int32_t num_tokens = 0;
  const int32_t* token_ids = nullptr;     // (num_tokens)
  const int32_t* positions = nullptr;     // (num_tokens) position of each token in its sequence
  const int64_t* slot_mapping = nullptr;  // (num_tokens) flat KV slot each token writes (-1: none, Batch::pad)

  int32_t num_seqs = 0;
  const int32_t* query_start = nullptr;   // (num_seqs + 1) tokens of seq i: [query_start[i], query_start[i+1])
  const int32_t* seq_lens = nullptr;      // (num_seqs) context length after this step
  const int32_t* page_indptr = nullptr;   // (num_seqs + 1) CSR offsets into page_indices
  const int32_t* page_indices = nullptr;  // (page_indptr[num_seqs]) block ids

  int32_t num_logits = 0;
  const int32_t* logits_indices = nullptr;  // (num_logits) rows of the batch whose logits are needed

  // Async scheduling (engine/engine.hpp): tokens whose ids an earlier step
  // picked or drew on the device and the host has not read yet. For a backend
  // that defers_results(): token_ids[feedback[i].token] is a placeholder and
  // the id is that step's (the one end_results() gave `feedback_ticket`).
  // Empty for the others: the engine writes the ids itself.
  int32_t num_feedback = 0;
  const TokenFeedback* feedback = nullptr;
  int32_t feedback_ticket = 0;
};

// Allowed-token masks of some logits rows, for Backend::argmax: row r may
// pick token t only if bit t % 32 of words[mask_of_row[r] * words_per_row +
// t / 32] is set; mask_of_row[r] < 0: no mask. Host memory, valid during the
// call; `gated`: `words` is what Backend::queue_gated_masks returned (read in
// stream order, after the gate opens).
struct RowMasks {
  const int32_t* mask_of_row = nullptr;  // (rows) or null: no row masked
  const uint32_t* words = nullptr;       // (num_masks, words_per_row)
  int32_t num_masks = 0;
  int64_t words_per_row = 0;
  bool gated = false;
};

// One draw for Backend::sample, from logits row `row`. First the row is
// processed (the edits, below; the raw row stays as it is). temperature 0:
// the token is the first index of the largest processed logit (NaN never
// chosen), as the host's greedy pick. Else: weights
// w_t = exp((x_t - max) / temperature), held as fixed-point integers
// (w * 2^31, rounded down: exact, order-free sums; a token below 2^-31 of the
// most likely gets weight 0). Candidates: the top_k most likely (0: all; ties
// to the lower id), then the smallest most-likely-first prefix of them
// holding top_p of their weight (1: all), then those of at least min_p times
// the most likely's weight (0: all). The token: the first candidate, in id
// order, whose running weight passes floor(u * total), u the 64 bits of
// Philox4x32-10 at (key, counter) as a fraction (backend/philox.hpp).
// logprobs >= 0: the token's log-probability under the *raw* row's
// log-softmax and the row's `logprobs` most likely tokens (DrawLogprobs).
// mask >= 0 (structured output): the tokens DrawMasks' mask `mask` does not
// allow are -inf before anything else (the host's Sampler::apply_mask); a
// mask that allows no token is the caller's to catch.
struct SampleRow {
  int32_t row = 0;
  int32_t top_k = 0;
  float temperature = 1.0f;
  float top_p = 1.0f;
  float min_p = 0.0f;
  int32_t logprobs = -1;                 // 0..kMaxLogprobs; -1: none
  uint64_t key = 0;
  uint64_t counter = 0;
  int32_t first_edit = 0, num_edits = 0;  // LogitEdit range: sorted by token, each token once
  float repetition_penalty = 1.0f, frequency_penalty = 0.0f, presence_penalty = 0.0f;
  int32_t mask = -1;                     // index into sample()'s DrawMasks; -1: none
  uint32_t scratch = 0;                  // the backend's own (CUDA: which processed-row buffer the draw writes)
};

// Allowed-token masks of Backend::sample's draws: mask i is words[i *
// (vocab + 31) / 32 ..], bit t % 32 of word t / 32 set: token t allowed.
// Host memory, valid during the call; `gated` as RowMasks'.
struct DrawMasks {
  const uint32_t* words = nullptr;  // (num_masks, (vocab + 31) / 32)
  int32_t num_masks = 0;
  bool gated = false;
};

// How one token of a draw's row is processed, in Sampler::process's order:
// x + bias (kEditBias); -inf (kEditBan: min_tokens' eos and stop ids); the
// repetition penalty, x > 0 ? x / r : x * r (kEditSeen: in the prompt or the
// output); then count > 0: x - fma(frequency_penalty, count, presence_penalty)
// (count: its occurrences in the output). Every step correctly rounded fp32,
// so the device's processed logits equal the host's bit for bit.
enum : uint32_t { kEditBias = 1u, kEditBan = 2u, kEditSeen = 4u };
struct LogitEdit {
  int32_t token = 0;
  uint32_t flags = 0;
  float bias = 0.0f;
  int32_t count = 0;
};

// A draw's log-probabilities (SampleRow::logprobs >= 0), of the raw row.
constexpr int32_t kMaxLogprobs = 20;
struct DrawLogprobs {
  float logprob = 0.0f;  // the drawn token's
  int32_t count = 0;     // top entries: min(logprobs, vocab), most likely first (ties: lower id)
  int32_t top_ids[kMaxLogprobs] = {};
  float top_logprobs[kMaxLogprobs] = {};
};

// A checkpoint tensor for load_weight: its bytes (a mapped file, valid during
// the call) and what they hold. The model makes these from the safetensors
// reader; the backends know nothing of files.
struct WeightView {
  enum class Type { F32, F16, BF16, F8E4M3 };
  Type type = Type::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  const float* row_scale = nullptr;  // F8E4M3: (rows) each row's scale (a checkpoint's codes, kept as they are)

  int64_t numel() const;
  size_t element_size() const { return type == Type::F32 ? 4 : type == Type::F8E4M3 ? 1 : 2; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * element_size(); }
};

struct RopeTable {
  Tensor cos;  // (max_positions, head_dim / 2) fp32
  Tensor sin;  // (max_positions, head_dim / 2) fp32
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  // The GPU it runs on (an index among those visible); -1 on the CPU.
  virtual int device_index() const { return -1; }
  // dtype of the activations between ops (the residual stream stays fp32 on
  // every backend) and of the KV cache: the activations' (CPU: F32 or BF16;
  // CUDA: BF16, or F32 for validation), or F8E4M3 after use_fp8_kv(true)
  // (kv_cache_dtype "fp8": paged_kv.hpp's Fp8Kv blocks).
  virtual ScalarType activation_dtype() const = 0;
  ScalarType kv_dtype() const { return fp8_kv_ ? ScalarType::F8E4M3 : activation_dtype(); }
  void use_fp8_kv(bool on) { fp8_kv_ = on; }
  // Bytes of device memory free now; -1 where that is not a fixed pool (CPU).
  virtual int64_t memory_free() const { return -1; }
  // Throws Error(Unsupported) for an attention shape this backend has no kernel for.
  virtual void check_attention(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) const {}
  // Waits until every op queued so far has finished (a no-op on the CPU).
  virtual void synchronize() {}
  // Makes this backend's device the calling thread's current one (CUDA:
  // cudaSetDevice; nothing on the CPU). The ranks of a tensor-parallel model
  // have a GPU each: a thread calls this before it queues another rank's ops.
  virtual void make_current() {}

  // Weights: converted from the checkpoint's type to `dtype` (F32 or BF16;
  // F8E4M3 where has_fp8_weights(): fp8 views kept as they are, the others
  // quantized per row, host_fp8_weight). Several 2-D `parts` with the same
  // column count are stacked (fused QKV).
  virtual Tensor load_weight(const std::vector<WeightView>& parts, ScalarType dtype) = 0;
  // A linear's weight (x @ W^T), and a tied embedding's table (the lm head's
  // weight): load_weight, in a layout of the backend's choosing (the CPU packs
  // bf16 rows for its kernel: cpu/gemm.hpp); linear() and embedding() read it.
  virtual Tensor load_linear_weight(const std::vector<WeightView>& parts, ScalarType dtype) {
    return load_weight(parts, dtype);
  }
  // Whether linear() takes F8E4M3 weights (RuntimeConfig::quantization "fp8").
  virtual bool has_fp8_weights() const { return false; }
  // Whether its fp8 GEMMs take a weight of (rows, k) (CUDA: both multiples of
  // 16); an fp8 checkpoint's group that they do not take loads dequantized.
  virtual bool fp8_shape_ok(int64_t rows, int64_t k) const { return true; }
  // Prepares now what linear() with `weight` and up to `max_rows` rows of
  // `out_dtype` output will need, so no step waits for it (CUDA: cuBLASLt's
  // algorithm picks, one per band of rows: Gemm::warm). Nothing on the CPU.
  virtual void warm_linear(const Tensor& weight, int64_t max_rows, ScalarType out_dtype) {}
  // The same for a projection that goes through linear_into_residual() first
  // and linear() where that declines (CUDA: the bands of rows each takes).
  // Returns whether it warmed both; false (the CPU, other dtypes): the caller
  // warms linear() alone.
  virtual bool warm_linear_into_residual(const Tensor& weight, int64_t max_rows) { return false; }
  // The same for linear_silu_mul's [gate; up] weight (CUDA: only the rows
  // below glu_min_rows(), where cuBLASLt runs the product).
  virtual void warm_linear_silu_mul(const Tensor& gate_up_weight, int64_t max_rows) {
    warm_linear(gate_up_weight, max_rows, activation_dtype());
  }
  // The fewest rows from which linear_silu_mul runs bf16 weights through the
  // gate/up GEMM with the SiLU·mul in its epilogue (CUDA on Hopper:
  // glu_gemm.hpp); 0: never.
  virtual int64_t glu_min_rows() const { return 0; }
  // How many times cuBLASLt's heuristic was asked for an algorithm (CUDA; tests read it).
  virtual int64_t gemm_picks_asked() const { return 0; }
  // How many fp8 linears have taken their x's codes from the op before them (a
  // norm, or silu_mul after a cuBLASLt gate/up GEMM) instead of quantizing x
  // (CUDA's fused codes; tests read it).
  virtual int64_t fp8_codes_taken() const { return 0; }
  // How many fp8 linears have quantized x inside their GEMM instead of in a
  // kernel of its own (CUDA, up to 2 rows; tests read it).
  virtual int64_t fp8_x_quantized_in_gemv() const { return 0; }
  // The shape of this step's decode attention for these head counts: (warps,
  // stages, splits, keys a split, 1 where the CUDA-core kernel runs it) of a
  // backend that plans one (CUDA; tests read it), else empty.
  virtual std::vector<int64_t> decode_plan(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) { return {}; }
  // This step's prefill plan: 1 where its tiles are dealt in a snake, else 0,
  // then the tiles in the order their blocks start, (sequence, first row)
  // pairs, flattened (CUDA; tests read it); else empty.
  virtual std::vector<int64_t> prefill_plan(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) { return {}; }
  virtual Tensor empty(std::vector<int64_t> shape, ScalarType dtype) = 0;
  virtual Tensor from_host(const Tensor& host) = 0;
  // An elastic KV pool's memory (backend/kv_memory.hpp): `count` tensors of
  // `shape` (blocks first), address ranges reserved, nothing mapped; chunks
  // of at least `chunk_bytes` over all tensors. Null where the device cannot
  // (the pool is then taken whole).
  virtual std::unique_ptr<KvMemory> reserve_kv(const std::vector<int64_t>& shape, ScalarType dtype, int64_t count,
                                               int64_t chunk_bytes) = 0;

  // The token count a step runs with: its own, or for a decode step (one
  // token and one logits row a sequence) of more than 2 tokens where this
  // backend pads, decode_bucket's, the rest sequences of one dummy token
  // (Batch::pad) whose outputs are never read, so that steps of nearby sizes
  // share one recording (run_step). CUDA pads (PAGEDRT_DECODE_PAD=0: not);
  // the CPU, which records nothing, only with PAGEDRT_DECODE_PAD=1 (tests).
  int32_t padded_tokens(const BatchView& batch) const;

  virtual void begin_step(const BatchView& batch) = 0;

  // Queues the ops body() queues, for the current step. A device backend may
  // record them once per `key` and replay the recording in later steps (CUDA
  // graphs: one launch instead of hundreds). The caller promises that for the
  // same key body() queues the same ops on the same tensors with the same
  // sizes, so a tensor that is reallocated, or a size that changes, must
  // change the key. Host-side results (to_host, argmax) stay outside body.
  virtual void run_step(uint64_t key, const std::function<void()>& body) { body(); }
  // Drops run_step's recordings (without waiting for the device); later
  // steps record afresh. Tensor parallelism on CUDA: NCCL keeps its
  // communicators while a recording that captured them lives.
  virtual void forget_steps() {}
  // Marks the end of the work queued so far (CUDA: an event on the stream),
  // for step_finished(). Nothing on the CPU, whose ops finish as they return.
  virtual void mark_step_end() {}
  // Whether the work queued up to mark_step_end() has finished, without
  // waiting; throws Error(Runtime) naming the device where it failed (a
  // kernel's fault). Tensor-parallel ranks on GPUs are waited for by polling
  // this: a rank whose kernels fault never joins its next collective, and a
  // blocking wait on another rank would never return.
  virtual bool step_finished() { return true; }

  // Dtypes: x/out of the ops below are activation_dtype(), except `residual`
  // (always F32), embedding's out (F32: it starts the residual), linear's out
  // (activation_dtype() or F32, for the logits) and gather_rows (any dtype).
  //
  // out (num_tokens, hidden) = table (rows, hidden) [token_ids - first_id];
  // zero rows for ids outside [first_id, first_id + rows) (a vocabulary-parallel
  // shard of the table, model/tp_plan.hpp)
  virtual void embedding(const Tensor& table, int64_t first_id, Tensor& out) = 0;
  // out = rms_norm(x) * weight over the first n rows of x (n, hidden); may be in place
  virtual void rms_norm(const Tensor& x, const Tensor& weight, float eps, int64_t n, Tensor& out) = 0;
  // residual += x; out = rms_norm(residual) * weight, over the first n rows
  virtual void add_rms_norm(Tensor& residual, const Tensor& x, const Tensor& weight, float eps, int64_t n,
                            Tensor& out) = 0;
  // out (n, out_features) = x (n, in_features) @ weight (out_features, in_features)^T;
  // only the first `n` rows of x and out are used.
  virtual void linear(const Tensor& x, const Tensor& weight, int64_t n, Tensor& out) = 0;
  // residual (n, out_features) += x @ weight^T in one GEMM (fp32 accumulate,
  // the product never rounded to the activation dtype) where the backend has
  // one for this call's rows; false, nothing done, where not: then linear()
  // and an add. CUDA: cuBLASLt with beta = 1 from 64 rows up
  // (Gemm::run_accumulate); the CPU never (its linear + add_rms_norm).
  virtual bool linear_into_residual(const Tensor& x, const Tensor& weight, int64_t n, Tensor& residual) {
    return false;
  }
  // residual += x over the first n rows (n, hidden)
  virtual void add(Tensor& residual, const Tensor& x, int64_t n) = 0;
  // qkv (num_tokens, (H + 2 * Hkv) * D): rotates the q and k parts in place
  // (rotate-half RoPE at each token's position) and writes k and v into the
  // cache slots of the batch's slot_mapping.
  virtual void rope_and_cache(Tensor& qkv, const RopeTable& rope, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_dim, Tensor& k_cache,
                              Tensor& v_cache) = 0;
  // out (num_tokens, H * D) = causal attention of the q part of qkv over each
  // sequence's cached keys/values (positions 0 .. its position), read through
  // the page table. GQA: query head h reads kv head h / (H / Hkv).
  virtual void paged_attention(const Tensor& qkv, const Tensor& k_cache, const Tensor& v_cache,
                               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               float scale, Tensor& out) = 0;
  // gate_up (n, 2 * I) = [gate | up]; out (n, I) = silu(gate) * up
  virtual void silu_mul(const Tensor& gate_up, int64_t n, Tensor& out) = 0;

  // Fusions: each does what the ops it names do in turn (the defaults call
  // them), bitwise alike; a backend overrides one where a single kernel can.
  //
  // rope_and_cache, then paged_attention. qkv's q and k parts may be left
  // unrotated (the CUDA backend rotates them inside decode attention).
  virtual void rope_cache_attention(Tensor& qkv, const RopeTable& rope, int64_t num_heads, int64_t num_kv_heads,
                                    int64_t head_dim, float scale, Tensor& k_cache, Tensor& v_cache, Tensor& out);
  // The same where the caller reads only the step's logit rows of `out`
  // (logits_indices; the last layer, LlamaModel::queue_step): every token's
  // K and V are cached, but attention may run for only the tiles of query
  // rows that hold a logit row (cut as among all rows, so each computed row
  // has the bits rope_cache_attention gives it), the other rows of `out`
  // left as they were. By default every row.
  virtual void rope_cache_attention_logit_rows(Tensor& qkv, const RopeTable& rope, int64_t num_heads,
                                               int64_t num_kv_heads, int64_t head_dim, float scale, Tensor& k_cache,
                                               Tensor& v_cache, Tensor& out) {
    rope_cache_attention(qkv, rope, num_heads, num_kv_heads, head_dim, scale, k_cache, v_cache, out);
  }
  // linear(x, gate_up_weight, n, gate_up), then silu_mul(gate_up, n, out);
  // gate_up (n, 2 I) is scratch that may be left unwritten.
  virtual void linear_silu_mul(const Tensor& x, const Tensor& gate_up_weight, int64_t n, Tensor& gate_up,
                               Tensor& out);
  // out (num_logits, hidden) = x[logits_indices]
  virtual void gather_rows(const Tensor& x, Tensor& out) = 0;
  // cache (num_blocks, ...): block dst = block src for every pair, in order
  virtual void copy_blocks(Tensor& cache, const std::vector<BlockCopy>& copies) = 0;
  // Host memory for KV blocks swapped out of the pool (preemption by swap):
  // page-locked on CUDA, so that swap_blocks' copies run on the stream.
  virtual std::shared_ptr<void> host_alloc(size_t bytes);
  // Whole blocks between cache (num_blocks, ...) and host slots of the same
  // size (slot s at host + s * block bytes): to_host, pairs are (cache block,
  // slot); else (slot, cache block). In stream order with the steps' kernels:
  // a block copied out may be reused by the next kernel, a block copied in is
  // read by the next forward.
  virtual void swap_blocks(Tensor& cache, const std::vector<BlockCopy>& pairs, void* host, bool to_host) = 0;
  // copies all of `src` (any dtype, raw bytes) into host memory `dst`; waits for it
  virtual void download(const Tensor& src, void* dst) = 0;
  // copies `src` (device, F32) into host memory `dst` (numel floats); waits for it
  virtual void to_host(const Tensor& src, int64_t numel, float* dst) = 0;
  // Greedy picks without the logits leaving the device: out[i] (host) = the
  // first index of the largest value of row i of logits (rows, vocab) F32, NaN
  // never chosen over a number; waits for it (unless deferred, below). With `masks`, row i's tokens
  // whose bit is clear count as -inf first (structured output), as the host
  // sampler's Sampler::apply_mask does. Backends without it (the CPU, where
  // the logits are host memory already) say so with has_argmax().
  virtual bool has_argmax() const { return false; }
  virtual void argmax(const Tensor& logits, int64_t rows, int32_t* out, const RowMasks& masks = {});
  // Sampling without the logits leaving the device: out[i] (host) = the
  // token of draw rows[i] (SampleRow) from logits (rows, vocab) F32, its
  // row processed by edits[rows[i].first_edit ..] (host memory, num_edits in
  // all); logprobs[i] (host; may be null when no draw asks) for draws with
  // logprobs >= 0; draws with a mask index take theirs from `masks`. Waits
  // for it. Several draws may read one row (n > 1).
  // has_sample(): whether the backend has it (CUDA).
  virtual bool has_sample() const { return false; }
  virtual void sample(const Tensor& logits, const SampleRow* rows, int64_t n, const LogitEdit* edits,
                      int64_t num_edits, int32_t* out, DrawLogprobs* logprobs, const DrawMasks& masks = {});

  // Async scheduling: between begin_results(true) and end_results(), argmax()
  // and sample() queue their work and the copies of their results and return
  // at once; their `out` arrays (which must stay valid) are written by
  // collect(ticket), which waits for them. The ticket also names the step in
  // a later BatchView::feedback. Backends whose ops finish on the calling
  // thread (the CPU) have nothing to defer: defers_results() is false and
  // the rest does nothing. Two steps' results may be outstanding at once.
  // collect(t) may run on another thread while this one launches the next
  // step (begin_results .. end_results of the other ticket): it touches only
  // ticket t's copies and event.
  virtual bool defers_results() const { return false; }
  virtual void begin_results(bool defer) {}
  virtual int32_t end_results() { return 0; }
  virtual void collect(int32_t ticket) {}
  // Picks and draws queued before the host has their masks (async
  // scheduling's structured steps: the masks are filled while the step's
  // forward runs, and the next step goes into the queue behind their picks
  // without waiting for them). mask_gate(words): host memory for `words`
  // uint32 (pinned on a GPU), the same buffer until a call asks for more.
  // queue_gated_masks(id, words): in stream order, waits until
  // open_mask_gate(id), then takes the buffer's first `words` words as they
  // are (a GPU copies them to its memory); returns where argmax() and
  // sample() read them (RowMasks::gated). open_mask_gate(id): any thread,
  // before or after the queue, once the buffer holds the masks; ids grow
  // from 1, one per gate. Here (a backend whose ops finish on the calling
  // thread) queue_gated_masks waits on the calling thread.
  virtual uint32_t* mask_gate(size_t words);
  virtual const uint32_t* queue_gated_masks(uint64_t id, size_t words);
  virtual void open_mask_gate(uint64_t id);
  // n of the host cores the backend's ops use are busy with other host work
  // (structured output's masks, filled beside the forward) until lent 0: a
  // backend that computes on host threads runs its ops on that many fewer.
  virtual void lend_threads(int n) {}
  // One of `ranks` tensor-parallel ranks on the host's cores (the CPU): its
  // ops count 1/ranks of the cores as theirs, so that lend_threads leaves
  // cores free of the ranks' teams together.
  virtual void share_host(int ranks) {}
  // The host threads the backend's next op runs on (0: it computes elsewhere).
  virtual int host_threads() const { return 0; }

 protected:
  // padded_tokens pads: `on` unless PAGEDRT_DECODE_PAD says otherwise ("0" / "1").
  void set_decode_padding(bool on);

 private:
  bool pad_decode_ = false;
  bool fp8_kv_ = false;
  struct HostGate;  // mask_gate's buffer and the last id opened
  std::shared_ptr<HostGate> gate_;
};

// The stacked `parts` as an fp8 weight in host memory (Tensor::row_scale
// set): F8E4M3 views' codes and scales as they are; other rows quantized
// with scale max |row| / 448 (1 for a zero row), codes rounded to nearest
// even (backend/fp8.hpp).
Tensor host_fp8_weight(const std::vector<WeightView>& parts);
// Columns [first, first + count) of an F32 / F16 / BF16 view w (rows, k) as
// host_fp8_weight({w}) quantizes them: each row's scale is the whole row's
// (a tensor-parallel rank's share of a row-parallel weight, model/llama.cpp).
Tensor host_fp8_columns(const WeightView& w, int64_t first, int64_t count);

// Decode steps of 3 to 512 tokens round up: to 4, to 8, then to a multiple of
// 8 (to 128 tokens), 16 (to 256) or 32 (to 512): 35 sizes with 1 and 2, so
// that a batch shrinking as its requests end replays a few recordings rather
// than recording each size (SmolLM2's JSON rounds stalled 1-11 ms of host
// time a size, H100 step trace 2026-12-06). Dummy rows cost little: a decode
// step's GEMMs read the weights once whatever the rows (at most 12.5% dummies
// past 64; 3 of 8 at 5), and a dummy's attention reads one key. Others keep
// their count.
int32_t decode_bucket(int32_t tokens);

// Backend::swap_blocks' addresses: copy(dst, src, bytes) once per pair, a
// whole block of `cache` to or from its host slot.
template <typename Copy>
void for_each_swap(const Tensor& cache, const std::vector<BlockCopy>& pairs, void* host, bool to_host, Copy copy) {
  const size_t block_bytes = cache.nbytes() / static_cast<size_t>(cache.dim(0));
  uint8_t* base = static_cast<uint8_t*>(cache.data);
  uint8_t* h = static_cast<uint8_t*>(host);
  for (const BlockCopy& c : pairs) {
    if (to_host)
      copy(h + c.dst * block_bytes, base + c.src * block_bytes, block_bytes);
    else
      copy(base + c.dst * block_bytes, h + c.src * block_bytes, block_bytes);
  }
}

}  // namespace pagedrt
