// test_speculation.cpp — the pieces of speculative decoding below the engine:
// prompt-lookup proposals (engine/ngram.hpp) and the rollback of a block
// table's tail (KvCacheManager::truncate), with exact block ids and counts.
#include <cstdint>
#include <vector>

#include "check.hpp"
#include "engine/block_pool.hpp"
#include "engine/kv_cache_manager.hpp"
#include "engine/ngram.hpp"

using pagedrt::ngram_propose;
using V = std::vector<int32_t>;

namespace {

void proposals() {
  // "1 2 3" occurred earlier, followed by 4 5 6: the longest match wins.
  CHECK((ngram_propose({1, 2, 3, 4, 5, 6, 9, 1, 2, 3}, 1, 3, 3) == V{4, 5, 6}));
  CHECK((ngram_propose({1, 2, 3, 4, 5, 6, 9, 1, 2, 3}, 1, 3, 2) == V{4, 5}));
  // The most recent earlier occurrence: "7 8" at 0 (then 1) and at 4 (then 2).
  CHECK((ngram_propose({7, 8, 1, 0, 7, 8, 2, 7, 8}, 2, 2, 1) == V{2}));
  // A proposal stops at the end of the tokens: "5" last seen at 3, followed by 6 5.
  CHECK((ngram_propose({1, 5, 9, 5, 6, 5}, 1, 1, 4) == V{6, 5}));
  // n_min = 2 and only a 1-token match: nothing.
  CHECK(ngram_propose({1, 2, 3, 9, 3}, 2, 4, 4).empty());
  CHECK(ngram_propose({1, 2, 3, 4}, 1, 4, 4).empty());  // no repeat
  CHECK(ngram_propose({3}, 1, 4, 4).empty());
  CHECK(ngram_propose({}, 1, 4, 4).empty());
  CHECK(ngram_propose({1, 2, 1, 2}, 1, 2, 0).empty());  // k = 0
  // A longer n with a match beats a shorter one with a more recent match:
  // "4 2" at 1..2 (then 8) against "2" at 5 (then 2... the 2-gram wins).
  CHECK((ngram_propose({0, 4, 2, 8, 8, 2, 2, 4, 2}, 1, 2, 1) == V{8}));
}

void rollback() {
  pagedrt::BlockPool pool(8, 4);
  pagedrt::KvCacheManager kv(pool, /*enable_prefix_caching=*/true);
  pagedrt::SeqBlocks seq;
  std::vector<pagedrt::BlockCopy> copies;
  // 5 tokens, then a step of 1 + 6 proposals: 12 tokens in 3 blocks.
  CHECK(kv.allocate_slots(seq, 0, 5, copies));
  CHECK(seq.table.size() == 2);
  CHECK(kv.allocate_slots(seq, 5, 7, copies));
  CHECK(seq.table.size() == 3 && pool.num_used() == 3 && kv.logical_blocks() == 3);
  const V table = seq.table;
  // One proposal kept: 7 tokens computed, the next step writes position 7.
  kv.truncate(seq, 8);
  CHECK(seq.table.size() == 2 && pool.num_used() == 2 && kv.logical_blocks() == 2);
  CHECK(seq.table[0] == table[0] && seq.table[1] == table[1]);
  // A forked sequence keeps the shared blocks alive: truncating one copy frees nothing shared.
  pagedrt::SeqBlocks child;
  kv.fork(seq, child);
  kv.truncate(child, 4);
  CHECK(child.table.size() == 1 && pool.num_used() == 2 && kv.logical_blocks() == 3);
  kv.free(child);
  kv.free(seq);
  CHECK(pool.num_used() == 0 && pool.num_free() == 8 && kv.logical_blocks() == 0);
}

}  // namespace

int main() {
  proposals();
  rollback();
  return check::finish();
}
