#include "engine/scheduler.hpp"

#include <algorithm>
#include <unordered_map>

#include "engine/ngram.hpp"

namespace pagedrt {

Scheduler::Scheduler(const SchedulerConfig& config, KvCacheManager& kv) : config_(config), kv_(kv) {
  for (int32_t s = config_.swap_slots - 1; s >= 0; --s) free_slots_.push_back(s);
}

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
      if (pending == 1) count_pause(*s);
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

int64_t Scheduler::distinct_blocks(const Request& req) {
  std::vector<int32_t> all;
  for (const auto& s : req.seqs) all.insert(all.end(), s->blocks.table.begin(), s->blocks.table.end());
  std::sort(all.begin(), all.end());
  return std::unique(all.begin(), all.end()) - all.begin();
}

void Scheduler::free_blocks(Request& req) {
  for (auto& s : req.seqs) {
    kv_.free(s->blocks);
    s->num_computed = 0;
  }
}

int64_t Scheduler::unshared_blocks(const Request& req) const {
  const int64_t bs = kv_.pool().block_size();
  int64_t blocks = distinct_blocks(req);  // cached prefix blocks just taken: shared
  for (const auto& s : req.seqs)
    blocks += std::max<int64_t>(0, (s->num_tokens() + bs - 1) / bs - static_cast<int64_t>(s->blocks.table.size()));
  return blocks;
}

bool Scheduler::should_swap(const Request& req) const {
  if (config_.preemption == PreemptionMode::Recompute) return false;
  const int64_t blocks = distinct_blocks(req);
  if (blocks == 0 || blocks > static_cast<int64_t>(free_slots_.size())) return false;
  if (config_.preemption == PreemptionMode::Swap || req.seqs.size() > 1) return true;
  int64_t tokens = 0;  // what recompute would compute again, each sequence its own
  for (const auto& s : req.seqs) tokens += s->num_computed;
  return swap_s_per_block_ * static_cast<double>(blocks) <= recompute_s_per_token_ * static_cast<double>(tokens);
}

void Scheduler::preempt(Request* req, SchedulerOutput& out) {
  undraft(req);
  if (should_swap(*req)) {
    std::unordered_map<int32_t, int32_t> slot_of;  // pool block -> host slot: a shared block goes out once
    for (auto& s : req->seqs) {
      s->host_table.clear();
      for (int32_t b : s->blocks.table) {
        auto [it, first] = slot_of.emplace(b, 0);
        if (first) {
          it->second = free_slots_.back();
          free_slots_.pop_back();
          out.swap_out.push_back({b, it->second});
        }
        s->host_table.push_back(it->second);
      }
      kv_.free(s->blocks);  // num_computed stays: the K/V come back with the blocks
    }
    req->swapped = true;
    swapped_.push_back(req);
    ++out.swapped_out;
  } else {
    free_blocks(*req);
    waiting_.push_front(req);
  }
  ++req->num_preemptions;
  running_.erase(std::find(running_.begin(), running_.end(), req));
}

bool Scheduler::swap_in_front(SchedulerOutput& out) {
  Request* req = swapped_.front();
  if (live_seqs() + req->seqs.size() > static_cast<size_t>(config_.max_num_seqs) && !running_.empty()) return false;
  std::unordered_map<int32_t, int32_t> owners;  // host slot -> sequences holding it
  std::vector<int32_t> slots;                   // distinct, in table order
  for (auto& s : req->seqs)
    for (int32_t slot : s->host_table)
      if (owners[slot]++ == 0) slots.push_back(slot);
  // Its blocks and room for each sequence's next block: back only to run;
  // and the watermark (unless nothing runs): swapped back into a full pool,
  // it would be the first to go out again (the most recently admitted) as
  // the others grow.
  const int64_t need = static_cast<int64_t>(slots.size() + req->seqs.size());
  if (!above_watermark(need) || !kv_.pool().reserve(static_cast<int32_t>(need))) return false;
  std::vector<int32_t> got;
  kv_.pool().allocate(static_cast<int32_t>(slots.size()), got);
  std::unordered_map<int32_t, int32_t> block_of;  // host slot -> its new pool block
  for (size_t i = 0; i < slots.size(); ++i) {
    block_of[slots[i]] = got[i];
    for (int32_t r = 1; r < owners[slots[i]]; ++r) kv_.pool().incref(got[i]);
    out.swap_in.push_back({slots[i], got[i]});
    free_slots_.push_back(slots[i]);  // free for a later step's swap-out: copies run in stream order
  }
  for (auto& s : req->seqs) {
    std::vector<int32_t> table;
    for (int32_t slot : s->host_table) table.push_back(block_of[slot]);
    kv_.restore(s->blocks, std::move(table), s->num_computed);
    s->host_table.clear();
  }
  req->swapped = false;
  swapped_.pop_front();
  running_.push_back(req);
  return true;
}

int64_t Scheduler::admission_blocks(const Request& req) const {
  int64_t blocks = 0;
  for (const auto& s : req.seqs)
    blocks += kv_.blocks_needed(s->blocks, s->num_computed, s->num_tokens() - s->num_computed);
  const int64_t width = std::max(req.params.n, req.params.beam_width);
  const bool forks_to_come = req.seqs.size() == 1 && req.seqs[0]->num_tokens() == req.prompt_len;
  return blocks + (forks_to_come ? width - 1 : 0);
}

size_t Scheduler::live_seqs() const {
  size_t n = 0;
  for (const Request* r : running_) n += r->seqs.size();
  return n;
}

int64_t Scheduler::plan(Request* req, int64_t budget, std::vector<ScheduledSeq>& out) const {
  int64_t blocks = 0;
  for (auto& s : req->seqs) {
    if (s->ends_pending) continue;  // its pending token is its last (async scheduling): nothing to compute
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
    if (!req->params.speculative.empty() && !kv_.pool().reserve(static_cast<int32_t>(need))) {
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
    while (ok && !kv_.pool().reserve(static_cast<int32_t>(need))) {
      Request* victim = running_.back();
      preempt(victim, out);
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

  // Bring swapped requests back, then admit new work, only in a step that
  // preempted nothing: otherwise the request just put back would be
  // overtaken (and a block copied out this step could be copied into).
  // Requests swapped back run from the next step on.
  while (out.preempted.empty() && !swapped_.empty() && swap_in_front(out)) {
  }
  while (out.preempted.empty() && swapped_.empty() && !waiting_.empty() && budget > 0) {
    Request* req = waiting_.front();
    if (live_seqs() + req->seqs.size() > static_cast<size_t>(config_.max_num_seqs) && !running_.empty()) break;
    int64_t hit_tokens = 0;
    // prompt_logprobs needs every prompt position computed: no cached prefix.
    for (auto& s : req->seqs)
      if (s->blocks.table.empty() && !req->params.prompt_logprobs) {
        s->num_computed = kv_.acquire_cached_prefix(s->blocks, s->tokens.data(), s->num_tokens());
        hit_tokens += s->num_computed;
      }
    if (req->seqs.size() > 1 && unshared_blocks(*req) > kv_.pool().num_blocks()) {
      free_blocks(*req);
      waiting_.pop_front();
      out.unfit.push_back(req);
      continue;
    }
    mine.clear();
    // Its step's blocks must fit; with a watermark, all it needs to reach its
    // sampling point must leave the watermark free. That holds a request
    // resumed after recompute too: it is the first victim should the others
    // grow into the watermark, and computing its tokens again is the dearest
    // preemption. It waits only while something runs (which frees its blocks
    // as it ends), and at the front of the queue nothing overtakes it.
    const int64_t need = plan(req, budget, mine);
    if ((config_.watermark_blocks > 0 && !above_watermark(admission_blocks(*req))) ||
        !kv_.pool().reserve(static_cast<int32_t>(need))) {
      free_blocks(*req);  // give the hits back; try again next step
      if (running_.empty() && kv_.pool().map_failed()) {
        waiting_.pop_front();
        out.unmapped.push_back(req);
        continue;
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

void Scheduler::drop_seq(Request* req, Sequence* seq) {
  if (!req->swapped) return;
  std::vector<int32_t> others;
  for (auto& s : req->seqs)
    if (s.get() != seq) others.insert(others.end(), s->host_table.begin(), s->host_table.end());
  std::sort(others.begin(), others.end());
  std::vector<int32_t> mine = seq->host_table;
  std::sort(mine.begin(), mine.end());
  mine.erase(std::unique(mine.begin(), mine.end()), mine.end());
  for (int32_t slot : mine)
    if (!std::binary_search(others.begin(), others.end(), slot)) free_slots_.push_back(slot);
  seq->host_table.clear();
}

void Scheduler::remove(Request* req) {
  auto r = std::find(running_.begin(), running_.end(), req);
  if (r != running_.end()) running_.erase(r);
  auto w = std::find(waiting_.begin(), waiting_.end(), req);
  if (w != waiting_.end()) waiting_.erase(w);
  auto sw = std::find(swapped_.begin(), swapped_.end(), req);
  if (sw != swapped_.end()) {
    swapped_.erase(sw);
    for (auto& s : req->seqs) drop_seq(req, s.get());  // a slot shared by several goes with the last
    req->swapped = false;
  }
  for (auto& s : req->seqs) kv_.free(s->blocks);
}

}  // namespace pagedrt
