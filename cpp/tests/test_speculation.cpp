// test_speculation.cpp — the pieces of speculative decoding below the engine:
// prompt-lookup proposals (engine/ngram.hpp), the proposal length and pauses
// of a sequence (engine/request.hpp: proposal_room, adapt_proposals,
// count_pause) and the rollback of a block table's tail
// (KvCacheManager::truncate), with exact block ids and counts.
#include <cstdint>
#include <vector>

#include "check.hpp"
#include "engine/block_pool.hpp"
#include "engine/kv_cache_manager.hpp"
#include "engine/ngram.hpp"
#include "engine/request.hpp"

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

// Steps of a sequence at its decode point: `steps` misses (nothing kept).
void miss(pagedrt::Sequence& s, int steps) {
  for (int i = 0; i < steps; ++i) pagedrt::adapt_proposals(s, s.spec_len, 0, 8);
}

// How many decode steps without proposals until the sequence may propose again.
int pause_steps(const pagedrt::Request& r, pagedrt::Sequence& s) {
  int steps = 0;
  while (pagedrt::proposal_room(r, s, 0) == 0 && steps < 5000) {
    pagedrt::count_pause(s);
    ++steps;
  }
  return steps;
}

void proposal_length_and_pauses() {
  pagedrt::Request r;
  r.params.speculative = "ngram";
  r.params.num_speculative_tokens = 8;
  r.params.max_tokens = 100000;
  r.prompt_len = 4;
  pagedrt::Sequence s;
  s.tokens = {1, 2, 3, 4, 5};
  s.num_computed = 4;  // its decode point: one token to compute
  CHECK(pagedrt::proposal_room(r, s, 0) == 8 && s.spec_len == 8);
  // Misses halve the length: 8 4 2 1 1 1 1 1 proposed, 19 in all; the 8th pauses it.
  miss(s, 7);
  CHECK(s.spec_len == 1 && s.spec_pause == 0 && pagedrt::proposal_room(r, s, 0) == 1);
  miss(s, 1);
  CHECK(s.spec_pause == 16 && pagedrt::proposal_room(r, s, 0) == 0);
  CHECK(pause_steps(r, s) == 16);
  // After a pause a single miss pauses it again, twice as long, up to 64x.
  for (int want : {32, 64, 128, 256, 512, 1024, 1024}) {
    miss(s, 1);
    CHECK(pause_steps(r, s) == want);
  }
  // A kept proposal ends the doubling; a full acceptance lengthens by one.
  pagedrt::adapt_proposals(s, 1, 1, 8);
  CHECK(s.spec_len == 2 && s.spec_misses == 0 && s.spec_pauses == 0);
  pagedrt::adapt_proposals(s, 2, 1, 8);  // part kept: same length, misses forgiven
  CHECK(s.spec_len == 2);
  for (int i = 0; i < 10; ++i) pagedrt::adapt_proposals(s, s.spec_len, s.spec_len, 8);
  CHECK(s.spec_len == 8);  // capped at num_speculative_tokens
  miss(s, 7);
  CHECK(s.spec_pause == 0);
  miss(s, 1);
  CHECK(pause_steps(r, s) == 16);  // back to the first pause's length
  // Room is clipped by max_tokens: 1 of 3 generated, the step's own pick is the 2nd, one proposal the 3rd.
  r.params.max_tokens = 3;
  s.spec_len = 8;
  CHECK(pagedrt::proposal_room(r, s, 0) == 1);
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
  proposal_length_and_pauses();
  rollback();
  return check::finish();
}
