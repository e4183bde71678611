// engine/ngram.hpp — prompt-lookup proposals for speculative decoding.
//
//   tokens: ... a b c d ... x a b c        (the last n tokens: "a b c")
//                      ^ the most recent earlier "a b c" is followed by "d ...":
//   proposal = d ... (up to k tokens, not past the end of tokens)
//
// n runs from n_max down to n_min; the first n with an earlier occurrence
// wins (longer matches predict better). An empty result: no match.
#pragma once

#include <cstdint>
#include <vector>

namespace pagedrt {

std::vector<int32_t> ngram_propose(const std::vector<int32_t>& tokens, int32_t n_min, int32_t n_max, int32_t k);

}  // namespace pagedrt
