#include "engine/stats_keeper.hpp"

#include <algorithm>
#include <chrono>

namespace pagedrt {

StatsKeeper::StatsKeeper(const KvCache& kv, int64_t bytes_per_block, int64_t swap_slots) {
  stats_.swap_space_bytes = swap_slots * bytes_per_block;
  stats_.num_blocks = kv.num_blocks;
  stats_.block_size = kv.block_size;
  stats_.blocks_free = kv.num_blocks;
  stats_.kv_cache_bytes = kv.num_blocks * bytes_per_block;
  bytes_per_block_ = bytes_per_block;
}

Stats StatsKeeper::get() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void StatsKeeper::count_step(int64_t preemptions, int64_t prompt_tokens, double forward_seconds,
                             int64_t padded_tokens, bool async) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.num_steps += 1;
  stats_.async_steps += async ? 1 : 0;
  stats_.padded_tokens += padded_tokens;
  stats_.forward_seconds += forward_seconds;
  stats_.num_preemptions += preemptions;
  stats_.prompt_tokens += prompt_tokens;
}

void StatsKeeper::count_swap(int64_t out_blocks, int64_t in_blocks, int64_t swapped_out, double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.swap_out_blocks += out_blocks;
  stats_.swap_in_blocks += in_blocks;
  stats_.num_swapped_out += swapped_out;
  stats_.swap_seconds += seconds;
}

void StatsKeeper::count_output(double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.output_seconds += seconds;
}

void StatsKeeper::count_launch(double seconds, bool gated) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.launch_seconds += seconds;
  stats_.gated_mask_steps += gated ? 1 : 0;
}

void StatsKeeper::count_collect_wait(double seconds) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.collect_wait_seconds += seconds;
}

void StatsKeeper::count_generated(int64_t tokens) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.generated_tokens += tokens;
}

void StatsKeeper::count_device_draws(int64_t draws) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.device_draws += draws;
}

void StatsKeeper::count_speculative(int64_t proposed, int64_t accepted) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.spec_proposed += proposed;
  stats_.spec_accepted += accepted;
}

void StatsKeeper::count_masks(int64_t rows, double seconds, double wait_seconds, bool new_step) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.mask_steps += new_step ? 1 : 0;
  stats_.mask_rows += rows;
  stats_.mask_seconds += seconds;
  stats_.mask_wait_seconds += wait_seconds;
}

void StatsKeeper::count_checked_picks(int64_t checked, int64_t refused) {
  std::lock_guard<std::mutex> lk(mu_);
  stats_.mask_rows_checked += checked;
  stats_.mask_rows_refused += refused;
}

void StatsKeeper::publish(const BlockPool& pool, const KvCacheManager& kv, const Scheduler& scheduler,
                          const Drafter* drafter) {
  const double now = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  std::lock_guard<std::mutex> lk(mu_);
  Stats& s = stats_;
  s.blocks_used = pool.num_used();
  s.blocks_free = pool.num_free();
  s.kv_mapped_bytes = pool.num_mapped_blocks() * bytes_per_block_;
  s.blocks_cached_free = pool.num_cached_free();
  s.slots_used = pool.slots_used();
  s.waste = s.blocks_used ? 1.0 - double(s.slots_used) / double(s.blocks_used * s.block_size) : 0.0;
  if (s.blocks_used > s.peak_blocks_used) {
    s.peak_blocks_used = s.blocks_used;
    s.waste_at_peak = s.waste;
  }
  s.blocks_logical = kv.logical_blocks();
  s.peak_blocks_logical = std::max(s.peak_blocks_logical, s.blocks_logical);
  s.num_waiting = static_cast<int64_t>(scheduler.num_waiting());
  s.num_running = static_cast<int64_t>(scheduler.num_running());
  s.num_swapped = static_cast<int64_t>(scheduler.num_swapped());
  s.swap_blocks_used = scheduler.swap_slots_used();
  s.prefix_queries = kv.prefix_queries();
  s.prefix_hits = kv.prefix_hits();
  s.num_copies = kv.num_copies();
  if (drafter != nullptr) {
    s.draft_kv_cache_bytes = drafter->kv_cache_bytes();
    s.draft_blocks_used = drafter->num_blocks() - drafter->num_free_blocks();
  }
  // generation rate over the last five seconds
  rate_window_.emplace_back(now, s.generated_tokens);
  while (rate_window_.size() > 2 && now - rate_window_.front().first > 5.0) rate_window_.pop_front();
  const double span = now - rate_window_.front().first;
  s.tokens_per_s = span > 0 ? double(s.generated_tokens - rate_window_.front().second) / span : 0.0;
}

}  // namespace pagedrt
