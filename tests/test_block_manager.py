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


def _drive(m, rng_seed):
    """A fixed mix of prompts (some sharing prefixes), growth, forks and frees;
    returns every sequence's table after each operation."""
    import random
    rng = random.Random(rng_seed)
    seqs, tokens, seen = {}, {}, []
    for step in range(120):
        op = rng.random()
        if op < 0.35 or not seqs:
            s = m.new_seq()
            toks = ([7] * 4 * rng.randint(0, 2)) + [rng.randrange(100) for _ in range(rng.randint(1, 9))]
            hit = m.acquire_cached_prefix(s, toks)
            if m.allocate_slots(s, hit, len(toks) - hit) is None:
                m.free(s)
                seen.append(None)
                continue
            m.cache_full_blocks(s, toks, len(toks))
            seqs[s], tokens[s] = len(toks), toks
        elif op < 0.65:
            s = rng.choice(sorted(seqs))
            n = rng.randint(1, 6)
            if m.allocate_slots(s, seqs[s], n) is not None:
                tokens[s] = tokens[s] + [rng.randrange(100) for _ in range(n)]
                seqs[s] += n
                m.cache_full_blocks(s, tokens[s], seqs[s])
        elif op < 0.75:
            s = rng.choice(sorted(seqs))
            c = m.fork(s)
            seqs[c], tokens[c] = seqs[s], list(tokens[s])
        else:
            s = rng.choice(sorted(seqs))
            m.free(s)
            del seqs[s], tokens[s]
        seen.append({s: m.table(s) for s in sorted(seqs)})
    return seen


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_elastic_pool_hands_out_the_ids_of_a_whole_pool(seed):
    """An elastic pool (chunks of 3 blocks mapped on demand, block_pool.hpp)
    gives every sequence the same block ids as a pool mapped whole, through
    prefix hits, copy-on-write forks, frees and running out; it maps chunks
    lowest first, only as its plain free blocks run short, and counts the
    unmapped ones as free."""
    whole = manager(num_blocks=24, block_size=4)
    elastic = _testing._BlockManager(24, 4, True, 3)
    assert elastic.num_mapped_blocks == 3 and elastic.num_free == 24
    assert _drive(whole, seed) == _drive(elastic, seed)
    mapped = [c for c, on in elastic.events if on]
    assert mapped == list(range(1, len(mapped) + 1))
    assert elastic.num_mapped_blocks == 3 * (1 + len(mapped))
    assert (elastic.num_free, elastic.num_used) == (whole.num_free, whole.num_used)


def test_elastic_pool_gives_back_unused_chunks():
    """release_unused_chunks() unmaps every chunk but the first with no block
    in use, evicting the cached prefixes it held (later lookups miss), and
    the pool maps chunks again as it needs them."""
    m = _testing._BlockManager(12, 4, True, 3)  # chunks [0-2] [3-5] [6-8] [9-11]
    a, b = m.new_seq(), m.new_seq()
    toks = list(range(24))
    assert m.allocate_slots(a, 0, 24) == [] and m.table(a) == [0, 1, 2, 3, 4, 5]
    m.cache_full_blocks(a, toks, 24)
    assert m.allocate_slots(b, 0, 16) == [] and m.table(b) == [6, 7, 8, 9]
    assert m.events == [(1, True), (2, True), (3, True)] and m.num_mapped_blocks == 12
    m.free(a)                                        # chunks 0, 1 unused (cached), 2 and 3 held by b
    assert m.release_unused_chunks() == 1 and m.events[-1] == (1, False)
    assert (m.num_mapped_blocks, m.num_free, m.num_cached_free) == (9, 8, 3)
    c = m.new_seq()
    assert m.acquire_cached_prefix(c, toks) == 12    # blocks 0-2 still cached; 3-5 went with chunk 1
    m.free(b)
    assert m.release_unused_chunks() == 2 and m.num_mapped_blocks == 3
    assert m.allocate_slots(c, 12, 8) == [] and m.table(c) == [0, 1, 2, 3, 4]
    assert m.events[-1] == (1, True)                 # mapped again, lowest first


def test_elastic_pool_that_cannot_map_is_full():
    """A chunk the device cannot map: allocation fails as a full pool's does
    (a status, nothing changed) and is tried again half a second later."""
    import time
    m = _testing._BlockManager(9, 4, False, 3)
    a = m.new_seq()
    assert m.allocate_slots(a, 0, 8) == [] and m.table(a) == [0, 1]
    m.fail_maps = True
    b = m.new_seq()
    assert m.allocate_slots(b, 0, 8) is None and m.table(b) == [] and m.num_mapped_blocks == 3
    assert m.allocate_slots(b, 0, 4) == [] and m.table(b) == [2]  # what is mapped still serves
    m.fail_maps = False
    assert m.allocate_slots(b, 4, 4) is None      # within half a second: not tried again
    time.sleep(0.55)
    assert m.allocate_slots(b, 4, 4) == [] and m.table(b) == [2, 3] and m.events == [(1, True)]


def test_elastic_pool_maps_ahead():
    """map_ahead(n) (the engine's, after each launch) maps chunks lowest first
    until n plain free blocks are mapped: cached free blocks do not count and
    none is evicted; it maps nothing where they are there already or no chunk
    is left, and stops at a chunk the device cannot map."""
    m = _testing._BlockManager(12, 4, True, 3)  # chunks [0-2] [3-5] [6-8] [9-11]
    assert m.map_ahead(3) == 0 and m.num_mapped_blocks == 3 and m.events == []
    assert m.map_ahead(4) == 1 and m.events == [(1, True)] and m.num_mapped_blocks == 6
    a, toks = m.new_seq(), list(range(16))
    assert m.allocate_slots(a, 0, 16) == [] and m.table(a) == [0, 1, 2, 3] and len(m.events) == 1
    m.cache_full_blocks(a, toks, 16)
    m.free(a)  # blocks 0-3 cached free, 4 and 5 plain
    assert m.map_ahead(5) == 1 and m.events[-1] == (2, True) and m.num_cached_free == 4
    b = m.new_seq()
    assert m.acquire_cached_prefix(b, toks) == 12  # the prefix is still there (its last block recomputed)
    assert m.map_ahead(100) == 1 and m.num_mapped_blocks == 12 and m.map_ahead(100) == 0
    f = _testing._BlockManager(12, 4, True, 3)
    f.fail_maps = True
    assert f.map_ahead(6) == 0 and f.num_mapped_blocks == 3 and f.num_free == 12
    c = f.new_seq()
    assert f.allocate_slots(c, 0, 12) == [] and f.table(c) == [0, 1, 2]  # what is mapped still serves
