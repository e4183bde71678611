// engine/beam_search.hpp — one step of beam search over a request's live beams,
// with transformers' generate(num_beams=k) semantics:
//
//   candidates  the top K = max(2, 1 + #stop tokens) * k of (beam, token) by
//               beam logprob sum + token logprob (log-softmax of raw logits)
//   finished    among the first k candidates, those ending in a stop token (or
//               reaching max_tokens) join the finished set with score
//               sum / generated_len ** length_penalty; the set keeps the best k
//   running     the best k candidates that did not stop
//   early stop  early_stopping=false: stop once k are finished and the best
//               running sum / current_len ** length_penalty cannot beat the worst
//               finished; true: once k are finished; "never": as false but with
//               max_tokens as the length when length_penalty > 0
#pragma once

#include <cstdint>
#include <vector>

#include "engine/request.hpp"

namespace pagedrt {

struct BeamChoice {
  int32_t parent = 0;   // index into the request's live sequences
  int32_t token = 0;
  double cum_logprob = 0.0;
};

// `stop_ids`: tokens that end a beam. `max_tokens`: the generation limit.
// Updates req.beam_done, beam_improvable and beam_len; returns the next
// running beams, best first, or an empty list when the search is over.
std::vector<BeamChoice> beam_step(Request& req, const std::vector<int32_t>& stop_ids, int64_t max_tokens);

}  // namespace pagedrt
