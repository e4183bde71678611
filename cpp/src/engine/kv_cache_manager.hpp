// engine/kv_cache_manager.hpp — per-sequence block tables over the BlockPool:
// allocation for the next tokens, prefix-cache hits, fork and copy-on-write.
//
//   seq A tokens: [t0 .. t15 | t16 .. t31 | t32 t33 _ _ ...]   block_size 16
//   A.table:      [    7     |     3      |       9         ]
//   fork(A) -> B: B.table = [7, 3, 9], ref counts 7:2 3:2 9:2
//   B writes t34: block 9 is shared and partly filled, so B gets a fresh block
//                 12, the engine copies 9 -> 12 before the step, 9 drops to 1.
//
// Only a sequence's last, partly filled block can ever be written while
// shared: full blocks are immutable (that is what lets the prefix cache and
// forks share them).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "backend/paged_kv.hpp"
#include "engine/block_pool.hpp"

namespace pagedrt {

struct SeqBlocks {
  std::vector<int32_t> table;        // logical block -> physical block
  std::vector<uint64_t> block_uids;  // content uids of the leading full blocks registered so far
};

class KvCacheManager {
 public:
  KvCacheManager(BlockPool& pool, bool enable_prefix_caching);

  BlockPool& pool() { return pool_; }
  bool prefix_caching() const { return prefix_caching_; }

  // For a sequence with no blocks yet: takes the cached blocks that hold the
  // longest prefix of tokens[0 .. n) made of full blocks, leaving at least the
  // last token to compute (so at most (n - 1) / block_size blocks). Returns the
  // number of tokens they hold. Counted in the hit rate only through
  // record_prefix_query(), once the request is admitted.
  int64_t acquire_cached_prefix(SeqBlocks& seq, const int32_t* tokens, int64_t n);

  // The most blocks a request can hold at once: its prompt's blocks (shared
  // by all its sequences), and for each further sequence (n > 1, beams) its
  // own output blocks plus a copy of the shared partly filled block. K/V is
  // written for every token but the last one generated. Reads only the
  // block size: safe from any thread.
  int64_t worst_case_blocks(int64_t prompt_len, int64_t max_tokens, int64_t num_seqs) const;

  // Blocks allocate_slots(seq, num_computed, n) would take (an upper bound
  // when several sequences share the block to copy).
  int64_t blocks_needed(const SeqBlocks& seq, int64_t num_computed, int64_t n) const;

  // Makes room for tokens [num_computed, num_computed + n): new blocks at the
  // end, and a private copy of the block num_computed falls in when it is
  // shared (copy-on-write, appended to `copies`). All or nothing: false
  // leaves everything unchanged.
  bool allocate_slots(SeqBlocks& seq, int64_t num_computed, int64_t n, std::vector<BlockCopy>& copies);

  void record_prefix_query(int64_t tokens, int64_t hit_tokens) {
    prefix_queries_ += tokens;
    prefix_hits_ += hit_tokens;
  }

  // Tokens [from, to) of the sequence now have their K/V in its blocks.
  void note_computed(const SeqBlocks& seq, int64_t from, int64_t to);

  // Registers the full blocks among tokens[0 .. num_computed) in the prefix cache.
  void cache_full_blocks(SeqBlocks& seq, const int32_t* tokens, int64_t num_computed);

  // child shares every block of parent (ref counts bumped).
  void fork(const SeqBlocks& parent, SeqBlocks& child);

  void free(SeqBlocks& seq);

  // A sequence swapped back in: `table` (blocks allocated for it, one
  // reference each of its own) holds the K/V of tokens [0, num_computed).
  // Its blocks are not in the prefix cache: cache_full_blocks registers them
  // again.
  void restore(SeqBlocks& seq, std::vector<int32_t> table, int64_t num_computed);

  // Keeps the blocks that hold tokens [0, num_tokens) and releases the rest,
  // last first: the tail a speculative step allocated for proposals it then
  // rejected.
  void truncate(SeqBlocks& seq, int64_t num_tokens);

  int64_t num_copies() const { return num_copies_; }
  int64_t logical_blocks() const { return logical_blocks_; }  // entries of every live block table
  int64_t prefix_queries() const { return prefix_queries_; }  // tokens looked up
  int64_t prefix_hits() const { return prefix_hits_; }        // tokens found

 private:
  BlockPool& pool_;
  bool prefix_caching_;
  int64_t num_copies_ = 0;
  int64_t logical_blocks_ = 0;
  int64_t prefix_queries_ = 0;
  int64_t prefix_hits_ = 0;
};

}  // namespace pagedrt
