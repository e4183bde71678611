#include "engine/scheduler.hpp"

#include <algorithm>

#include "engine/ngram.hpp"

namespace pagedrt {

Scheduler::Scheduler(const SchedulerConfig& config, KvCacheManager& kv) : config_(config), kv_(kv) {}

void Scheduler::add(Request* req) { waiting_.push_back(req); }

void Scheduler::draft(Request* req, int64_t budget) {
  const SamplingParams& p = req->params;
  if (p.speculative.empty()) return;
  for (auto& s : req->seqs) {
    const int64_t pending = s->num_tokens() - s->num_computed;  // what plan() will schedule for it
    std::vector<int32_t> offered;  // the draft model's proposal (Drafter::propose), used now or never
    offered.swap(s->proposal);
    const int64_t k = std::min<int64_t>(proposal_room(*req, *s, config_.max_model_len), budget - 1);
    if (k <= 0) {
      budget -= pending;
      continue;
    }
    std::vector<int32_t> proposal;
    if (p.speculative == "draft") {
      proposal.swap(offered);
      if (static_cast<int64_t>(proposal.size()) > k) proposal.resize(static_cast<size_t>(k));
    } else {
      proposal = ngram_propose(s->tokens, p.ngram_min, p.ngram_max, static_cast<int32_t>(k));
    }
    s->tokens.insert(s->tokens.end(), proposal.begin(), proposal.end());
    s->num_draft = static_cast<int32_t>(proposal.size());
    budget -= s->num_draft + 1;
  }
}

void Scheduler::undraft(Request* req) {
  for (auto& s : req->seqs) {
    s->tokens.resize(static_cast<size_t>(s->num_tokens() - s->num_draft));
    s->num_draft = 0;
  }
}

void Scheduler::preempt(Request* req) {
  undraft(req);
  for (auto& s : req->seqs) {
    kv_.free(s->blocks);
    s->num_computed = 0;
  }
  ++req->num_preemptions;
  running_.erase(std::find(running_.begin(), running_.end(), req));
  waiting_.push_front(req);
}

size_t Scheduler::live_seqs() const {
  size_t n = 0;
  for (const Request* r : running_) n += r->seqs.size();
  return n;
}

int64_t Scheduler::plan(Request* req, int64_t budget, std::vector<ScheduledSeq>& out) const {
  int64_t blocks = 0;
  for (auto& s : req->seqs) {
    const int64_t n = std::min(s->num_tokens() - s->num_computed, budget);
    if (n <= 0) continue;
    out.push_back({req, s.get(), static_cast<int32_t>(n)});
    blocks += kv_.blocks_needed(s->blocks, s->num_computed, n);
    budget -= n;
  }
  return blocks;
}

SchedulerOutput Scheduler::schedule() {
  SchedulerOutput out;
  int64_t budget = config_.max_num_batched_tokens;
  std::vector<ScheduledSeq> mine;

  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Request* req = running_[i];
    mine.clear();
    draft(req, budget);
    int64_t need = plan(req, budget, mine);
    if (need > kv_.pool().num_free() && !req->params.speculative.empty()) {
      undraft(req);  // no preemption to make room for proposals
      mine.clear();
      need = plan(req, budget, mine);
    }
    // A proposal is verified whole or not at all: should the budget cut one
    // (it does not: draft() sized it to the budget), drop what does not fit.
    for (const ScheduledSeq& s : mine)
      if (s.seq->num_draft > 0 && s.num_new_tokens < s.seq->num_draft + 1) {
        const int32_t drop = s.seq->num_draft + 1 - s.num_new_tokens;
        s.seq->tokens.resize(s.seq->tokens.size() - static_cast<size_t>(drop));
        s.seq->num_draft -= drop;
      }
    bool ok = !mine.empty();
    while (ok && need > kv_.pool().num_free()) {
      Request* victim = running_.back();
      preempt(victim);
      out.preempted.push_back(victim);
      if (victim == req) ok = false;
    }
    if (!ok) {
      if (i < running_.size() && running_[i] == req) ++i;  // nothing to compute this step
      continue;
    }
    for (const ScheduledSeq& s : mine) {
      kv_.allocate_slots(s.seq->blocks, s.seq->num_computed, s.num_new_tokens, out.copies);
      out.scheduled.push_back(s);
      budget -= s.num_new_tokens;
    }
    ++i;
  }

  // Admit new work only in a step that preempted nothing: otherwise the
  // request just put back would be overtaken.
  while (out.preempted.empty() && !waiting_.empty() && budget > 0) {
    Request* req = waiting_.front();
    if (live_seqs() + req->seqs.size() > static_cast<size_t>(config_.max_num_seqs) && !running_.empty()) break;
    int64_t hit_tokens = 0;
    // prompt_logprobs needs every prompt position computed: no cached prefix.
    for (auto& s : req->seqs)
      if (s->blocks.table.empty() && !req->params.prompt_logprobs) {
        s->num_computed = kv_.acquire_cached_prefix(s->blocks, s->tokens.data(), s->num_tokens());
        hit_tokens += s->num_computed;
      }
    mine.clear();
    if (plan(req, budget, mine) > kv_.pool().num_free()) {
      for (auto& s : req->seqs) {  // give the hits back; try again next step
        kv_.free(s->blocks);
        s->num_computed = 0;
      }
      break;
    }
    if (kv_.prefix_caching()) {
      int64_t looked_up = 0;
      for (auto& s : req->seqs) looked_up += s->num_tokens();
      kv_.record_prefix_query(looked_up, hit_tokens);
    }
    waiting_.pop_front();
    running_.push_back(req);
    for (const ScheduledSeq& s : mine) {
      kv_.allocate_slots(s.seq->blocks, s.seq->num_computed, s.num_new_tokens, out.copies);
      out.scheduled.push_back(s);
      budget -= s.num_new_tokens;
    }
  }
  for (const ScheduledSeq& s : out.scheduled) out.num_tokens += s.num_new_tokens;
  return out;
}

void Scheduler::remove(Request* req) {
  auto r = std::find(running_.begin(), running_.end(), req);
  if (r != running_.end()) running_.erase(r);
  auto w = std::find(waiting_.begin(), waiting_.end(), req);
  if (w != waiting_.end()) waiting_.erase(w);
  for (auto& s : req->seqs) kv_.free(s->blocks);
}

}  // namespace pagedrt
