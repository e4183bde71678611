// engine/block_pool.hpp — the fixed array of KV blocks: reference counts, the
// free queue, and the prefix-cache index of full blocks.
//
// Free queue (intrusive doubly linked list, O(1) push/pop/remove):
//
//   head -> [ plain free blocks, most recently freed first ] [ cached free blocks, LRU ] <- tail
//
//   allocate() pops from the head: a block freed without cached content is the
//   next one handed out (reused at once, its memory warm); blocks holding cached
//   prefixes go to the tail and are evicted least recently freed first. Evicting
//   drops the block's index entry, so a reused block never carries a stale
//   mapping.
//
// Prefix-cache key of a full block: (uid of the parent block's content, the
// block's tokens). Every cached content gets a fresh 64-bit uid that is never
// reused, so a key names exactly one token prefix; lookups compare the stored
// parent uid and tokens, so a hash collision can never return a wrong block.
//
// ref_count[b] == 0  <=>  b is on the free queue (cached or not), or in an
// unmapped chunk.
// Running out is a status (allocate returns false), never an exception.
//
// Elastic pools (set_chunks: the backend maps KV memory in chunks of blocks,
// model/kv_cache.hpp): chunk c holds blocks [c * chunk_blocks, ...); chunk 0
// is mapped from the start and never given back. An unmapped chunk's blocks
// count as free but are not on the queue; reserve() maps chunks, lowest
// first, when the queue's plain (uncached) blocks are too few, and splices
// their blocks in after the plain ones, where a pool mapped whole keeps its
// never-used blocks: so the pool hands out the same block ids as one mapped
// whole (until a chunk is given back), and growing evicts no cached prefix.
// A chunk the device cannot map now makes the pool full (the scheduler
// preempts); mapping is tried again half a second later.
//
// Slots in use are counted as blocks fill (mark_filled) and free: a block's
// fill is the token slots its owners have written (owners of a shared block
// agree: only full blocks, or a block just forked, are shared), a cached
// block coming back into use is full, and a freed block counts no more.
#pragma once

#include <cstdint>
#include <functional>
#include <unordered_map>
#include <vector>

namespace pagedrt {

class BlockPool {
 public:
  BlockPool(int32_t num_blocks, int32_t block_size);

  int32_t num_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  int32_t block_size() const { return block_size_; }
  int32_t num_free() const { return num_free_; }             // plain + cached free, unmapped chunks included
  int32_t num_cached_free() const { return num_cached_free_; }
  int32_t num_used() const { return num_blocks() - num_free_; }
  int32_t ref_count(int32_t block) const { return blocks_[block].ref_count; }
  int64_t slots_used() const { return slots_used_; }         // sum of fill over the blocks in use
  uint64_t uid(int32_t block) const { return blocks_[block].uid; }  // 0: not cached

  // Whether `n` blocks can be allocated now (mapping chunks as needed).
  bool reserve(int32_t n);
  // Appends `n` blocks (ref count 1, cache entries evicted) to `out`, or
  // changes nothing and returns false when fewer than `n` can be had.
  bool allocate(int32_t n, std::vector<int32_t>& out);

  // Makes a fresh pool elastic: `map(c)` backs chunk c with memory (false:
  // none to be had now), `unmap(c)` gives it back. Chunk 0 counts as mapped.
  void set_chunks(int32_t chunk_blocks, std::function<bool(int32_t)> map, std::function<void(int32_t)> unmap);
  int32_t num_mapped_blocks() const { return num_blocks() - unmapped_; }
  // Whether a chunk other than the first is mapped.
  bool has_spare_chunks() const { return mapped_chunks_ > 1; }
  // Whether the last reserve() tried to map a chunk and could not (false
  // while a failed map waits its half second to be tried again).
  bool map_failed() const { return map_failed_; }
  // Maps chunks (lowest first, as reserve() would) until `spare` plain free
  // blocks are mapped or no chunk is left: what the next steps will take,
  // mapped while the device runs this one instead of on the next step's
  // way to the device (cuMemCreate, cuMemMap and cuMemSetAccess of every
  // layer's K and V: ~7 ms for the 1 GB of an 8,000-token prompt on the 8B
  // shape). Returns the chunks it mapped; one that cannot be mapped stops
  // it (map_failed() is left as the last reserve() set it).
  int32_t map_ahead(int32_t spare);
  // Gives back every mapped chunk but the first with no block in use (its
  // cached blocks are evicted); returns how many. The caller makes sure the
  // device no longer touches them.
  int32_t release_unused_chunks();
  // Another owner of `block`; a cached free block leaves the free queue.
  void incref(int32_t block);
  // Drops one reference. note: call only on a block with ref count > 0.
  void decref(int32_t block);
  // `block` holds K/V in at least its first `n` slots from now on.
  // note: call only on a block with ref count > 0.
  void mark_filled(int32_t block, int32_t n);
  // decref every block of a table, last block first (so that a sequence's tail
  // is evicted before its head, which later requests are likelier to share).
  void release(std::vector<int32_t>& table);

  // The cached block holding `tokens` (block_size ids) after the prefix whose
  // content uid is `parent_uid` (0 for the first block), or -1.
  int32_t lookup(uint64_t parent_uid, const int32_t* tokens) const;
  // Registers a full block's content and returns its uid: a new one; the
  // block's own if it is cached already; or, when another block caches the same
  // content, that block's (and `block` stays uncached).
  // note: call only on a full block with ref count > 0.
  uint64_t cache(int32_t block, uint64_t parent_uid, const int32_t* tokens);

 private:
  struct Block {
    int32_t ref_count = 0;
    int32_t fill = 0;              // token slots written by its owners (0 while free)
    int32_t prev = -1, next = -1;  // free-queue links
    bool in_free = false;
    uint64_t uid = 0;              // content uid when cached, else 0
    uint64_t parent_uid = 0;
    uint64_t key = 0;              // hash of (parent_uid, tokens)
  };
  uint64_t hash_key(uint64_t parent_uid, const int32_t* tokens) const;
  void push(int32_t b, bool at_head);
  void unlink(int32_t b);
  void evict(int32_t b);
  bool map_chunk();  // the lowest unmapped chunk, its blocks spliced in after the plain free ones
  int32_t chunk_end(int32_t c) const;

  int32_t block_size_;
  std::vector<Block> blocks_;
  std::vector<int32_t> tokens_;  // (num_blocks, block_size) tokens of cached blocks
  int32_t head_ = -1, tail_ = -1;
  int32_t num_free_ = 0, num_cached_free_ = 0;
  // elastic pools
  int32_t chunk_blocks_ = 0;        // 0: mapped whole
  std::vector<char> mapped_;        // per chunk
  std::vector<int32_t> in_use_;     // per chunk: blocks with ref count > 0
  int32_t mapped_chunks_ = 1, unmapped_ = 0;
  double next_map_try_ = 0.0;       // steady clock, seconds: after a failed map
  bool map_failed_ = false;
  std::function<bool(int32_t)> map_;
  std::function<void(int32_t)> unmap_;
  int64_t slots_used_ = 0;
  uint64_t next_uid_ = 1;
  std::unordered_multimap<uint64_t, int32_t> index_;  // key -> cached block
};

}  // namespace pagedrt
