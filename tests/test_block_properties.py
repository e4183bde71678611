"""Property tests (hypothesis) over random submit / step / fork / finish
sequences against a tiny pool, driving the engine's own BlockPool and
KvCacheManager through _testing._BlockManager.

A Python model of the KV memory follows every step: block copies are applied,
each step's tokens are written into the slots the tables name, and every live
sequence must read its own tokens back through its table. So a shared block
written in place, a stale prefix-cache mapping or a lost copy all show up as
wrong contents. Also: ref counts equal the number of tables holding a block,
and after draining, free (plain + cached) == total.
"""
from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedrt import _testing

BS = 4
NUM_BLOCKS = 8
TOKENS = st.integers(0, 1)  # a tiny alphabet, so that prefixes repeat and hit the cache


class BlockMachine(RuleBasedStateMachine):
    @initialize(prefix=st.booleans())
    def setup(self, prefix):
        self.m = _testing._BlockManager(NUM_BLOCKS, BS, prefix)
        self.seqs = {}                                   # handle -> [tokens, num_computed]
        self.memory = {b: [None] * BS for b in range(NUM_BLOCKS)}

    def read(self, h, pos):
        return self.memory[self.m.table(h)[pos // BS]][pos % BS]

    @rule(prompt=st.lists(TOKENS, min_size=1, max_size=20))
    def submit(self, prompt):
        h = self.m.new_seq()
        hit = self.m.acquire_cached_prefix(h, prompt)
        assert hit % BS == 0 and hit <= len(prompt) - 1
        assert [self.read(h, p) for p in range(hit)] == prompt[:hit]  # no stale mapping
        self.seqs[h] = [list(prompt), hit]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(1, 6), new=TOKENS)
    def step(self, data, n, new):
        h = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens, done = self.seqs[h]
        if done == len(tokens):
            tokens.append(new)                            # a decode: the sampled token joins
        n = min(n, len(tokens) - done)
        copies = self.m.allocate_slots(h, done, n)
        if copies is None:                                # out of blocks: a status, nothing changed
            return
        for src, dst in copies:
            self.memory[dst] = list(self.memory[src])
        table = self.m.table(h)
        for p in range(done, done + n):
            block = table[p // BS]
            assert self.m.ref_count(block) == 1, "a shared block is written in place"
            self.memory[block][p % BS] = tokens[p]
        self.seqs[h][1] = done + n
        self.m.cache_full_blocks(h, tokens, done + n)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        h = data.draw(st.sampled_from(sorted(self.seqs)))
        tokens, done = self.seqs[h]
        child = self.m.fork(h)
        self.seqs[child] = [tokens[:done], done]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def finish(self, data):
        h = data.draw(st.sampled_from(sorted(self.seqs)))
        self.m.free(h)
        del self.seqs[h]

    @invariant()
    def ref_counts_match_tables(self):
        if not hasattr(self, "m"):
            return
        held = Counter(b for h in self.seqs for b in self.m.table(h))
        for b in range(NUM_BLOCKS):
            assert self.m.ref_count(b) == held.get(b, 0)
        assert self.m.num_used == len(held)
        assert self.m.num_free == NUM_BLOCKS - len(held)

    @invariant()
    def every_sequence_reads_its_tokens(self):
        for h, (tokens, done) in getattr(self, "seqs", {}).items():
            assert [self.read(h, p) for p in range(done)] == tokens[:done]

    def teardown(self):
        if hasattr(self, "m"):
            for h in list(self.seqs):
                self.m.free(h)
            assert self.m.num_free == NUM_BLOCKS and self.m.num_used == 0


TestBlockManagerProperties = BlockMachine.TestCase
TestBlockManagerProperties.settings = settings(max_examples=300, stateful_step_count=50,
                                               deadline=None)
