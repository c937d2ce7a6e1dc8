"""What one engine's prefix cache holds, as far as the gateway knows.

Precise mode: the engine's cache-event feed (snapshot, then stored/removed deltas) gives the exact set of
block hashes it can hit. Approximate mode, while there is no feed: the blocks of the prompts the gateway
routed to the engine, in an LRU bounded like a real cache.

In precise mode a prompt just routed is also held as "pending" for a few seconds: the engine's `stored`
event may reach the gateway after the response did (two connections), and the next turn of the same
conversation, or a burst sharing a prefix, must still find it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence


class CacheIndex:
    def __init__(self, block_size: int = 16, approx_capacity: int = 1 << 16, pending_ttl: float = 10.0) -> None:
        self.block_size = block_size  # replaced by the feed's snapshot: engines may differ
        self.approx_capacity = approx_capacity
        self.pending_ttl = pending_ttl
        self.precise: set[int] | None = None  # None while no feed is live
        self.tokenizer: str | None = None  # fingerprint of the tokenizer the feed's hashes come from
        self.approx: OrderedDict[int, None] = OrderedDict()
        self.pending: OrderedDict[int, float] = OrderedDict()  # hash -> expiry (time.monotonic())

    @property
    def is_precise(self) -> bool:
        return self.precise is not None

    def apply(self, event: dict) -> None:
        """Apply one cache-feed event."""
        kind = event.get("type")
        if kind == "snapshot":
            block_size = int(event["block_size"])
            if block_size < 1:
                raise ValueError(f"cache feed snapshot with block_size {block_size}")
            self.block_size = block_size
            self.precise = set(event["hashes"])
            self.tokenizer = event.get("tokenizer")
            self.approx.clear()  # the feed now tells the truth
        elif self.precise is None:
            raise ValueError(f"cache feed sent {kind!r} before its snapshot")
        elif kind == "stored":
            self.precise.update(event["hashes"])
            self._unpend(event["hashes"])  # confirmed
        elif kind == "removed":
            self.precise.difference_update(event["hashes"])
            self._unpend(event["hashes"])
        # Unknown event types are ignored: newer engines may send more.

    def feed_lost(self) -> None:
        """The feed ended, most likely because the engine stopped: its cache is gone."""
        self.precise = None
        self.tokenizer = None
        self.approx.clear()
        self.pending.clear()

    def record(self, hashes: Sequence[int], now: float | None = None) -> None:
        """Remember a prompt routed here: in the LRU (approximate mode) or as pending (precise mode)."""
        if self.precise is not None:
            now = time.monotonic() if now is None else now
            for h in hashes:
                if h not in self.precise:
                    self.pending[h] = now + self.pending_ttl
                    self.pending.move_to_end(h)
            while self.pending and next(iter(self.pending.values())) <= now:
                self.pending.popitem(last=False)  # expired (oldest first: the TTL is the same for all)
            return
        # Leaf first, root last: shared prefixes end up most recent, so eviction trims prompts from the tail.
        for h in reversed(hashes):
            self.approx[h] = None
            self.approx.move_to_end(h)
        while len(self.approx) > self.approx_capacity:
            self.approx.popitem(last=False)

    def match(self, hashes: Iterable[int], now: float | None = None) -> int:
        """Number of leading blocks of the prompt that this engine holds (or will, once pending lands)."""
        if self.precise is None:
            held, pending, now = self.approx, {}, 0.0
        else:
            held, pending = self.precise, self.pending
            now = time.monotonic() if now is None else now
        n = 0
        for h in hashes:
            if h not in held and not (pending and pending.get(h, -1.0) > now):
                break
            n += 1
        return n

    def _unpend(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self.pending.pop(h, None)

    def __len__(self) -> int:
        return len(self.precise) if self.precise is not None else len(self.approx)
