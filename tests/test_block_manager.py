"""The block pool and KV-cache manager (the engine's own C++ code, through the
_testing._BlockManager test hook): exact block ids, ref counts and eviction order.

Free-queue order (see block_pool.hpp): a fresh pool hands out 0, 1, 2, ...;
a block freed without cached content goes to the head (reused first), a block
holding a cached prefix to the tail (evicted least recently freed first).
"""
from __future__ import annotations

import pytest

from pagedrt import _testing


def manager(num_blocks=10, block_size=4, prefix=True):
    return _testing._BlockManager(num_blocks, block_size, prefix)


def test_allocation_across_block_boundaries():
    m = manager()
    s = m.new_seq()
    assert m.allocate_slots(s, 0, 6) == [] and m.table(s) == [0, 1]
    assert m.allocate_slots(s, 6, 2) == [] and m.table(s) == [0, 1]     # fills block 1
    assert m.allocate_slots(s, 8, 1) == [] and m.table(s) == [0, 1, 2]  # crosses into block 2
    assert [m.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    assert (m.num_used, m.num_free) == (3, 7)


def test_out_of_blocks_is_a_status_and_changes_nothing():
    m = manager(num_blocks=3)
    a, b = m.new_seq(), m.new_seq()
    assert m.allocate_slots(a, 0, 8) == [] and m.table(a) == [0, 1]
    assert m.allocate_slots(b, 0, 8) is None        # needs 2, one is free
    assert m.table(b) == [] and m.num_free == 1
    assert m.allocate_slots(b, 0, 4) == [] and m.table(b) == [2]


def test_free_and_immediate_reuse():
    m = manager()
    a, b = m.new_seq(), m.new_seq()
    m.allocate_slots(a, 0, 9)                      # [0, 1, 2]
    m.allocate_slots(b, 0, 4)                      # [3]
    m.free(a)                                      # released 2, 1, 0: 0 ends at the head
    assert m.num_free == 9 and [m.ref_count(x) for x in (0, 1, 2)] == [0, 0, 0]
    c = m.new_seq()
    m.allocate_slots(c, 0, 12)
    assert m.table(c) == [0, 1, 2]                 # the freed blocks come back first
    assert m.table(b) == [3]


def test_fork_and_copy_on_write_happens_once_on_first_write():
    m = manager()
    a = m.new_seq()
    m.allocate_slots(a, 0, 6)                      # [0, 1]; block 1 holds 2 of 4 tokens
    b = m.fork(a)
    assert m.table(b) == [0, 1] and (m.ref_count(0), m.ref_count(1)) == (2, 2)
    assert m.allocate_slots(b, 6, 1) == [(1, 2)]   # shared partial block: copy 1 -> 2
    assert m.table(b) == [0, 2] and (m.ref_count(1), m.ref_count(2)) == (1, 1)
    assert m.allocate_slots(b, 7, 1) == []         # its own block now: no copy
    assert m.allocate_slots(a, 6, 2) == []         # a owns block 1 alone again: no copy
    assert m.ref_count(0) == 2 and m.num_copies == 1
    assert m.allocate_slots(b, 8, 1) == [] and m.table(b) == [0, 2, 3]


def test_fork_at_a_block_boundary_needs_no_copy():
    m = manager()
    a = m.new_seq()
    m.allocate_slots(a, 0, 8)                      # [0, 1], both full
    b = m.fork(a)
    assert m.allocate_slots(b, 8, 1) == [] and m.table(b) == [0, 1, 2]
    assert m.allocate_slots(a, 8, 1) == [] and m.table(a) == [0, 1, 3]
    assert m.num_copies == 0 and m.ref_count(1) == 2


def cached_seq(m, tokens):
    s = m.new_seq()
    assert m.allocate_slots(s, 0, len(tokens)) == []
    m.cache_full_blocks(s, tokens, len(tokens))
    return s


def test_prefix_cache_hit_and_reuse_order():
    m = manager()
    toks = list(range(100, 110))                   # 10 tokens: blocks 0, 1 full, 2 partial
    a = cached_seq(m, toks)
    assert m.uid(0) and m.uid(1) and not m.uid(2)
    m.free(a)                                      # queue: [2, 3..9, 1, 0]
    assert (m.num_free, m.num_cached_free) == (10, 2)
    b = m.new_seq()
    assert m.acquire_cached_prefix(b, toks) == 8
    assert m.table(b) == [0, 1] and m.num_cached_free == 0
    assert m.allocate_slots(b, 8, 2) == [] and m.table(b) == [0, 1, 2]


def test_prefix_cache_full_prompt_hit_keeps_last_token_to_compute():
    m = manager()
    toks = list(range(200, 208))                   # exactly two full blocks
    m.free(cached_seq(m, toks))
    b = m.new_seq()
    assert m.acquire_cached_prefix(b, toks) == 4   # (8 - 1) // 4 blocks: the last token recomputes
    assert m.table(b) == [0]
    assert m.allocate_slots(b, 4, 4) == [] and m.table(b) == [0, 2]  # block 1 stays cached-free
    assert m.num_cached_free == 1


def test_prefix_cache_partial_hit():
    m = manager()
    m.free(cached_seq(m, list(range(12))))
    b = m.new_seq()
    assert m.acquire_cached_prefix(b, list(range(4)) + [99] * 8) == 4
    assert m.table(b) == [0]
    c = m.new_seq()
    assert m.acquire_cached_prefix(c, [99] + list(range(1, 12))) == 0 and m.table(c) == []


def test_shared_blocks_are_counted_once_per_owner():
    m = manager()
    toks = list(range(300, 309))
    a = cached_seq(m, toks)
    b = m.new_seq()
    assert m.acquire_cached_prefix(b, toks) == 8   # hits a's live blocks
    assert m.table(b) == [0, 1] and (m.ref_count(0), m.ref_count(1)) == (2, 2)


def test_eviction_is_lru_and_leaves_no_stale_mapping():
    m = manager(num_blocks=4, block_size=2)
    first = cached_seq(m, [1, 2, 3, 4])            # blocks 0, 1 cached
    m.free(first)                                  # queue: [2, 3, 1, 0]
    second = cached_seq(m, [7, 8, 9, 10])          # takes 2, 3 (plain free first)
    m.free(second)                                 # queue: [1, 0, 3, 2]
    assert m.num_cached_free == 4
    c = m.new_seq()
    assert m.allocate_slots(c, 0, 3) == [] and m.table(c) == [1, 0]  # evicts [1,2,3,4]'s blocks, LRU first
    assert not m.uid(0) and not m.uid(1)
    d = m.new_seq()
    assert m.acquire_cached_prefix(d, [1, 2, 3, 4, 5]) == 0          # no stale hit on reused blocks
    assert m.acquire_cached_prefix(d, [7, 8, 9, 10, 11]) == 4        # the other prefix still cached
    assert m.table(d) == [2, 3]


def test_prefix_caching_off_never_hits():
    m = manager(prefix=False)
    toks = list(range(12))
    m.free(cached_seq(m, toks))
    assert m.num_cached_free == 0
    b = m.new_seq()
    assert m.acquire_cached_prefix(b, toks) == 0


def test_bad_handles_raise():
    m = manager()
    with pytest.raises(ValueError, match="no sequence 5"):
        m.table(5)
