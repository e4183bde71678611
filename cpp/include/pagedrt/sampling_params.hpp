// pagedrt/sampling_params.hpp — per-request decoding parameters.
//
// Names and meanings follow vLLM's SamplingParams. Values are checked by
// Runtime::submit, which throws pagedrt::Error(InvalidArgument) naming the
// field; nothing is checked later.
#pragma once

#include <cstdint>
#include <vector>

namespace pagedrt {

struct SamplingParams {
  int32_t max_tokens = 16;             // generated tokens at most (>= 1)
  bool ignore_eos = false;             // keep going past the model's eos ids
  std::vector<int32_t> stop_token_ids; // extra token ids that end the request

  // Experimental, for tests and tools: attach the raw fp32 logits of every
  // position the engine computes for this request (the whole prompt and each
  // generated token) to its events.
  bool return_logits = false;
};

}  // namespace pagedrt
