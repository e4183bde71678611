#include "engine/block_pool.hpp"

#include <algorithm>
#include <cassert>
#include <chrono>

namespace pagedrt {

BlockPool::BlockPool(int32_t num_blocks, int32_t block_size)
    : block_size_(block_size),
      blocks_(num_blocks),
      tokens_(static_cast<size_t>(num_blocks) * block_size, 0) {
  for (int32_t b = 0; b < num_blocks; ++b) push(b, /*at_head=*/false);  // a fresh pool hands out 0, 1, 2, ...
}

// Links a free block in at the head (reused first) or the tail (evicted last).
void BlockPool::push(int32_t b, bool at_head) {
  Block& k = blocks_[b];
  int32_t& end = at_head ? head_ : tail_;    // the end it joins
  int32_t& other = at_head ? tail_ : head_;  // set too when the queue was empty
  (at_head ? k.next : k.prev) = end;
  (at_head ? k.prev : k.next) = -1;
  if (end >= 0) (at_head ? blocks_[end].prev : blocks_[end].next) = b; else other = b;
  end = b;
  k.in_free = true;
  ++num_free_;
  if (k.uid != 0) ++num_cached_free_;
}

void BlockPool::unlink(int32_t b) {
  Block& k = blocks_[b];
  assert(k.in_free);
  if (k.prev >= 0) blocks_[k.prev].next = k.next; else head_ = k.next;
  if (k.next >= 0) blocks_[k.next].prev = k.prev; else tail_ = k.prev;
  k.prev = k.next = -1;
  k.in_free = false;
  --num_free_;
  if (k.uid != 0) --num_cached_free_;
}

void BlockPool::evict(int32_t b) {
  Block& k = blocks_[b];
  auto range = index_.equal_range(k.key);
  for (auto it = range.first; it != range.second; ++it)
    if (it->second == b) { index_.erase(it); break; }
  k.uid = k.parent_uid = k.key = 0;
}

bool BlockPool::reserve(int32_t n) {
  map_failed_ = false;
  while (chunk_blocks_ > 0 && unmapped_ > 0 && num_free_ - unmapped_ - num_cached_free_ < n)
    if (!map_chunk()) break;
  return n <= num_free_ - unmapped_;
}

bool BlockPool::allocate(int32_t n, std::vector<int32_t>& out) {
  if (!reserve(n)) return false;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t b = head_;
    unlink(b);
    if (blocks_[b].uid != 0) evict(b);
    blocks_[b].ref_count = 1;
    if (chunk_blocks_ > 0) ++in_use_[b / chunk_blocks_];
    out.push_back(b);
  }
  return true;
}

void BlockPool::incref(int32_t block) {
  Block& k = blocks_[block];
  if (k.ref_count == 0) {  // a cached free block comes back into use: it is full
    unlink(block);
    mark_filled(block, block_size_);
    if (chunk_blocks_ > 0) ++in_use_[block / chunk_blocks_];
  }
  ++k.ref_count;
}

void BlockPool::decref(int32_t block) {
  Block& k = blocks_[block];
  assert(k.ref_count > 0);
  if (--k.ref_count > 0) return;
  if (chunk_blocks_ > 0) --in_use_[block / chunk_blocks_];
  slots_used_ -= k.fill;
  k.fill = 0;
  push(block, /*at_head=*/k.uid == 0);
}

void BlockPool::mark_filled(int32_t block, int32_t n) {
  Block& k = blocks_[block];
  if (n <= k.fill) return;
  slots_used_ += n - k.fill;
  k.fill = n;
}

void BlockPool::release(std::vector<int32_t>& table) {
  for (auto it = table.rbegin(); it != table.rend(); ++it) decref(*it);
  table.clear();
}

int32_t BlockPool::chunk_end(int32_t c) const {
  return std::min<int32_t>(num_blocks(), (c + 1) * chunk_blocks_);
}

void BlockPool::set_chunks(int32_t chunk_blocks, std::function<bool(int32_t)> map,
                           std::function<void(int32_t)> unmap) {
  assert(num_free_ == num_blocks() && num_cached_free_ == 0);
  if (chunk_blocks <= 0 || chunk_blocks >= num_blocks()) return;  // one chunk: nothing to map later
  chunk_blocks_ = chunk_blocks;
  map_ = std::move(map);
  unmap_ = std::move(unmap);
  const int32_t chunks = (num_blocks() + chunk_blocks - 1) / chunk_blocks;
  mapped_.assign(static_cast<size_t>(chunks), 0);
  in_use_.assign(static_cast<size_t>(chunks), 0);
  mapped_[0] = 1;
  for (int32_t b = chunk_blocks; b < num_blocks(); ++b) unlink(b);  // free, off the queue
  unmapped_ = num_blocks() - chunk_blocks;
  num_free_ += unmapped_;
}

bool BlockPool::map_chunk() {
  const double now = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  if (now < next_map_try_) return false;  // (map_failed_ stays false: not tried)
  const int32_t c = static_cast<int32_t>(std::find(mapped_.begin(), mapped_.end(), 0) - mapped_.begin());
  if (!map_(c)) {
    next_map_try_ = now + 0.5;
    map_failed_ = true;
    return false;
  }
  // After the last plain free block (the cached ones, LRU, stay behind), in id order.
  int32_t after = tail_;
  while (after >= 0 && blocks_[after].uid != 0) after = blocks_[after].prev;
  for (int32_t b = c * chunk_blocks_; b < chunk_end(c); ++b) {
    Block& k = blocks_[b];
    k.prev = after;
    k.next = after >= 0 ? blocks_[after].next : head_;
    if (k.next >= 0) blocks_[k.next].prev = b; else tail_ = b;
    if (after >= 0) blocks_[after].next = b; else head_ = b;
    k.in_free = true;
    after = b;
  }
  unmapped_ -= chunk_end(c) - c * chunk_blocks_;
  mapped_[c] = 1;
  ++mapped_chunks_;
  return true;
}

int32_t BlockPool::map_ahead(int32_t spare) {
  const bool failed = map_failed_;
  int32_t mapped = 0;
  while (chunk_blocks_ > 0 && unmapped_ > 0 && num_free_ - unmapped_ - num_cached_free_ < spare && map_chunk())
    ++mapped;
  map_failed_ = failed;
  return mapped;
}

int32_t BlockPool::release_unused_chunks() {
  int32_t released = 0;
  for (int32_t c = 1; c < static_cast<int32_t>(mapped_.size()); ++c) {
    if (!mapped_[c] || in_use_[c] > 0) continue;
    for (int32_t b = c * chunk_blocks_; b < chunk_end(c); ++b) {
      unlink(b);  // (uncounts it as free, and as cached free)
      if (blocks_[b].uid != 0) evict(b);
    }
    const int32_t n = chunk_end(c) - c * chunk_blocks_;
    num_free_ += n;
    unmapped_ += n;
    mapped_[c] = 0;
    --mapped_chunks_;
    unmap_(c);
    ++released;
  }
  return released;
}

uint64_t BlockPool::hash_key(uint64_t parent_uid, const int32_t* tokens) const {
  // FNV-1a over the parent uid and the tokens; collisions are resolved by
  // comparing the stored parent uid and tokens.
  uint64_t h = 1469598103934665603ull ^ parent_uid;
  h *= 1099511628211ull;
  for (int32_t i = 0; i < block_size_; ++i) {
    h ^= static_cast<uint32_t>(tokens[i]);
    h *= 1099511628211ull;
  }
  return h;
}

int32_t BlockPool::lookup(uint64_t parent_uid, const int32_t* tokens) const {
  const uint64_t key = hash_key(parent_uid, tokens);
  auto range = index_.equal_range(key);
  for (auto it = range.first; it != range.second; ++it) {
    const Block& k = blocks_[it->second];
    const int32_t* stored = tokens_.data() + static_cast<size_t>(it->second) * block_size_;
    if (k.parent_uid == parent_uid && std::equal(tokens, tokens + block_size_, stored)) return it->second;
  }
  return -1;
}

uint64_t BlockPool::cache(int32_t block, uint64_t parent_uid, const int32_t* tokens) {
  if (blocks_[block].uid != 0) return blocks_[block].uid;  // a prefix-cache hit: cached already
  const int32_t existing = lookup(parent_uid, tokens);
  if (existing >= 0) return blocks_[existing].uid;
  Block& k = blocks_[block];
  assert(k.ref_count > 0);
  k.uid = next_uid_++;
  k.parent_uid = parent_uid;
  k.key = hash_key(parent_uid, tokens);
  std::copy(tokens, tokens + block_size_, tokens_.data() + static_cast<size_t>(block) * block_size_);
  index_.emplace(k.key, block);
  return k.uid;
}

}  // namespace pagedrt
