#include "engine/scheduler.hpp"

#include <algorithm>

namespace pagedrt {

Scheduler::Scheduler(const SchedulerConfig& config, KvCacheManager& kv) : config_(config), kv_(kv) {}

void Scheduler::add(Request* req) { waiting_.push_back(req); }

void Scheduler::preempt(Request* req) {
  kv_.free(req->blocks);
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
    while (ok && !kv_.allocate_slots(req->blocks, req->num_computed, n, out.copies)) {
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
    req->num_computed = kv_.acquire_cached_prefix(req->blocks, req->tokens.data(), req->num_tokens());
    const int64_t n = std::min(req->num_tokens() - req->num_computed, budget);
    if (!kv_.allocate_slots(req->blocks, req->num_computed, n, out.copies)) {
      kv_.free(req->blocks);  // give the hits back; try again next step
      req->num_computed = 0;
      break;
    }
    if (kv_.prefix_caching()) kv_.record_prefix_query(req->num_tokens(), req->num_computed);
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
  kv_.free(req->blocks);
}

}  // namespace pagedrt
