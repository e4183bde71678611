#include "engine/kv_cache_manager.hpp"

#include <algorithm>
#include <cassert>

namespace pagedrt {

KvCacheManager::KvCacheManager(BlockPool& pool, bool enable_prefix_caching)
    : pool_(pool), prefix_caching_(enable_prefix_caching) {}

int64_t KvCacheManager::acquire_cached_prefix(SeqBlocks& seq, const int32_t* tokens, int64_t n) {
  assert(seq.table.empty());
  if (!prefix_caching_ || n <= 0) return 0;
  const int64_t bs = pool_.block_size();
  const int64_t max_blocks = (n - 1) / bs;
  uint64_t parent = 0;
  for (int64_t i = 0; i < max_blocks; ++i) {
    const int32_t b = pool_.lookup(parent, tokens + i * bs);
    if (b < 0) break;
    pool_.incref(b);
    seq.table.push_back(b);
    parent = pool_.uid(b);
    seq.block_uids.push_back(parent);
  }
  logical_blocks_ += static_cast<int64_t>(seq.table.size());
  return static_cast<int64_t>(seq.table.size()) * bs;
}

int64_t KvCacheManager::worst_case_blocks(int64_t prompt_len, int64_t max_tokens, int64_t num_seqs) const {
  const int64_t bs = pool_.block_size();
  const int64_t written = prompt_len + max_tokens - 1;
  return (written + bs - 1) / bs + (num_seqs - 1) * ((max_tokens + bs - 1) / bs + 1);
}

int64_t KvCacheManager::blocks_needed(const SeqBlocks& seq, int64_t num_computed, int64_t n) const {
  const int64_t bs = pool_.block_size();
  const int64_t have = static_cast<int64_t>(seq.table.size());
  const int64_t want = (num_computed + n + bs - 1) / bs;
  const int64_t first = num_computed / bs;  // the block the first new token lands in
  const bool cow = n > 0 && first < have && pool_.ref_count(seq.table[first]) > 1;
  return (want > have ? want - have : 0) + (cow ? 1 : 0);
}

bool KvCacheManager::allocate_slots(SeqBlocks& seq, int64_t num_computed, int64_t n,
                                    std::vector<BlockCopy>& copies) {
  const int64_t bs = pool_.block_size();
  const int64_t have = static_cast<int64_t>(seq.table.size());
  const int64_t want = (num_computed + n + bs - 1) / bs;
  const int64_t fresh = want > have ? want - have : 0;
  // The block the first new token lands in, if it already exists and is shared.
  const int64_t first = num_computed / bs;
  const bool cow = n > 0 && first < have && pool_.ref_count(seq.table[first]) > 1;
  if (!pool_.reserve(static_cast<int32_t>(fresh + (cow ? 1 : 0)))) return false;
  if (cow) {
    std::vector<int32_t> got;
    pool_.allocate(1, got);
    copies.push_back({seq.table[first], got[0]});
    pool_.decref(seq.table[first]);
    seq.table[first] = got[0];
    ++num_copies_;
  }
  pool_.allocate(static_cast<int32_t>(fresh), seq.table);
  logical_blocks_ += fresh;
  return true;
}

void KvCacheManager::note_computed(const SeqBlocks& seq, int64_t from, int64_t to) {
  if (to <= from) return;
  const int64_t bs = pool_.block_size();
  for (int64_t i = from / bs; i <= (to - 1) / bs; ++i)
    pool_.mark_filled(seq.table[i], static_cast<int32_t>(std::min<int64_t>(bs, to - i * bs)));
}

void KvCacheManager::cache_full_blocks(SeqBlocks& seq, const int32_t* tokens, int64_t num_computed) {
  if (!prefix_caching_) return;
  const int64_t bs = pool_.block_size();
  const int64_t full = std::min<int64_t>(num_computed / bs, static_cast<int64_t>(seq.table.size()));
  for (int64_t i = static_cast<int64_t>(seq.block_uids.size()); i < full; ++i) {
    const uint64_t parent = i == 0 ? 0 : seq.block_uids[i - 1];
    seq.block_uids.push_back(pool_.cache(seq.table[i], parent, tokens + i * bs));
  }
}

void KvCacheManager::fork(const SeqBlocks& parent, SeqBlocks& child) {
  assert(child.table.empty());
  for (int32_t b : parent.table) pool_.incref(b);
  logical_blocks_ += static_cast<int64_t>(parent.table.size());
  child.table = parent.table;
  child.block_uids = parent.block_uids;
}

void KvCacheManager::truncate(SeqBlocks& seq, int64_t num_tokens) {
  const int64_t bs = pool_.block_size(), keep = (num_tokens + bs - 1) / bs;
  while (static_cast<int64_t>(seq.table.size()) > keep) {
    pool_.decref(seq.table.back());
    seq.table.pop_back();
    --logical_blocks_;
  }
  if (static_cast<int64_t>(seq.block_uids.size()) > keep) seq.block_uids.resize(static_cast<size_t>(keep));
}

void KvCacheManager::restore(SeqBlocks& seq, std::vector<int32_t> table, int64_t num_computed) {
  assert(seq.table.empty());
  seq.table = std::move(table);
  seq.block_uids.clear();
  logical_blocks_ += static_cast<int64_t>(seq.table.size());
  note_computed(seq, 0, num_computed);
}

void KvCacheManager::free(SeqBlocks& seq) {
  logical_blocks_ -= static_cast<int64_t>(seq.table.size());
  pool_.release(seq.table);
  seq.block_uids.clear();
}

}  // namespace pagedrt
