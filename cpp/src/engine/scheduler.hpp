// engine/scheduler.hpp — continuous batching under a token budget.
//
// The unit is a request (all its live sequences are scheduled together, or
// none). Each step: running requests first (in admission order), each
// sequence taking min(remaining, budget) tokens — one for a decode, a chunk
// for a prefill — then waiting requests are admitted (after taking their
// prefix-cache hits) while the budget, max_num_seqs and free blocks allow.
// When a running request cannot get its blocks, the most recently admitted
// running request is preempted by recompute: its blocks are freed (full ones
// stay in the prefix cache), its sequences' num_computed go back to 0 (their
// generated tokens are kept) and it waits at the front of the queue.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "engine/kv_cache_manager.hpp"
#include "engine/request.hpp"

namespace pagedrt {

// What the scheduler reads (RuntimeConfig holds the defaults).
struct SchedulerConfig {
  int32_t max_num_seqs = 0;            // live sequences at most
  int32_t max_num_batched_tokens = 0;  // tokens one step computes at most
  int64_t max_model_len = 0;           // prompt + output tokens at most (0: no limit)
};

struct ScheduledSeq {
  Request* req = nullptr;
  Sequence* seq = nullptr;
  int32_t num_new_tokens = 0;  // tokens computed for it this step
};

struct SchedulerOutput {
  std::vector<ScheduledSeq> scheduled;
  std::vector<Request*> preempted;  // this step
  std::vector<BlockCopy> copies;    // copy-on-write, to run before the forward
  int64_t num_tokens = 0;
  bool empty() const { return scheduled.empty(); }
};

class Scheduler {
 public:
  Scheduler(const SchedulerConfig& config, KvCacheManager& kv);

  void add(Request* req);  // joins the waiting queue
  SchedulerOutput schedule();
  // Drops a finished or aborted request wherever it is and frees its blocks.
  void remove(Request* req);

  size_t num_waiting() const { return waiting_.size(); }
  size_t num_running() const { return running_.size(); }
  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  const std::vector<Request*>& running() const { return running_; }  // admission order

 private:
  // The (sequence, tokens) pairs of `req` that fit in `budget`, and the blocks they need.
  int64_t plan(Request* req, int64_t budget, std::vector<ScheduledSeq>& out) const;
  void preempt(Request* req);
  size_t live_seqs() const;
  // Speculative decoding: appends proposals (prompt lookup, or the draft
  // model's from Sequence::proposal) to the sequences of `req` at their decode point (at most budget - 1 tokens each, never past
  // max_tokens or max_model_len); undraft() takes them back.
  void draft(Request* req, int64_t budget);
  static void undraft(Request* req);

  SchedulerConfig config_;
  KvCacheManager& kv_;
  std::deque<Request*> waiting_;
  std::vector<Request*> running_;  // admission order
};

}  // namespace pagedrt
