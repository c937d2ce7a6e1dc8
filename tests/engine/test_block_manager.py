"""Block manager invariants under random admit/extend/free sequences, and its prefix-cache rules."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nanoserve.common.block_hash import block_hashes, salt_root
from nanoserve.engine_pod.block_manager import BlockManager
from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.sequence import Sequence

B = 4


def seq_of(tokens, salt=None):
    return Sequence(tokens, SamplingParams(cache_salt=salt))


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the block manager the way the scheduler does and checks its books after every call."""

    @initialize(num_blocks=st.integers(2, 12))
    def setup(self, num_blocks):
        self.bm = BlockManager(num_blocks, B)
        self.live: list[Sequence] = []

    # Tokens from a tiny alphabet so prompts share prefixes and hit the cache often; some salted.
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=14), salt=st.sampled_from([None, None, "a", "b"]))
    def admit(self, tokens, salt):
        seq = seq_of(tokens, salt)
        hits = self.bm.find_cached_prefix(seq)
        n = seq.num_tokens - len(hits) * B
        if self.bm.can_allocate(seq, n, hits):
            free = self.bm.num_free_blocks
            need = self.bm.blocks_needed(seq, n, hits)
            self.bm.take_prefix(seq, hits)
            self.bm.allocate(seq, n)
            seq.num_computed_tokens += n
            assert free - self.bm.num_free_blocks == need
            self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), token=st.integers(0, 2))
    def extend(self, i, token):
        seq = self.live[i % len(self.live)]
        seq.append_token(token)
        if self.bm.try_allocate(seq, 1):
            seq.num_computed_tokens += 1
        else:  # what the scheduler does when memory runs out: preempt
            self.bm.free(seq)
            self.live.remove(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        seq = self.live.pop(i % len(self.live))
        before = self.bm.num_free_blocks
        distinct_sole_owner = sum(1 for b in set(seq.block_table) if self.bm.blocks[b].ref_count == 1)
        self.bm.free(seq)
        assert self.bm.num_free_blocks - before == distinct_sole_owner
        assert seq.block_table == []

    @invariant()
    def books_balance(self):
        bm = self.bm
        for block in bm.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.block_id in bm.free_block_ids)  # free xor used
        for s in self.live:  # the numpy mirror the step inputs are built from never goes stale
            assert s.block_table_array().tolist() == s.block_table
        owners = sum(len(s.block_table) for s in self.live)
        assert owners == sum(b.ref_count for b in bm.blocks)
        for h, block_id in bm.hash_to_block.items():
            assert bm.blocks[block_id].hash == h
        for s in self.live:  # every live sequence's cached prefix really is its own tokens
            assert len(s.block_table) == bm.blocks_for(s.num_computed_tokens)
            assert s.block_hashes == block_hashes(
                s.token_ids[: s.num_computed_tokens], B, salt_root(s.params.cache_salt)
            )

    def teardown(self):
        for seq in self.live:
            self.bm.free(seq)
        assert self.bm.num_free_blocks == self.bm.num_blocks


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_hit_is_verified_against_stored_tokens():
    bm = BlockManager(8, B)
    a = seq_of([1, 2, 3, 4, 5])
    bm.take_prefix(a, [])
    bm.allocate(a, 5)
    bm.free(a)
    b = seq_of([1, 2, 3, 4, 9])
    assert bm.find_cached_prefix(b) == [a_block := bm.hash_to_block[block_hashes([1, 2, 3, 4], B)[0]]]
    bm.blocks[a_block].token_ids = (9, 9, 9, 9)  # as if another block's tokens collided on this hash
    assert bm.find_cached_prefix(b) == []


def test_salted_blocks_are_shared_only_under_the_same_salt():
    bm = BlockManager(16, B)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    a = seq_of(tokens, "tenant-a")
    bm.take_prefix(a, [])
    bm.allocate(a, 9)
    assert a.block_hashes == block_hashes(tokens[:8], B, salt_root("tenant-a")) != block_hashes(tokens[:8], B)
    table = a.block_table[:2]
    bm.free(a)
    assert bm.find_cached_prefix(seq_of(tokens)) == []
    assert bm.find_cached_prefix(seq_of(tokens, "tenant-b")) == []
    assert bm.find_cached_prefix(seq_of(tokens, "tenant-a")) == table


def test_least_recently_freed_is_evicted_first_and_events_report_it():
    bm = BlockManager(2, B)
    bm.record_events = True
    first, second = seq_of([1] * 4 + [0]), seq_of([2] * 4 + [0])
    for s in (first, second):
        bm.take_prefix(s, [])
        bm.allocate(s, 4)
        bm.free(s)
    h1, h2 = block_hashes([1] * 4, B)[0], block_hashes([2] * 4, B)[0]
    assert bm.events == [("stored", h1), ("stored", h2)]
    third = seq_of([3] * 3)
    bm.take_prefix(third, [])
    bm.allocate(third, 3)  # takes one block: the one freed first (h1's)
    assert h1 not in bm.hash_to_block and h2 in bm.hash_to_block
    assert bm.events[-1] == ("removed", h1)
    assert sorted(bm.cached_hashes()) == [h2]


def test_tail_blocks_are_evicted_before_the_shared_head():
    bm = BlockManager(3, B)
    s = seq_of(list(range(9)))
    bm.take_prefix(s, [])
    bm.allocate(s, 9)
    head, tail = s.block_table[0], s.block_table[1]
    bm.free(s)
    order = list(bm.free_block_ids)
    assert order.index(tail) < order.index(head)


def test_block_table_array_follows_a_freed_and_reallocated_table():
    """Preemption frees a sequence's blocks and later allocates as many new ones: same length, new ids."""
    bm = BlockManager(8, B)
    seq, other = seq_of(list(range(8))), seq_of([9] * 8)
    bm.allocate(seq, 8)
    assert seq.block_table_array().tolist() == seq.block_table == [0, 1]
    bm.free(seq)
    bm.allocate(other, 8)  # takes the freed blocks first
    bm.allocate(seq, 8)
    assert seq.block_table_array().tolist() == seq.block_table != [0, 1]
