#include "engine/batch.hpp"

#include <algorithm>
#include <stdexcept>

namespace pagedrt {

void Batch::build(const SchedulerOutput& sched, int32_t block_size) {
  token_ids_.clear(); positions_.clear(); slot_mapping_.clear();
  query_start_.assign(1, 0); seq_lens_.clear(); page_indptr_.assign(1, 0);
  page_indices_.clear(); logits_indices_.clear(); logits_.clear(); feedback_.clear();

  for (const ScheduledSeq& s : sched.scheduled) {
    const Sequence& r = *s.seq;
    const int64_t start = r.num_computed, end = start + s.num_new_tokens;
    for (int64_t p = start; p < end; ++p) {
      if (r.tokens[p] < 0) {  // a placeholder: the newest pending token (the scheduler computes no other)
        if (p != r.num_tokens() - 1) throw std::logic_error("Batch::build: a placeholder token before the last");
        feedback_.push_back({static_cast<int32_t>(token_ids_.size()), r.pending_source});
      }
      token_ids_.push_back(std::max(r.tokens[p], 0));
      positions_.push_back(static_cast<int32_t>(p));
      slot_mapping_.push_back(static_cast<int64_t>(r.blocks.table[p / block_size]) * block_size +
                              p % block_size);
    }
    query_start_.push_back(static_cast<int32_t>(token_ids_.size()));
    seq_lens_.push_back(static_cast<int32_t>(end));
    page_indices_.insert(page_indices_.end(), r.blocks.table.begin(), r.blocks.table.end());
    page_indptr_.push_back(static_cast<int32_t>(page_indices_.size()));

    LogitsSlice slice;
    slice.first_row = static_cast<int32_t>(logits_indices_.size());
    slice.samples = end == r.num_tokens();
    // return_logits (or prompt_logprobs, over the prompt): every position not
    // reported yet; speculative proposals: the rows of the last token and of
    // each proposal; else only the sampled row.
    int64_t from = slice.samples ? end - 1 - r.num_draft : end;
    const SamplingParams& sp = s.req->params;
    if (sp.return_logits || (sp.prompt_logprobs && r.logits_reported < s.req->prompt_len - 1))
      from = std::max(start, std::min(from, r.logits_reported));
    slice.first_pos = from;
    const int32_t base = query_start_[query_start_.size() - 2];
    for (int64_t p = from; p < end; ++p) logits_indices_.push_back(base + static_cast<int32_t>(p - start));
    slice.num_rows = static_cast<int32_t>(end - from);
    logits_.push_back(slice);
  }

  make_view();
}

void Batch::pad(int32_t tokens) {
  const int32_t page = page_indices_.front();
  for (int32_t t = static_cast<int32_t>(token_ids_.size()); t < tokens; ++t) {
    token_ids_.push_back(0);
    positions_.push_back(0);
    slot_mapping_.push_back(-1);
    query_start_.push_back(t + 1);
    seq_lens_.push_back(1);
    page_indices_.push_back(page);
    page_indptr_.push_back(static_cast<int32_t>(page_indices_.size()));
    logits_indices_.push_back(t);
  }
  make_view();
}

void Batch::feed_from(int32_t ticket) {
  feedback_ticket_ = ticket;
  make_view();
}

void Batch::clear_feedback() {
  feedback_.clear();
  make_view();
}

void Batch::make_view() {
  view_ = BatchView{};
  view_.num_tokens = static_cast<int32_t>(token_ids_.size());
  view_.token_ids = token_ids_.data();
  view_.positions = positions_.data();
  view_.slot_mapping = slot_mapping_.data();
  view_.num_seqs = static_cast<int32_t>(seq_lens_.size());
  view_.query_start = query_start_.data();
  view_.seq_lens = seq_lens_.data();
  view_.page_indptr = page_indptr_.data();
  view_.page_indices = page_indices_.data();
  view_.num_logits = static_cast<int32_t>(logits_indices_.size());
  view_.logits_indices = logits_indices_.data();
  view_.num_feedback = static_cast<int32_t>(feedback_.size());
  view_.feedback = feedback_.empty() ? nullptr : feedback_.data();
  view_.feedback_ticket = feedback_ticket_;
}

}  // namespace pagedrt
