// engine/block_pool.hpp — fixed array of KV blocks with reference counts.
//
//   free list (LIFO stack):  [ ... 5 4 3 2 1 0 ]  <- pop_back gives the lowest
//                                                   id first on a fresh pool
//   ref_count[b] == 0  <=>  b is on the free list
//
// A block freed is the next one handed out (reuse at once: its memory is warm).
// Running out is a status (allocate returns false), never an exception.
#pragma once

#include <cstdint>
#include <vector>

namespace pagedrt {

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);

  int32_t num_blocks() const { return static_cast<int32_t>(ref_counts_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_blocks() - num_free(); }
  int32_t ref_count(int32_t block) const { return ref_counts_[block]; }

  // Appends `n` fresh blocks (ref count 1) to `out`, or changes nothing and
  // returns false when fewer than `n` are free.
  bool allocate(int32_t n, std::vector<int32_t>& out);
  // Another owner of `block` (a forked sequence).
  void incref(int32_t block);
  // Drops one reference; the block returns to the free list at zero.
  // note: call only on a block with ref count > 0.
  void decref(int32_t block);
  // decref every block of a table, last block first (so that the head of a
  // sequence, most likely to be shared again, is reused last), and clears it.
  void release(std::vector<int32_t>& table);

 private:
  std::vector<int32_t> ref_counts_;  // (num_blocks)
  std::vector<int32_t> free_;        // stack of free block ids
};

}  // namespace pagedrt
