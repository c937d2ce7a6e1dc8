"""Paged KV-cache bookkeeping with prefix caching.

Blocks hold `block_size` tokens of KV. A block that is full gets a chained hash (common.block_hash) and is
entered in `hash_to_block`, so a later sequence with the same prefix reuses it instead of recomputing it
(with the same cache salt too: a salt is block 0's hash parent, so differently salted requests share nothing).
Freed blocks keep their hash (lazy eviction) and stay hit-able until they are handed out again; the least
recently freed block is handed out first.
"""

from collections import OrderedDict

from nanoserve.common.block_hash import hash_block
from nanoserve.engine_pod.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()  # kept to verify a hash hit (hash collisions must not leak KV)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.record_events = False  # the server turns this on to feed /v1/cache/events
        self.events: list[tuple[str, int]] = []  # ("stored" | "removed", block hash)
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- prefix cache -------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`. The last token is always left to compute,
        since its logits are needed."""
        if (
            not self.enable_prefix_caching
            or len(seq.prompt_logprobs) < seq.num_prompt_tokens - 1
            and seq.params.prompt_logprobs is not None
        ):  # its prompt must be computed to be scored
            return []
        hits, parent, B = [], seq.hash_root, self.block_size
        for i in range((seq.num_tokens - 1) // B):
            tokens = tuple(seq.token_ids[i * B : (i + 1) * B])
            parent = hash_block(tokens, parent)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def _take_free_block(self) -> Block:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: its KV is about to be overwritten
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
                if self.record_events:
                    self.events.append(("removed", block.hash))
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Hash the blocks that `num_tokens` computed tokens fill, so later requests can hit them."""
        B = self.block_size
        while len(seq.block_hashes) < num_tokens // B:  # placeholders are never hashed: callers stop before
            i = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[i * B : (i + 1) * B])
            h = hash_block(tokens, seq.block_hashes[-1] if i else seq.hash_root)
            seq.block_hashes.append(h)
            if not self.enable_prefix_caching:
                continue
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id
                if self.record_events:
                    self.events.append(("stored", h))

    # ---- allocation ---------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int, hits: list[int] | tuple[()] = ()) -> int:
        """Free blocks that admitting waiting `seq`, with its cached prefix `hits` and `num_new_tokens` to
        compute, would consume (hit blocks that are cached but free leave the free list too)."""
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits) + revived

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] | tuple[()] = ()) -> bool:
        return self.blocks_needed(seq, num_new_tokens, hits) <= self.num_free_blocks

    def take_prefix(self, seq: Sequence, hits: list[int]) -> None:
        """Admit `seq` with its cached prefix: share the hit blocks and skip their computation."""
        assert not seq.block_table
        seq.block_hashes = []
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            assert block.hash is not None  # a hit is a hashed block
            seq.block_hashes.append(block.hash)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` blocks for its next `num_new_tokens` tokens (caller checked `can_allocate`)."""
        if not self.try_allocate(seq, num_new_tokens):
            raise RuntimeError("out of KV blocks: allocate() without a successful can_allocate()")

    def try_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Extend a running sequence by `num_new_tokens` if the blocks are there (the per-step hot path)."""
        end = seq.num_computed_tokens + num_new_tokens
        need = (end + self.block_size - 1) // self.block_size - len(seq.block_table)
        if need > len(self.free_block_ids):
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free_block().block_id)
        known = min(end, seq.num_tokens - seq.num_pending)
        if known // self.block_size > len(seq.block_hashes):
            self._register_full_blocks(seq, known)
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Hash the full blocks of `seq`'s computed tokens whose ids are known."""
        self._register_full_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens - seq.num_pending))

    def trim(self, seq: Sequence) -> None:
        """Give back the tail blocks beyond `seq`'s tokens (those only rejected draft tokens used: speculative
        decoding). Unhashed, they go to the free list. The list is replaced, not shortened in place
        (`Sequence.block_table_array` relies on that)."""
        keep = self.blocks_for(seq.num_tokens)
        if len(seq.block_table) <= keep:
            return
        for block_id in reversed(seq.block_table[keep:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = seq.block_table[:keep]

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks. Tail blocks are freed first so they are evicted before the shared head."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def cached_hashes(self) -> list[int]:
        """Every hash a new request could hit now (the snapshot of the cache-state feed)."""
        return list(self.hash_to_block)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_blocks)
