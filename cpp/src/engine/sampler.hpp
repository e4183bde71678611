// engine/sampler.hpp — picks the next token from a logits row.
//
// Greedy only for now; the full SamplingParams (temperature, top-k/p, min-p,
// penalties, seeds, beams) grow here.
#pragma once

#include <cstdint>

#include "pagedrt/sampling_params.hpp"

namespace pagedrt {

class Sampler {
 public:
  // logits: (vocab) fp32. Ties go to the lowest token id (as torch.argmax).
  int32_t sample(const float* logits, int64_t vocab, const SamplingParams& params) const;
};

}  // namespace pagedrt
