// backend/cpu/argmax.hpp — the greedy pick of a row of logits on the host.
//
// The first index of the largest value, where a token the mask does not
// allow counts as -inf and NaN is never chosen over a number; a row of NaN
// only gives 0. The engine's Sampler (greedy rows) and the CPU backend's
// argmax (greedy decode, structured output's masks) both use it, so that the
// two pick the same token from the same row (host code: here, beside the CPU
// backend's vector helpers).
#pragma once

#include <cstdint>

namespace pagedrt::cpu {

// x (n) fp32; allowed: n bits, bit t of word t / 32 set where token t may be
// picked, or null for every token.
int64_t first_argmax(const float* x, int64_t n, const uint32_t* allowed = nullptr);

}  // namespace pagedrt::cpu
