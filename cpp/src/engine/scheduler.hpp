// engine/scheduler.hpp — continuous batching under a token budget.
//
// The unit is a request (all its live sequences are scheduled together, or
// none). Each step: running requests first (in admission order), each
// sequence taking min(remaining, budget) tokens — one for a decode, a chunk
// for a prefill — then waiting requests are admitted (after taking their
// prefix-cache hits) while the budget, max_num_seqs and free blocks (less
// the watermark, below) allow.
// When a running request cannot get its blocks, the most recently admitted
// running request is preempted, by recompute or by swap:
//   recompute: its blocks are freed (full ones stay in the prefix cache), its
//     sequences' num_computed go back to 0 (their generated tokens are kept)
//     and it waits at the front of the queue, to compute its tokens again;
//   swap: its blocks are copied to host slots (once each: blocks its
//     sequences share stay shared) and freed; it keeps num_computed and waits
//     in the swapped queue, which comes before the waiting one: at the end
//     of a step that preempted nothing, it gets fresh blocks, its slots are
//     copied back, and it runs again from where it stopped.
// PreemptionMode::Auto swaps a request of several sequences (n > 1, beams:
// recomputed, they would no longer share their prompt's blocks), and takes
// the cheaper of the two for one sequence by the engine's estimates
// (set_costs: the seconds a token's recompute and a block's swap took
// lately); swap needs free host slots for all of the request's blocks, else
// it is recompute.
//
// Admission keeps a watermark (SchedulerConfig::watermark_blocks, vLLM's
// idea): a request enters the running set (new, resumed after recompute, or
// swapped back in) only if at least that many blocks stay free once it has
// what it needs, so that the running requests have room to grow and a full
// pool does not admit, then preempt, then admit again. When nothing runs the
// watermark is waived: a request larger than the pool less the watermark
// still runs, alone, and nothing can wait forever.
//
//   pool of 20, watermark 2:  [ running: 12 | free: 8 ]
//     prompt of 5 blocks:  8 - 5 = 3 >= 2  admitted
//     prompt of 7 blocks:  8 - 7 = 1 <  2  waits (and all behind it: FIFO)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "engine/kv_cache_manager.hpp"
#include "engine/request.hpp"

namespace pagedrt {

enum class PreemptionMode { Recompute, Swap, Auto };

// RuntimeConfig::preemption_mode's names ("recompute", "swap", "auto"); none
// for another.
inline std::optional<PreemptionMode> preemption_mode_of(const std::string& name) {
  if (name == "recompute") return PreemptionMode::Recompute;
  if (name == "swap") return PreemptionMode::Swap;
  if (name == "auto") return PreemptionMode::Auto;
  return std::nullopt;
}

// What the scheduler reads (RuntimeConfig holds the defaults).
struct SchedulerConfig {
  int32_t max_num_seqs = 0;            // live sequences at most
  int32_t max_num_batched_tokens = 0;  // tokens one step computes at most
  int64_t max_model_len = 0;           // prompt + output tokens at most (0: no limit)
  PreemptionMode preemption = PreemptionMode::Recompute;
  int32_t swap_slots = 0;              // host slots of one block each (swap space); 0 under Recompute
  int32_t watermark_blocks = 0;        // free blocks admission leaves (watermark_blocks()); 0: no watermark
};

// RuntimeConfig::kv_watermark (a fraction of the pool, in [0, 0.5)) in
// blocks: "at least fraction x num_blocks blocks stay free", so rounded up
// (vLLM rounds down: 0.01 of a pool under 100 blocks would be none). The
// 1e-9 keeps a product that is whole but for rounding (0.07 x 100 =
// 7.000000000000001) from taking one more block.
inline int32_t watermark_blocks(double fraction, int64_t num_blocks) {
  return static_cast<int32_t>(std::max(0.0, std::ceil(fraction * static_cast<double>(num_blocks) - 1e-9)));
}

struct ScheduledSeq {
  Request* req = nullptr;
  Sequence* seq = nullptr;
  int32_t num_new_tokens = 0;  // tokens computed for it this step
};

struct SchedulerOutput {
  std::vector<ScheduledSeq> scheduled;
  std::vector<Request*> preempted;  // this step
  std::vector<BlockCopy> copies;    // copy-on-write, to run before the forward
  // Swaps, to run first (before the copies): (pool block, host slot) out of
  // the pool, (host slot, pool block) into it.
  std::vector<BlockCopy> swap_out, swap_in;
  int32_t swapped_out = 0;          // requests preempted by swap this step
  // Waiting requests that can never run again: several sequences preempted
  // by recompute whose tokens, no longer sharing the prompt's blocks, need
  // more blocks than the pool has. Out of the queues: the engine ends them
  // with an error.
  std::vector<Request*> unfit;
  // The front waiting request when nothing runs and an elastic pool could
  // not map the chunk it needs (the device's memory is taken): out of the
  // queue, the engine ends it with an error rather than let it wait unseen.
  std::vector<Request*> unmapped;
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
  // One sequence of a live request ends (stopped by the host while others
  // go on): where the request is swapped out, the host slots only it held
  // are free again.
  void drop_seq(Request* req, Sequence* seq);

  // Auto's estimates: seconds to compute one token again, to swap one block out and in.
  void set_costs(double recompute_s_per_token, double swap_s_per_block) {
    recompute_s_per_token_ = recompute_s_per_token;
    swap_s_per_block_ = swap_s_per_block;
  }

  size_t num_waiting() const { return waiting_.size() + swapped_.size(); }
  size_t num_swapped() const { return swapped_.size(); }
  int32_t swap_slots_used() const { return config_.swap_slots - static_cast<int32_t>(free_slots_.size()); }
  size_t num_running() const { return running_.size(); }
  bool has_work() const { return !waiting_.empty() || !running_.empty() || !swapped_.empty(); }
  const std::vector<Request*>& running() const { return running_; }  // admission order

 private:
  // The (sequence, tokens) pairs of `req` that fit in `budget`, and the blocks they need.
  int64_t plan(Request* req, int64_t budget, std::vector<ScheduledSeq>& out) const;
  void preempt(Request* req, SchedulerOutput& out);
  // Whether preempting `req` swaps it (by the mode, the free slots and the costs).
  bool should_swap(const Request& req) const;
  // The distinct blocks of the request's sequences' tables (shared ones once).
  static int64_t distinct_blocks(const Request& req);
  // The blocks a waiting request's sequences need to compute all their
  // tokens: those they hold (shared ones once) and the rest, each its own.
  // Every block of req's sequences back to the pool (full ones stay in the
  // prefix cache) and nothing computed: preempted by recompute, or not admitted.
  void free_blocks(Request& req);
  int64_t unshared_blocks(const Request& req) const;
  // The front swapped request back into the pool, if its blocks fit; false if not.
  bool swap_in_front(SchedulerOutput& out);
  // Blocks a waiting request (its prefix-cache hits taken) needs to reach its
  // sampling point: every sequence's known tokens not yet in blocks, and one
  // block for each sequence its first sampling will fork (n > 1, beams), to
  // write its first token into (a copy of the shared last block, or a fresh
  // one). With chunked prefill that is the whole prompt, not the step's chunk.
  int64_t admission_blocks(const Request& req) const;
  // Whether `need` more blocks leave the watermark free (always while nothing runs).
  bool above_watermark(int64_t need) const {
    return running_.empty() || need + config_.watermark_blocks <= kv_.pool().num_free();
  }
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
  std::deque<Request*> swapped_;   // preempted by swap, in preemption order
  std::vector<int32_t> free_slots_;  // host slots (a stack: the last freed first)
  double recompute_s_per_token_ = 0.0, swap_s_per_block_ = 0.0;
};

}  // namespace pagedrt
