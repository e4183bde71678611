#include "engine/ngram.hpp"

#include <algorithm>

namespace pagedrt {

std::vector<int32_t> ngram_propose(const std::vector<int32_t>& tokens, int32_t n_min, int32_t n_max, int32_t k) {
  const int64_t len = static_cast<int64_t>(tokens.size());
  if (k <= 0) return {};
  for (int64_t n = std::min<int64_t>(n_max, len - 1); n >= n_min; --n) {
    const int32_t* tail = tokens.data() + len - n;
    // The most recent earlier occurrence: starts at i < len - n, so that at
    // least one token follows it.
    for (int64_t i = len - n - 1; i >= 0; --i) {
      if (!std::equal(tail, tail + n, tokens.data() + i)) continue;
      const int64_t from = i + n, to = std::min<int64_t>(len, from + k);
      return std::vector<int32_t>(tokens.begin() + from, tokens.begin() + to);
    }
  }
  return {};
}

}  // namespace pagedrt
