// pagedrt/event.hpp — what Runtime::poll returns.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pagedrt {

enum class FinishReason { None, Stop, Length, Abort, Error };

const char* finish_reason_name(FinishReason reason);  // "stop", "length", ...

struct Event {
  std::string request_id;
  int32_t index = 0;                 // sample / beam index within the request
  std::vector<int32_t> token_ids;    // tokens generated since the last event
  bool finished = false;             // the last event of this request
  FinishReason finish_reason = FinishReason::None;
  std::string error;                 // set when finish_reason == Error
  int32_t num_preemptions = 0;       // times this request was preempted so far

  // Only with SamplingParams::return_logits: (logit_rows, vocab_size) fp32,
  // row-major, one row per position computed since the last event.
  std::vector<float> logits;
  int32_t logit_rows = 0;
};

}  // namespace pagedrt
