// backend/philox.hpp — Philox4x32-10 (Salmon et al. 2011), the counter-based
// generator of device sampling: the draw for (key, counter) is a pure
// function of the two, so a sequence's stream does not depend on which other
// rows share its step or on the order rows are sampled in.
#pragma once

#include <cstdint>

#include "backend/hd.hpp"

namespace pagedrt {

PAGEDRT_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// 64 random bits for (key, counter): the first two words of Philox4x32-10 on
// counter (lo, hi, 0, 0) under key (lo, hi), as (word 0 << 32) | word 1.
PAGEDRT_HD uint64_t philox_u64(uint64_t key, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = philox_mulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = philox_mulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return (static_cast<uint64_t>(c0) << 32) | c1;
}

}  // namespace pagedrt
