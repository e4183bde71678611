// pagedrt/stats.hpp — what Runtime::stats() reports: the KV pool, the
// scheduler's queues and counters since start. Kept as the engine runs:
// reading it is O(1) and never waits for a step.
#pragma once

#include <cstdint>

namespace pagedrt {

struct Stats {
  int64_t num_blocks = 0;          // blocks in the KV pool
  int64_t block_size = 0;
  int64_t blocks_used = 0;         // blocks referenced by a live sequence
  int64_t blocks_free = 0;         // allocatable: plain free + cached free
  int64_t blocks_cached_free = 0;  // free blocks still holding a cached prefix
  int64_t slots_used = 0;          // token slots holding K/V of live sequences
  double waste = 0.0;              // 1 - slots_used / (blocks_used * block_size)
  int64_t peak_blocks_used = 0;    // since start
  int64_t blocks_logical = 0;      // sum of live sequences' block-table lengths (without sharing)
  int64_t peak_blocks_logical = 0; // since start
  double waste_at_peak = 0.0;      // waste when blocks_used peaked
  int64_t prefix_queries = 0;      // prompt tokens looked up in the prefix cache
  int64_t prefix_hits = 0;         // of those, tokens found (not recomputed)
  int64_t num_copies = 0;          // copy-on-write block copies
  double tokens_per_s = 0.0;       // generated tokens per second, last 5 s
  int64_t kv_cache_bytes = 0;
  int64_t kv_mapped_bytes = 0;     // of those, backed by memory now (RuntimeConfig::elastic_kv; else all)
  int64_t num_waiting = 0;
  int64_t num_running = 0;
  int64_t num_preemptions = 0;     // since start (by recompute and by swap)
  int64_t num_swapped_out = 0;     // of those, by swap (RuntimeConfig::preemption_mode)
  int64_t num_swapped = 0;         // requests swapped out now, waiting to come back
  int64_t swap_space_bytes = 0;    // host memory for swapped-out blocks
  int64_t swap_blocks_used = 0;    // its blocks holding a swapped-out request's K/V now
  int64_t swap_out_blocks = 0;     // blocks copied out of the pool, since start
  int64_t swap_in_blocks = 0;      // blocks copied back, since start
  double swap_seconds = 0.0;       // since start: issuing the swaps (and, under "auto", waiting for them)
  int64_t num_steps = 0;           // engine steps since start
  int64_t async_steps = 0;         // of those, launched before the step ahead was processed (async scheduling)
  int64_t padded_tokens = 0;       // since start: dummy tokens decode steps ran with (Backend::padded_tokens)
  double forward_seconds = 0.0;    // since start: the steps' forwards (batch to logits or picks on the host)
  double output_seconds = 0.0;     // since start: the steps' output processing (sampling, stop rules, events)
  // Async scheduling, since start: the host's time launching pipelined steps
  // (building the batch, queueing the forward and the picks), and its time
  // waiting for a launched step's results (the device was still busy: a
  // host that is never waiting holds the device up).
  double launch_seconds = 0.0;
  double collect_wait_seconds = 0.0;
  int64_t prompt_tokens = 0;       // computed since start
  int64_t generated_tokens = 0;    // since start
  int64_t device_draws = 0;        // since start: tokens drawn on the device with its sampling (CUDA), not the host
  int64_t spec_proposed = 0;       // speculative decoding: proposed tokens verified, since start
  int64_t spec_accepted = 0;       // of those, accepted
  // Structured output (masked requests), since start: steps that filled
  // masks, the rows filled, the masks' wall time (the provider's fill()
  // calls: on the helper thread while the forward runs, and refused checks'
  // after it; not prepare()), and how long steps waited for them after their
  // forward (the part the forward did not hide).
  int64_t mask_steps = 0;
  int64_t mask_rows = 0;
  // Of the pipelined steps with masks, those whose picks went through the
  // gate the masks' fill opens (Backend::queue_gated_masks: on CUDA queued
  // before the masks are filled, so that the next step's forward follows
  // them without the host waiting; the CPU waits for the gate).
  int64_t gated_mask_steps = 0;
  double mask_seconds = 0.0;
  double mask_wait_seconds = 0.0;
  // Checked picks (token_mask.hpp): rows picked without a mask and checked,
  // and of those, rows whose pick the provider refused (masked and picked again).
  int64_t mask_rows_checked = 0;
  int64_t mask_rows_refused = 0;
  int64_t draft_kv_cache_bytes = 0;  // the draft model's KV pool (RuntimeConfig::draft_model), else 0
  int64_t draft_blocks_used = 0;   // its blocks referenced by a running sequence's shadow
};

}  // namespace pagedrt
