// pagedrt/runtime.hpp — the embeddable runtime.
//
//   Runtime rt(config);                       // loads the model, takes the KV pool
//   std::string id = rt.submit(tokens, params);
//   for (;;) for (Event& ev : rt.poll(0.1)) { ... if (ev.finished) ... }
//
// Thread safety: every public method may be called from any thread at once.
// An engine thread owned by the Runtime runs the steps; submit() and abort()
// only queue work and return at once; poll() waits at most `timeout_s`.
//
// Events: each event is delivered exactly once, and each request's events
// arrive in order, to whoever reads that request:
//   - poll(id) returns only request `id`'s events. From the first poll(id)
//     on (or from submit() with Delivery::ById) the request is owned by its
//     id: poll() without an id never sees its events again.
//   - poll() without an id returns the events of every request nobody owns,
//     in the order they were emitted.
//   - A reader that walks away calls release(id): the request ends if it is
//     still running and its events, queued and to come, are dropped.
// So a thread that submits with Delivery::ById and polls its ids never loses
// an event to a thread that polls without an id, and the reverse. A request
// id is in use from submit() until its final event has been read.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pagedrt/error.hpp"
#include "pagedrt/event.hpp"
#include "pagedrt/sampling_params.hpp"
#include "pagedrt/stats.hpp"
#include "pagedrt/token_mask.hpp"

namespace pagedrt {

struct RuntimeConfig {
  std::string model_path;          // a Hugging Face style model folder
  std::string device = "auto";     // "auto" (cuda when a GPU is visible, else cpu), "cpu" or "cuda"
  std::string dtype = "auto";      // weights: "auto" (fp32 stays fp32, else bf16), "float32", "bfloat16"
  std::string activation_dtype = "auto";  // activations between ops and the KV cache: "auto"
                                   // (cuda: as the weights; cpu: bfloat16 for bf16 weights on a
                                   // processor with AVX-512 BF16, else float32), "float32", "bfloat16"
  // Weight quantization at load: "" (none: the checkpoint's weights as they
  // are; an fp8 checkpoint with a scale per tensor or per channel keeps its
  // codes where the device runs fp8 weights, the CPU), or "fp8": each layer's
  // seven projections quantized to e4m3 with a scale per output channel (max
  // |row| / 448), no file written; embeddings, norms and the lm head stay as
  // they are. CPU only so far (the CUDA backend raises Unsupported).
  std::string quantization;
  // The KV cache's element type: "auto" (the activations'), or "fp8" (also
  // "fp8_e4m3"): e4m3 codes with a power-of-two scale per token and kv head,
  // dequantized inside the attention kernels: about twice the tokens of bf16
  // in the same bytes (backend/paged_kv.hpp's Fp8Kv). The draft model's
  // cache follows it.
  std::string kv_cache_dtype = "auto";
  int64_t kv_cache_bytes = 0;      // hard cap for the KV pool; 0 = default (512 MiB on the CPU,
                                   // gpu_memory_utilization of the free GPU memory after the weights)
  double gpu_memory_utilization = 0.9;  // CUDA, kv_cache_bytes = 0: fraction of free memory to use
  // The KV pool's address range is reserved whole and its memory mapped in
  // chunks as blocks are needed (CUDA virtual memory management; on the CPU,
  // pages as they are touched), up to the size above; chunks without a block
  // in use go back to the device after kv_idle_release_s seconds without
  // work (0: never). false: the whole pool is taken at start.
  bool elastic_kv = true;
  double kv_idle_release_s = 10.0;
  // Async scheduling: the engine schedules and launches step n + 1 while the
  // device runs step n, and reads step n's tokens after (steps whose every
  // row is picked or drawn on the device, without structured output,
  // penalties, beams, n > 1 forks, speculation, returned logits or prompt
  // logprobs; the others run one at a time). "auto": on where the device runs
  // steps asynchronously (CUDA); "on": also on the CPU, whose steps finish
  // as they are launched (each token's event then waits for the next step:
  // only for tests); "off".
  std::string async_scheduling = "auto";
  int32_t block_size = 16;         // tokens per KV block
  int32_t max_num_seqs = 64;       // sequences in one step at most
  int32_t max_num_batched_tokens = 2048;  // token budget of one step
  int32_t max_model_len = 0;       // prompt + output at most; 0 = the model's max positions
  bool enable_prefix_caching = true;
  // When a running request cannot get KV blocks, the latest admitted one
  // gives up its blocks: "recompute" (they are freed; its tokens are computed
  // again when it resumes), "swap" (they are copied to host memory and back
  // when it resumes; recompute when the swap space is full) or "auto" (swap
  // for a request of several sequences, which recomputed would no longer
  // share its prompt's blocks; for one sequence the cheaper of the two by the
  // seconds each took lately).
  std::string preemption_mode = "auto";
  // Host memory for swapped-out blocks (page-locked on CUDA; allocated at the
  // first swap), with preemption_mode "swap" or "auto"; 0 = as much as the KV
  // pool, at most 4 GiB.
  int64_t swap_space_bytes = 0;
  // Admission leaves at least this fraction of the pool's blocks free (rounded
  // up to whole blocks), in [0, 0.5): a waiting request is admitted only if,
  // with the blocks its tokens need (those the prefix cache does not hold;
  // the whole prompt also under chunked prefill; one block per further
  // sequence for n > 1 and beams), that many stay free, so the running
  // requests can grow without preempting each other. It holds for requests
  // resumed after preemption too, and is waived while nothing runs (a
  // request larger than the pool less the watermark runs alone). 0: none (a
  // request is admitted once its step's blocks fit).
  double kv_watermark = 0.01;
  int32_t num_threads = 0;         // CPU threads (on CUDA: the host sampler's); 0 = every core the process may run on (its affinity mask, at most its cgroup CPU quota)
                                   // (on CUDA: 4 at most, leaving cores to structured output's masks)
  // Batch-invariant results: a sequence's logits have the same bits whatever
  // else runs in its steps, however its prompt is chunked, cached or
  // recomputed after preemption (docs/determinism.md). Unset: the device's
  // default, on for the CPU (it costs nothing measurable there) but for bf16
  // activations on a processor with AMX (where off multiplies steps of 5 tokens
  // or more on AMX tiles, 3.4x the prefill rate), off for CUDA
  // (its batch-invariant mode gives up the own small-n GEMM kernel and
  // split-KV decode attention; with fp8 weights or cache, or tensor
  // parallelism, true there is an Unsupported error).
  std::optional<bool> deterministic;
  // Speculative decoding with a draft model (SamplingParams::speculative =
  // "draft"; docs/speculative.md): a smaller Llama-family model folder with
  // the same tokenizer (its vocab_size must equal the model's). It runs on the
  // same device with the model's weight dtype and its own paged KV cache of as
  // many blocks as the model's; kv_cache_bytes (or the GPU's share) covers
  // both caches. Empty: none.
  std::string draft_model;
  // Tensor parallelism (docs/tensor_parallel.md): 1, 2, 4 or 8 ranks, each
  // holding its share of every layer's heads and MLP columns, of the
  // embedding and lm head's vocabulary, and of every KV block's kv heads; one
  // engine, one scheduler, one logical block pool. The model's attention
  // heads, kv heads and intermediate size must divide by it. On the CPU the
  // ranks are teams of num_threads / size threads exchanging partial results
  // in memory; on CUDA rank r takes the r-th visible GPU and the ranks
  // exchange over NCCL, loaded at run time (not yet run on several GPUs).
  // kv_cache_bytes is the pool over all ranks.
  int32_t tensor_parallel_size = 1;
  // CUDA: the GPUs (indices among those visible, CUDA_VISIBLE_DEVICES) rank
  // r runs on: devices[r]; as many as tensor_parallel_size, all different.
  // Empty: the first tensor_parallel_size visible (one rank: the current GPU).
  // The constructing thread is left on rank 0's GPU.
  std::vector<int32_t> devices;
  // Optional: called on the constructing thread while the weights load, with
  // (parts loaded, parts in all): the embedding, each layer, the head. Not
  // kept after the constructor returns.
  std::function<void(int64_t done, int64_t total)> on_load_progress;
};

// Whether this build has the CUDA backend, and whether a GPU is visible to it
// (device "auto" then means "cuda").
bool cuda_built();
bool cuda_available();
// The GPUs visible to this process (CUDA_VISIBLE_DEVICES): a CUDA runtime of
// tensor_parallel_size N takes the first N.
int cuda_device_count();
// The CPU GEMM kernels this process runs and their decode prefetch hint,
// with how it was chosen (calibrated at the first CPU runtime, or
// PAGEDRT_CPU_PREFETCH): "avx512bf16, prefetch l2 (calibrated: ...)".
std::string cpu_gemm_info();

// Who reads a request's events (see "Events" above).
enum class Delivery {
  Any,   // poll() without an id, until someone polls the request by id
  ById,  // only poll(request_id), from the start
};

struct ModelInfo {
  std::string architecture;
  int64_t vocab_size = 0;
  int64_t num_layers = 0;
  int64_t hidden_size = 0;
  int64_t max_model_len = 0;
  int32_t bos_token_id = -1;
  std::vector<int32_t> eos_token_ids;
  std::string weight_dtype;        // "float32" or "bfloat16"; "float8_e4m3fn" where the projections are fp8 (the rest is bf16 or fp32)
  std::string quantization;        // the checkpoint's quant_method ("fp8", "fbgemm_fp8", "compressed-tensors"), or "fp8" (RuntimeConfig::quantization); "" for none
  std::string activation_dtype;    // "float32" or "bfloat16"
  std::string kv_cache_dtype;      // the KV cache's: the activation dtype's name, or "float8_e4m3fn"
  std::string device;              // "cpu" or "cuda"
  bool deterministic = false;      // RuntimeConfig::deterministic, resolved
  std::string draft_model;         // RuntimeConfig::draft_model ("" without one)
  int64_t draft_num_layers = 0;    // the draft model's layers (0 without one)
  int32_t tensor_parallel_size = 1;  // RuntimeConfig::tensor_parallel_size
  std::vector<int32_t> devices;      // the GPU of each rank (CUDA); empty on the CPU
};

class Runtime {
 public:
  // Loads the model and takes the KV pool. Throws Error (InvalidModel naming
  // the file, InvalidArgument naming the field, Unsupported for a device this
  // build lacks).
  explicit Runtime(const RuntimeConfig& config);
  // Same as close(). Every other call must have returned first: destroying a
  // Runtime while another thread is inside poll() (or any call) is undefined.
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // Queues a request and returns its id (`request_id` if given, else a fresh
  // one). Throws Error(InvalidArgument) naming the problem for an empty or
  // out-of-vocabulary prompt, bad params, an id in use, or a request that can
  // never fit: prompt + max_tokens beyond max_model_len, or more KV blocks
  // than the pool has (nothing is capped silently).
  std::string submit(const std::vector<int32_t>& prompt, const SamplingParams& params,
                     const std::string& request_id = "", Delivery delivery = Delivery::Any);

  // Events of the requests nobody owns, waiting up to `timeout_s` seconds for the first.
  std::vector<Event> poll(double timeout_s = 0.0);
  // Events of one request only, waiting up to `timeout_s` for the first; the
  // request is owned by its id from now on. Throws Error(InvalidArgument) for
  // an id that is unknown, released, or whose final event was already read.
  std::vector<Event> poll(const std::string& request_id, double timeout_s);
  // Events of any of several requests (a caller waiting for a batch), each
  // request's in order; the same rules as poll(request_id) for each id.
  std::vector<Event> poll(const std::vector<std::string>& request_ids, double timeout_s);

  // Ends a request at the next step; it still gets one final event with
  // finish_reason Abort. Returns true if it was running, false if it had
  // already ended (its final event may still be waiting to be read) or the
  // runtime is closed. Throws Error(InvalidArgument) for an id this runtime
  // never had (it remembers the last 65,536 finished ids).
  bool abort(const std::string& request_id);

  // Ends one sequence of a request (sample `index`) with finish_reason Stop at
  // the next step, as a host that matched a stop string on the decoded text
  // does. Same answers as abort().
  bool stop_sequence(const std::string& request_id, int32_t index);

  // The caller stops reading request `id`: it ends at the next step if it is
  // still running, and its events, queued and to come, are dropped (no final
  // event). Same answers as abort(); the id is free again once it has ended.
  bool release(const std::string& request_id);

  // The source of allowed-token masks for requests submitted with
  // SamplingParams::masked (structured output); until one is set such requests
  // are refused at submit. Set it once, before the first masked request.
  void set_token_mask_provider(std::shared_ptr<TokenMaskProvider> provider);

  Stats stats() const;
  ModelInfo model_info() const;

  // Stops the engine; requests in flight get a final Abort event (still
  // readable through poll). Idempotent; any thread, also several at once;
  // returns when the engine thread has ended and the model's weights and KV
  // cache (host or GPU memory) are freed. Afterwards submit() throws
  // Error(InvalidArgument), abort() returns false, poll() drains what is left,
  // stats() keeps its last figures.
  void close();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pagedrt
