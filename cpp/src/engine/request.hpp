// engine/request.hpp — one request's state inside the engine.
//
// There are no prefill/decode modes: a request is num_computed chasing
// tokens.size(). While num_computed < tokens.size() - 1 the step is a
// (possibly chunked) prefill; when the step computes the last known token it
// yields logits, a new token is sampled and appended, and the chase goes on.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/kv_cache_manager.hpp"
#include "pagedrt/event.hpp"
#include "pagedrt/sampling_params.hpp"

namespace pagedrt {

struct Request {
  std::string id;
  SamplingParams params;
  int64_t prompt_len = 0;
  std::vector<int32_t> tokens;       // prompt then generated tokens
  int64_t num_computed = 0;          // tokens whose K/V are in the cache
  SeqBlocks blocks;                  // block table and prefix-cache uids
  int32_t num_preemptions = 0;
  uint64_t arrival = 0;              // submission order

  int64_t logits_reported = 0;       // positions whose logits went out (return_logits)

  // What the next event carries.
  std::vector<int32_t> new_tokens;
  std::vector<float> new_logits;     // (rows, vocab), only with params.return_logits
  int32_t new_logit_rows = 0;
  FinishReason finish = FinishReason::None;

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_generated() const { return num_tokens() - prompt_len; }
};

}  // namespace pagedrt
