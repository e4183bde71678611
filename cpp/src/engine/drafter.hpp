// engine/drafter.hpp — draft-model proposals for speculative decoding
// (SamplingParams::speculative == "draft").
//
// A smaller model with the target's vocabulary proposes k tokens for a
// sequence by k greedy steps of its own; the target verifies them in one
// forward (Scheduler::draft appends them, OutputProcessor::verify decides).
// A greedy proposal is one token for certain (q = 1 at it), so verification
// (keep it when it is the token the target draws there) is rejection
// sampling and keeps the target's distribution exactly, as for n-grams.
//
// The draft model runs on the target's backend (same device, stream and CPU
// threads) with its own paged KV cache: a BlockPool of as many blocks as the
// target's, of the same size, so it can hold whatever the target holds, and a
// prefix cache of its own (forks and repeated prompts reuse its full blocks).
// Each speculating sequence has a shadow here: the tokens whose K/V are in the
// draft cache and their block table.
//
//   target:  t0 .. tP               (tP: its last token, not yet computed)
//   shadow:  t0 .. tj computed      (j < P after the target accepted tokens)
//   propose: forward over t(j+1) .. tP    -> d1  (the last row's argmax; chunked
//                                                  to the step's token budget)
//            k - 1 forwards of one token  -> d2 .. dk
//   verify:  the target keeps t0 .. tP d1 .. da x; the shadow's K/V hold
//            t0 .. tP d1 .. d(k-1), valid up to where they agree, and the next
//            propose truncates the rest (its blocks go back to the draft pool).
//
// The engine ends the shadows of sequences that finish, are aborted or are
// preempted (forget()), so the draft pool holds only running sequences'
// blocks. A sequence whose shadow cannot get blocks simply gets no proposal
// that step.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "engine/block_pool.hpp"
#include "engine/kv_cache_manager.hpp"
#include "engine/model_runner.hpp"
#include "engine/request.hpp"

namespace pagedrt {

struct DrafterConfig {
  int32_t max_num_batched_tokens = 0;  // tokens one draft forward computes at most
  int64_t max_model_len = 0;           // the target's
  int64_t draft_max_len = 0;           // positions the draft model's RoPE table covers
  bool enable_prefix_caching = true;
};

class Drafter {
 public:
  Drafter(std::shared_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv,
          const DrafterConfig& config);

  // Writes Sequence::proposal for every sequence of `running` that
  // speculates with the draft model and is at its decode point, at most
  // min(its proposal length, what max_tokens and max_model_len leave) tokens.
  // Throws what the backend throws (the shadows stay consistent: a later call
  // recomputes what a failed forward left unwritten).
  void propose(const std::vector<Request*>& running);

  // Ends the shadows of request `arrival`'s sequences (index < 0: all of
  // them): their blocks go back to the draft pool now.
  void forget(uint64_t arrival, int32_t index = -1);

  int32_t num_blocks() const { return pool_.num_blocks(); }
  int64_t kv_cache_bytes() const { return kv_bytes_; }
  int32_t num_free_blocks() const { return pool_.num_free(); }
  // Frees the draft model and its KV storage (Engine::stop); the pool's
  // bookkeeping stays valid for the sequences that still exist.
  void release();

 private:
  // (request arrival, sequence index): unique for the engine's lifetime,
  // unlike a Sequence's address.
  using Key = std::pair<uint64_t, int32_t>;
  struct Shadow {
    Sequence seq;        // tokens whose K/V are (or are being) computed; num_computed; blocks
    int64_t stable = 0;  // tokens [0, stable) equal the target's for good
  };
  struct Job {
    Sequence* target = nullptr;
    Shadow* shadow = nullptr;
    int32_t k = 0;  // proposals wanted
  };
  // Brings a shadow's tokens in line with its target's: keeps the agreeing
  // prefix (its K/V stay valid), frees the blocks past it.
  void sync(Shadow& sh, const Sequence& target);
  // One forward over `work` ((job, tokens to compute) pairs); the greedy token
  // of each job whose shadow reaches its last token goes to picks[job index].
  // A job whose shadow gets no blocks is dropped (k = 0): it keeps what it
  // proposed so far.
  void forward(std::vector<Job>& jobs, const std::vector<std::pair<size_t, int32_t>>& work,
               std::vector<int32_t>& picks);

  DrafterConfig config_;
  ModelRunner runner_;
  int64_t kv_bytes_ = 0;
  BlockPool pool_;
  KvCacheManager kv_;
  Request dummy_;  // what Batch::build reads of a request: default params
  std::map<Key, std::unique_ptr<Shadow>> shadows_;
};

}  // namespace pagedrt
