#include "engine/drafter.hpp"

#include <algorithm>
#include <climits>

namespace pagedrt {

Drafter::Drafter(std::shared_ptr<Backend> backend, std::unique_ptr<LlamaModel> model, KvCache kv,
                 const DrafterConfig& config)
    : config_(config),
      runner_(std::move(backend), std::move(model), std::move(kv)),
      pool_(static_cast<int32_t>(runner_.kv().num_blocks), static_cast<int32_t>(runner_.kv().block_size)),
      kv_(pool_, config.enable_prefix_caching) {
  kv_bytes_ = runner_.kv().num_blocks * runner_.kv().bytes_per_block;
}

void Drafter::forget(uint64_t arrival, int32_t index) {
  auto it = shadows_.lower_bound({arrival, index < 0 ? INT32_MIN : index});
  const auto end = shadows_.upper_bound({arrival, index < 0 ? INT32_MAX : index});
  while (it != end) {
    kv_.free(it->second->seq.blocks);
    it = shadows_.erase(it);
  }
}

void Drafter::release() { runner_.release(); }

void Drafter::sync(Shadow& sh, const Sequence& target) {
  Sequence& q = sh.seq;
  const int64_t limit = std::min(q.num_computed, target.num_tokens());
  int64_t common = std::min(sh.stable, q.num_computed);
  while (common < limit && q.tokens[common] == target.tokens[common]) ++common;
  kv_.truncate(q.blocks, common);
  q.num_computed = common;
  q.tokens.resize(static_cast<size_t>(common));  // the rest as the target has it
  q.tokens.insert(q.tokens.end(), target.tokens.begin() + common, target.tokens.end());
  sh.stable = target.num_tokens();
  if (q.blocks.table.empty())  // new (a fork, or back from preemption): its prompt may be cached
    q.num_computed = kv_.acquire_cached_prefix(q.blocks, q.tokens.data(), q.num_tokens());
}

void Drafter::forward(std::vector<Job>& jobs, const std::vector<std::pair<size_t, int32_t>>& work,
                      std::vector<int32_t>& picks) {
  SchedulerOutput step;
  std::vector<size_t> which;  // job of each scheduled row
  for (const auto& [j, n] : work) {
    Sequence& q = jobs[j].shadow->seq;
    if (!kv_.allocate_slots(q.blocks, q.num_computed, n, step.copies)) {
      jobs[j].k = 0;  // no room in the draft pool: no proposal this step
      continue;
    }
    step.scheduled.push_back({&dummy_, &q, n});
    step.num_tokens += n;
    which.push_back(j);
  }
  if (step.empty()) return;
  const ModelOutput out = runner_.run(step, runner_.has_device_argmax());
  for (size_t i = 0; i < which.size(); ++i) {
    Sequence& q = jobs[which[i]].shadow->seq;
    const int32_t n = step.scheduled[i].num_new_tokens;
    kv_.note_computed(q.blocks, q.num_computed, q.num_computed + n);
    q.num_computed += n;
    // Only tokens the target has (not proposals) may enter the prefix cache.
    kv_.cache_full_blocks(q.blocks, q.tokens.data(), std::min(q.num_computed, jobs[which[i]].shadow->stable));
    const LogitsSlice& slice = (*out.slices)[i];
    if (!slice.samples) continue;
    const int32_t row = slice.first_row + slice.num_rows - 1;
    picks[which[i]] = out.argmax != nullptr ? out.argmax[row] : Sampler::greedy(out.row(row), out.vocab);
  }
}

void Drafter::propose(const std::vector<Request*>& running) {
  std::vector<Job> jobs;
  for (Request* r : running) {
    if (r->params.speculative != "draft") continue;
    for (auto& s : r->seqs) {
      s->proposal.clear();
      // Scheduler::draft clips the proposal the same way, and to the step's
      // budget; the draft computes positions up to num_tokens + k - 2.
      int64_t k = proposal_room(*r, *s, config_.max_model_len);
      k = std::min<int64_t>(k, config_.draft_max_len - s->num_tokens() + 1);
      k = std::min<int64_t>(k, config_.max_num_batched_tokens - 1);
      if (k <= 0) continue;
      std::unique_ptr<Shadow>& sh = shadows_[{r->arrival, s->index}];
      if (!sh) sh = std::make_unique<Shadow>();
      sync(*sh, *s);
      jobs.push_back({s.get(), sh.get(), static_cast<int32_t>(k)});
    }
  }
  if (jobs.empty()) return;

  std::vector<int32_t> picks(jobs.size(), -1);
  std::vector<std::pair<size_t, int32_t>> work;
  // Catch up to each target's last token, within the token budget per forward;
  // the forward that reaches it gives d1.
  for (;;) {
    work.clear();
    int64_t budget = config_.max_num_batched_tokens;
    for (size_t j = 0; j < jobs.size() && budget > 0; ++j) {
      const Sequence& q = jobs[j].shadow->seq;
      const int64_t n = std::min(q.num_tokens() - q.num_computed, budget);
      if (jobs[j].k == 0 || n <= 0) continue;
      work.push_back({j, static_cast<int32_t>(n)});
      budget -= n;
    }
    if (work.empty()) break;
    forward(jobs, work, picks);
  }
  // d2 .. dk: one token a forward for every job that wants more.
  for (;;) {
    work.clear();
    for (size_t j = 0; j < jobs.size(); ++j) {
      Job& job = jobs[j];
      if (job.k == 0 || picks[j] < 0) continue;
      job.target->proposal.push_back(picks[j]);
      picks[j] = -1;
      if (static_cast<int32_t>(job.target->proposal.size()) >= job.k) continue;
      job.shadow->seq.tokens.push_back(job.target->proposal.back());
      work.push_back({j, 1});
    }
    if (work.empty()) break;
    forward(jobs, work, picks);
  }
}

}  // namespace pagedrt
