// pagedrt/event.hpp — what Runtime::poll returns.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pagedrt {

enum class FinishReason { None, Stop, Length, Abort, Error };

const char* finish_reason_name(FinishReason reason);  // "stop", "length", ...

// With SamplingParams::logprobs = k set, one per generated token.
struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;              // log-softmax of the raw logits
  std::vector<int32_t> top_ids;      // the k most likely tokens, most likely first
  std::vector<float> top_logprobs;
};

// One event per sequence per step that produced something. Sampling streams
// tokens; beam search emits only final events, one per returned beam (index =
// rank, best first), each with the beam's whole output.
struct Event {
  std::string request_id;
  int32_t index = 0;                 // sample index (n > 1) or beam rank
  std::vector<int32_t> token_ids;    // tokens generated since the last event
  bool finished = false;             // the last event of this sequence
  bool request_finished = false;     // the last event of the whole request
  FinishReason finish_reason = FinishReason::None;
  std::string error;                 // set when finish_reason == Error
  int32_t num_preemptions = 0;       // times this request was preempted so far
  double time = 0.0;                 // when the engine emitted it: steady clock seconds
                                     // (CLOCK_MONOTONIC on Linux, as Python's time.monotonic())
  std::vector<TokenLogprob> logprobs;  // one per token in token_ids (logprobs set)
  // SamplingParams::prompt_logprobs set: prompt tokens 1, 2, ... (token 0 has
  // no context), in order, as their positions are computed; all of them have
  // come by the first event that carries a generated token.
  std::vector<TokenLogprob> prompt_logprobs;
  double cumulative_logprob = 0.0;   // sum of the sequence's token logprobs so far (logprobs set, or beams)
  double score = 0.0;                // beams: cumulative_logprob / length ** length_penalty
  int64_t spec_proposed = 0;         // speculative decoding: this sequence's proposals verified so far
  int64_t spec_accepted = 0;         // ... and accepted

  // Only with SamplingParams::return_logits: (logit_rows, vocab_size) fp32,
  // row-major, one row per position computed since the last event.
  std::vector<float> logits;
  int32_t logit_rows = 0;
};

}  // namespace pagedrt
