// engine/model_runner.hpp — everything one step does on the device.
//
// Owns the model and its paged KV storage, and shares the backend (a draft
// model's runner uses the same one: engine/drafter.hpp). run() turns the
// scheduler's decision into the step's flat batch (engine/batch.hpp), runs the
// copy-on-write block copies, then the forward (which the backend may replay
// from a recording: Backend::run_step), and hands back where each scheduled
// sequence's logits rows are.
//
//   SchedulerOutput ──► Batch::build ──► copy_blocks ──► LlamaModel::forward ──► ModelOutput
//                       (host arrays)    (K and V, every layer)   (logits or device argmax)
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "backend/backend.hpp"
#include "backend/collectives.hpp"
#include "engine/batch.hpp"
#include "engine/rank_threads.hpp"
#include "engine/scheduler.hpp"
#include "model/kv_cache.hpp"
#include "model/llama.hpp"

namespace pagedrt {

// A step's results, valid until the next run().
struct ModelOutput {
  int64_t vocab = 0;
  int64_t num_rows = 0;                      // logits rows of the step (padding rows included)
  int64_t padded_tokens = 0;                 // dummy tokens the step ran with (Batch::pad)
  const float* logits = nullptr;             // (num_logits, vocab) host fp32; null when the device picked
  const int32_t* argmax = nullptr;           // (num_logits) greedy picks made on the device; else null
  // The tokens of the step's device draws (OutputProcessor::device_draws, in
  // their order), and their logprobs (set for the draws that ask); null when
  // it has none
  const int32_t* sampled = nullptr;
  const DrawLogprobs* sampled_logprobs = nullptr;
  const std::vector<LogitsSlice>* slices = nullptr;  // one per scheduled sequence, in order
  // Per scheduled sequence, the index of its first device draw (its forks'
  // follow), -1 for none; empty when the step has none.
  std::vector<int32_t> first_draw;

  const float* row(int64_t r) const { return logits ? logits + r * vocab : nullptr; }
};

// A step's device draws (Backend::sample), the edits that process their
// rows and the structured-output masks they index (SampleRow::mask: the
// step's masks, owned by the engine).
struct DeviceDraws {
  std::vector<SampleRow> rows;
  std::vector<LogitEdit> edits;
  DrawMasks masks;
  std::vector<int32_t> first_draw;  // ModelOutput::first_draw's
};

// One rank of a tensor-parallel model (model/tp_plan.hpp) after the first:
// its device, its shard of the weights, and its kv heads' share of every
// block (as many blocks as rank 0's: one logical pool).
struct ModelRank {
  std::shared_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> model;
  KvCache kv;
};
// What the ranks of a tensor-parallel model share; empty without one.
struct TensorParallel {
  std::shared_ptr<void> group;                      // what their collectives share (a HostGroup)
  std::vector<std::unique_ptr<Collectives>> comms;  // rank r's at r; the models point to them
  std::vector<ModelRank> peers;                     // ranks 1 .. size - 1
};

class ModelRunner {
 public:
  // `backend`, `model` and `kv` are rank 0's under tensor parallelism (`tp`):
  // every rank runs each forward at once, on a thread of its own, and every
  // block copy and swap; rank 0's logits are the step's, and its backend
  // picks and draws.
  ModelRunner(std::shared_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv,
              TensorParallel tp = {});
  ~ModelRunner();  // release()

  // Can the device pick greedy tokens itself (only their ids come back)?
  bool has_device_argmax() const { return backend_->has_argmax(); }
  // Runs one step. `device_greedy` (needs has_device_argmax()): every sampled
  // row is plain greedy, so only the picks leave the device; with
  // `defer_picks` they are made by pick(), once the rows' token masks are
  // known (the forward runs meanwhile). Throws what the backend throws;
  // nothing of the step is then valid.
  //
  // Async scheduling: a `deferred` step's picks and draws (pick(), sample())
  // are queued and read back by collect(end_results()), so that the host can
  // schedule and launch the next step meanwhile; out.argmax and out.sampled
  // are filled then (two steps' outputs may be alive at once). Tokens of a
  // step that are placeholders (Sequence::pending) take the ids of the last
  // deferred step's results: on the device where the backend defers, else
  // here.
  ModelOutput run(const SchedulerOutput& step, bool device_greedy, bool defer_picks = false, bool deferred = false);
  // After a deferred run() (and its pick() / sample()): the ticket collect() takes.
  int32_t end_results();
  // Waits for a deferred step's results and writes them into its ModelOutput's arrays.
  // Any thread (the engine's helper collects them while the engine thread
  // launches the next step, whose results are the other ticket's).
  void collect(int32_t ticket) {
    backend_->make_current();
    backend_->collect(ticket);
  }
  // The deferred picks of the last run(): sets out.argmax.
  void pick(ModelOutput& out, const RowMasks& masks);
  // Masks the host fills while picks that read them are already queued
  // (Backend::mask_gate, queue_gated_masks, open_mask_gate; rank 0's, whose
  // backend picks and draws). open_mask_gate: any thread.
  uint32_t* mask_gate(size_t words) { return backend_->mask_gate(words); }
  const uint32_t* queue_gated_masks(uint64_t id, size_t words) {
    backend_->make_current();
    return backend_->queue_gated_masks(id, words);
  }
  void open_mask_gate(uint64_t id) { backend_->open_mask_gate(id); }
  // Can the device draw sampled tokens itself (Backend::has_sample)?
  bool has_device_sample() const { return backend_->has_sample(); }
  // The last run()'s device draws (its logits are still on the device,
  // whether or not they were also copied out): sets out.sampled.
  void sample(ModelOutput& out, const DeviceDraws& draws);

  // Host memory for `slots` swapped-out blocks (every layer's K and V):
  // slots x kv().bytes_per_block bytes, page-locked on CUDA, allocated at
  // the first swap.
  void enable_swap(int64_t slots);
  // Allocates that host memory if it is not yet (swap() does too); the engine
  // calls it first so that its timing of a swap holds only the copies
  // (pinning 16 GiB took 8 s on the H200 host).
  void ensure_swap_space();
  // The step's swaps (SchedulerOutput::swap_out, then swap_in), every layer,
  // K and V, in stream order before the step's copies and forward; with
  // `wait`, returns once they are done.
  void swap(const SchedulerOutput& step, bool wait);

  // Rank 0's KV storage (every rank's has as many blocks).
  const KvCache& kv() const { return kv_; }
  // Every rank's elastic KV memory, rank order (empty when the pool is taken whole).
  std::vector<std::shared_ptr<KvMemory>> kv_memories() const;
  // Bytes of one block over every rank (KvCache::bytes_per_block's sum).
  int64_t bytes_per_block() const;
  int tensor_parallel_size() const { return static_cast<int>(tp_.peers.size()) + 1; }
  void synchronize();  // what every rank's device has queued is done
  void lend_threads(int n);  // Backend::lend_threads, every rank's
  int64_t vocab_size() const { return model_->config().vocab_size; }
  // Frees the weights and the KV storage, then drops its share of the backend
  // (GPU memory at once).
  void release();

 private:
  std::shared_ptr<Backend> backend_;
  std::unique_ptr<LlamaModel> model_;
  KvCache kv_;
  Batch batch_;
  std::vector<float> logits_;    // (num_logits, vocab) of the current step
  // A step's device results; two, by step parity: a deferred step's are
  // written at collect(), after the next step has run.
  struct Results {
    std::vector<int32_t> argmax;   // (num_logits) greedy picks made on the device
    std::vector<int32_t> sampled;  // the device draws' tokens
    std::vector<DrawLogprobs> sampled_logprobs;
  };
  Results results_[2];
  int cur_ = 0;          // the current step's
  int fed_ = 0;          // the last deferred step's (its results feed placeholders)
  int32_t fed_ticket_ = 0;
  // fn(rank) for ranks 1 .., each with its device current; rank 0's after.
  void on_peers(const std::function<void(ModelRank&)>& fn);
  // The collectives ready for a step after a failed one (Collectives::recover).
  void recover_group();
  // Until every rank's queued step has finished (Backend::step_finished),
  // polling every rank and the group's asynchronous errors, so that a rank
  // whose kernels fault is an error here, not a wait forever for its part of
  // a collective. Throws naming the rank.
  void wait_for_ranks();
  // Each of `kv`'s tensors' (layer l: K at 2l, V at 2l + 1) `swap_slots_`
  // blocks of host memory, one region after the other.
  void swap_rank(Backend& backend, KvCache& kv, void* space, const SchedulerOutput& step);

  std::vector<std::shared_ptr<void>> swap_space_;  // per rank: swap_rank's regions
  int64_t swap_slots_ = 0;
  TensorParallel tp_;
  std::unique_ptr<RankThreads> threads_;  // ranks 1 ..'s forwards (tensor parallelism)
  bool tp_failed_ = false;                // a step failed: its group is aborted until recover_group()
};

}  // namespace pagedrt
