// bindings/block_manager.cpp — pagedrt._testing._BlockManager, a test hook.
//
// Exposes the engine's real BlockPool + KvCacheManager on explicit sequence
// handles so that Python tests (exact block ids, hypothesis properties) drive
// the same code the engine runs. Not part of the public API.
#include <map>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include "engine/kv_cache_manager.hpp"
#include "pagedrt/error.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

class BlockManager {
 public:
  // chunk_blocks > 0: an elastic pool whose chunk maps and unmaps are only
  // recorded (maps fail while fail_maps is set).
  BlockManager(int32_t num_blocks, int32_t block_size, bool prefix_caching, int32_t chunk_blocks)
      : pool_(check(num_blocks, block_size)), kv_(pool_, prefix_caching) {
    if (chunk_blocks > 0)
      pool_.set_chunks(
          chunk_blocks,
          [this](int32_t c) {
            if (fail_maps) return false;
            events.emplace_back(c, true);
            return true;
          },
          [this](int32_t c) { events.emplace_back(c, false); });
  }
  std::vector<std::pair<int32_t, bool>> events;  // (chunk, mapped) in order
  bool fail_maps = false;

  int new_seq() { seqs_[next_]; return next_++; }
  int64_t acquire_cached_prefix(int seq, const std::vector<int32_t>& tokens) {
    return kv_.acquire_cached_prefix(get(seq), tokens.data(), static_cast<int64_t>(tokens.size()));
  }
  std::optional<std::vector<std::pair<int32_t, int32_t>>> allocate_slots(int seq, int64_t num_computed, int64_t n) {
    std::vector<pagedrt::BlockCopy> copies;
    if (!kv_.allocate_slots(get(seq), num_computed, n, copies)) return std::nullopt;
    std::vector<std::pair<int32_t, int32_t>> out;
    for (auto& c : copies) out.emplace_back(c.src, c.dst);
    return out;
  }
  void cache_full_blocks(int seq, const std::vector<int32_t>& tokens, int64_t num_computed) {
    if (num_computed > static_cast<int64_t>(tokens.size()))
      throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "num_computed exceeds the tokens given");
    kv_.cache_full_blocks(get(seq), tokens.data(), num_computed);
  }
  int fork(int seq) {
    const int child = new_seq();
    kv_.fork(get(seq), get(child));
    return child;
  }
  void free(int seq) {
    kv_.free(get(seq));
    seqs_.erase(seq);
  }
  std::vector<int32_t> table(int seq) { return get(seq).table; }

  pagedrt::BlockPool& pool() { return pool_; }
  pagedrt::KvCacheManager& kv() { return kv_; }

 private:
  static pagedrt::BlockPool check(int32_t num_blocks, int32_t block_size) {
    if (num_blocks < 1 || block_size < 1)
      throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "num_blocks and block_size must be >= 1");
    return pagedrt::BlockPool(num_blocks, block_size);
  }
  pagedrt::SeqBlocks& get(int seq) {
    auto it = seqs_.find(seq);
    if (it == seqs_.end())
      throw pagedrt::Error(pagedrt::ErrorKind::InvalidArgument, "no sequence " + std::to_string(seq));
    return it->second;
  }
  pagedrt::BlockPool pool_;
  pagedrt::KvCacheManager kv_;
  std::map<int, pagedrt::SeqBlocks> seqs_;
  int next_ = 0;
};

}  // namespace

void register_block_manager(nb::module_& m) {
  nb::class_<BlockManager>(m, "_BlockManager")
      .def(nb::init<int32_t, int32_t, bool, int32_t>(), "num_blocks"_a, "block_size"_a,
           "enable_prefix_caching"_a = true, "chunk_blocks"_a = 0)
      .def_rw("events", &BlockManager::events)
      .def_rw("fail_maps", &BlockManager::fail_maps)
      .def("release_unused_chunks", [](BlockManager& b) { return b.pool().release_unused_chunks(); })
      .def("map_ahead", [](BlockManager& b, int32_t spare) { return b.pool().map_ahead(spare); }, "spare"_a)
      .def_prop_ro("num_mapped_blocks", [](BlockManager& b) { return b.pool().num_mapped_blocks(); })
      .def("new_seq", &BlockManager::new_seq)
      .def("acquire_cached_prefix", &BlockManager::acquire_cached_prefix, "seq"_a, "tokens"_a)
      .def("allocate_slots", &BlockManager::allocate_slots, "seq"_a, "num_computed"_a, "n"_a)
      .def("cache_full_blocks", &BlockManager::cache_full_blocks, "seq"_a, "tokens"_a, "num_computed"_a)
      .def("fork", &BlockManager::fork, "seq"_a)
      .def("free", &BlockManager::free, "seq"_a)
      .def("table", &BlockManager::table, "seq"_a)
      .def("ref_count", [](BlockManager& b, int32_t block) { return b.pool().ref_count(block); })
      .def("uid", [](BlockManager& b, int32_t block) { return b.pool().uid(block); })
      .def_prop_ro("num_blocks", [](BlockManager& b) { return b.pool().num_blocks(); })
      .def_prop_ro("num_free", [](BlockManager& b) { return b.pool().num_free(); })
      .def_prop_ro("num_cached_free", [](BlockManager& b) { return b.pool().num_cached_free(); })
      .def_prop_ro("num_used", [](BlockManager& b) { return b.pool().num_used(); })
      .def_prop_ro("num_copies", [](BlockManager& b) { return b.kv().num_copies(); });
}
