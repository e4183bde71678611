// engine/batch.hpp — one step's flat inputs, built once and read by every layer.
//
//   scheduled sequences: A (3 prompt tokens, new)      B (1 decode token)
//   token_ids:   [a0 a1 a2 | b7]
//   positions:   [ 0  1  2 |  7]
//   slot_mapping:[A.blk[0]*bs+0, +1, +2 | B.blk[7/bs]*bs + 7%bs]
//   query_start: [0, 3, 4]        seq_lens: [3, 8]
//   page_indptr: [0, len(A.blk), len(A.blk)+len(B.blk)]   page_indices: A.blk ++ B.blk
//   logits_indices: rows whose logits are sampled (the last row of a request
//   that reaches its last known token) or returned (return_logits)
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.hpp"
#include "engine/scheduler.hpp"

namespace pagedrt {

// Where a request's logits rows sit in the step's logits.
struct LogitsSlice {
  int32_t first_row = 0;   // first row of the request in the step's logits
  int32_t num_rows = 0;
  int64_t first_pos = 0;   // token position of the first row
  bool samples = false;    // the last row is sampled
};

class Batch {
 public:
  void build(const SchedulerOutput& sched, int32_t block_size);
  // Appends sequences of one dummy token each until there are `tokens` tokens:
  // token 0 at position 0, no cache slot (-1: nothing is written), the first
  // page of the step as its one page (read, never written), one logits row
  // each after the real ones and no LogitsSlice, so nothing reads their
  // outputs. For decode steps (Backend::padded_tokens); needs a token built.
  void pad(int32_t tokens);
  const BatchView& view() const { return view_; }
  const std::vector<LogitsSlice>& logits() const { return logits_; }  // one per scheduled sequence
  // Placeholder tokens (async scheduling: Sequence::pending), built as id 0:
  // the backend writes them (feed_from) or the caller does (set_token, then
  // clear_feedback).
  const std::vector<TokenFeedback>& feedback() const { return feedback_; }
  void feed_from(int32_t ticket);
  void set_token(int32_t i, int32_t id) { token_ids_[static_cast<size_t>(i)] = id; }
  void clear_feedback();

 private:
  std::vector<int32_t> token_ids_, positions_, query_start_, seq_lens_, page_indptr_,
      page_indices_, logits_indices_;
  std::vector<int64_t> slot_mapping_;
  std::vector<LogitsSlice> logits_;
  std::vector<TokenFeedback> feedback_;
  int32_t feedback_ticket_ = 0;
  void make_view();

  BatchView view_;
};

}  // namespace pagedrt
