// engine/stats_keeper.hpp — the figures Runtime::stats() returns, kept up to
// date as the engine runs.
//
// The engine thread counts (steps, preemptions, prompt and generated tokens)
// and publishes the pool's and the queues' state after every change that a
// host may act on (a step, a request's end); every figure it reads is a
// counter kept by the block pool or the KV cache manager as blocks come and
// go, so publishing is O(1). Host threads copy the whole under one mutex.
#pragma once

#include <cstdint>
#include <deque>
#include <mutex>
#include <utility>

#include "engine/block_pool.hpp"
#include "engine/drafter.hpp"
#include "engine/kv_cache_manager.hpp"
#include "engine/scheduler.hpp"
#include "model/kv_cache.hpp"
#include "pagedrt/stats.hpp"

namespace pagedrt {

class StatsKeeper {
 public:
  // swap_slots: host slots of swap space (0: none).
  // bytes_per_block: one block over every rank of a tensor-parallel model (else kv's)
  StatsKeeper(const KvCache& kv, int64_t bytes_per_block, int64_t swap_slots);

  Stats get() const;
  void count_step(int64_t preemptions, int64_t prompt_tokens, double forward_seconds, int64_t padded_tokens,
                  bool async = false);
  void count_output(double seconds);
  void count_launch(double seconds, bool gated = false);  // Stats::launch_seconds, gated_mask_steps
  void count_collect_wait(double seconds);  // Stats::collect_wait_seconds
  void count_swap(int64_t out_blocks, int64_t in_blocks, int64_t swapped_out, double seconds);
  void count_generated(int64_t tokens);
  void count_device_draws(int64_t draws);
  void count_speculative(int64_t proposed, int64_t accepted);
  // new_step: the step's first fill (Stats::mask_steps counts steps, not fills).
  void count_masks(int64_t rows, double seconds, double wait_seconds, bool new_step = true);
  void count_checked_picks(int64_t checked, int64_t refused);  // Stats::mask_rows_checked, _refused
  // The pool, the prefix cache and the queues as they are now; the peaks.
  // `drafter`: null without a draft model.
  void publish(const BlockPool& pool, const KvCacheManager& kv, const Scheduler& scheduler, const Drafter* drafter);

 private:
  mutable std::mutex mu_;
  Stats stats_;
  int64_t bytes_per_block_ = 0;
  std::deque<std::pair<double, int64_t>> rate_window_;  // (seconds, generated tokens) per publish
};

}  // namespace pagedrt
