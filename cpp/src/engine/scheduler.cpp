#include "engine/scheduler.hpp"

#include <algorithm>

namespace pagedrt {

Scheduler::Scheduler(const SchedulerConfig& config, BlockPool& pool) : config_(config), pool_(pool) {}

void Scheduler::add(Request* req) { waiting_.push_back(req); }

bool Scheduler::allocate_slots(Request* req, int64_t n) {
  const int64_t bs = config_.block_size;
  const int64_t need = (req->num_computed + n + bs - 1) / bs - static_cast<int64_t>(req->block_table.size());
  if (need <= 0) return true;
  return pool_.allocate(static_cast<int32_t>(need), req->block_table);
}

void Scheduler::preempt(Request* req) {
  pool_.release(req->block_table);
  req->num_computed = 0;
  ++req->num_preemptions;
  running_.erase(std::find(running_.begin(), running_.end(), req));
  waiting_.push_front(req);
}

SchedulerOutput Scheduler::schedule() {
  SchedulerOutput out;
  int64_t budget = config_.max_num_batched_tokens;

  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Request* req = running_[i];
    const int64_t n = std::min(req->num_tokens() - req->num_computed, budget);
    bool ok = n > 0;
    while (ok && !allocate_slots(req, n)) {
      Request* victim = running_.back();
      preempt(victim);
      out.preempted.push_back(victim);
      if (victim == req) ok = false;
    }
    if (!ok) {
      if (i < running_.size() && running_[i] == req) ++i;  // n == 0: nothing to do this step
      continue;
    }
    out.scheduled.push_back({req, static_cast<int32_t>(n)});
    budget -= n;
    ++i;
  }

  // Admit new work only in a step that preempted nothing: otherwise the
  // request just put back would be overtaken.
  while (out.preempted.empty() && !waiting_.empty() && budget > 0 &&
         running_.size() < static_cast<size_t>(config_.max_num_seqs)) {
    Request* req = waiting_.front();
    const int64_t n = std::min(req->num_tokens() - req->num_computed, budget);
    if (!allocate_slots(req, n)) break;
    waiting_.pop_front();
    running_.push_back(req);
    out.scheduled.push_back({req, static_cast<int32_t>(n)});
    budget -= n;
  }
  for (const ScheduledRequest& s : out.scheduled) out.num_tokens += s.num_new_tokens;
  return out;
}

void Scheduler::remove(Request* req) {
  auto r = std::find(running_.begin(), running_.end(), req);
  if (r != running_.end()) running_.erase(r);
  auto w = std::find(waiting_.begin(), waiting_.end(), req);
  if (w != waiting_.end()) waiting_.erase(w);
  pool_.release(req->block_table);
}

}  // namespace pagedrt
