#include "engine/sampler.hpp"

namespace pagedrt {

int32_t Sampler::sample(const float* logits, int64_t vocab, const SamplingParams& params) const {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best] || (logits[best] != logits[best] && logits[i] == logits[i])) best = i;
  return static_cast<int32_t>(best);
}

}  // namespace pagedrt
