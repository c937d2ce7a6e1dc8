"""Per-engine cache index: precise mode from the feed's events, approximate LRU mode otherwise."""

from __future__ import annotations

import random

import pytest

from nanoserve.common.block_hash import block_hashes
from nanoserve.gateway.cache_index import CacheIndex


def prompt(seed: int, n_tokens: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n_tokens)]


def test_snapshot_then_deltas():
    bs = 4
    hs = block_hashes(prompt(0, 6 * bs), bs)
    idx = CacheIndex(block_size=16)
    idx.apply({"type": "snapshot", "block_size": bs, "hashes": hs[:3]})
    assert idx.is_precise and idx.block_size == bs
    assert idx.match(hs) == 3
    idx.apply({"type": "stored", "hashes": hs[3:]})
    assert idx.match(hs) == len(hs)
    idx.apply({"type": "removed", "hashes": [hs[2]]})
    assert idx.match(hs) == 2  # only leading blocks count: a hole ends the match
    assert len(idx) == len(hs) - 1


def test_delta_before_snapshot_is_an_error():
    with pytest.raises(ValueError):
        CacheIndex().apply({"type": "stored", "hashes": [1]})


def test_unknown_event_types_are_ignored():
    idx = CacheIndex()
    idx.apply({"type": "snapshot", "block_size": 16, "hashes": [1, 2]})
    idx.apply({"type": "something_new", "hashes": [3]})
    assert idx.match([1, 2, 3]) == 2


def test_feed_loss_forgets_everything_and_falls_back_to_approximate():
    idx = CacheIndex()
    hs = block_hashes(prompt(1, 64), 16)
    idx.record(hs)
    idx.apply({"type": "snapshot", "block_size": 16, "hashes": hs})
    assert len(idx) == len(hs) and not idx.approx  # the feed is the truth
    idx.feed_lost()
    assert not idx.is_precise and idx.match(hs) == 0 and len(idx) == 0


def test_approximate_mode_remembers_routed_prompts():
    idx = CacheIndex(block_size=16)
    a = block_hashes(prompt(3, 16 * 5), 16)
    b = block_hashes(prompt(4, 16 * 5), 16)
    idx.record(a)
    assert idx.match(a) == len(a) and idx.match(b) == 0


def test_approximate_lru_evicts_from_the_tail_of_the_oldest_prompt():
    cap = 8
    idx = CacheIndex(block_size=4, approx_capacity=cap)
    old = block_hashes(prompt(5, 4 * 6), 4)
    new = block_hashes(prompt(6, 4 * 5), 4)
    idx.record(old)
    idx.record(new)
    assert len(idx) == cap
    evicted = len(old) + len(new) - cap
    assert idx.match(new) == len(new)
    assert idx.match(old) == len(old) - evicted  # its root blocks survive longest


def test_approximate_lru_refreshes_reused_prefixes():
    idx = CacheIndex(block_size=4, approx_capacity=6)
    shared = block_hashes(prompt(7, 4 * 3), 4)
    idx.record(shared)
    other = block_hashes(prompt(8, 4 * 2), 4)
    idx.record(other)
    idx.record(shared)  # touched again: now the most recent
    idx.record(block_hashes(prompt(9, 4 * 3), 4))
    assert idx.match(shared) == len(shared)
    assert idx.match(other) == 0


def test_routed_prompt_is_pending_until_the_feed_confirms_or_it_expires():
    ttl = 10.0
    idx = CacheIndex(block_size=4, pending_ttl=ttl)
    idx.apply({"type": "snapshot", "block_size": 4, "hashes": []})
    hs = block_hashes(prompt(10, 4 * 5), 4)
    t0 = 100.0
    idx.record(hs, now=t0)
    assert idx.match(hs, now=t0 + ttl / 2) == len(hs)  # the stored event may not have arrived yet
    assert idx.match(hs, now=t0 + ttl) == 0  # it never did: forget it
    idx.apply({"type": "stored", "hashes": hs[:2]})
    assert idx.match(hs, now=t0 + ttl) == 2
    assert len(idx.pending) == len(hs) - 2
    idx.record(block_hashes(prompt(11, 8), 4), now=t0 + ttl)  # expired entries are pruned on the way
    assert not set(idx.pending) & set(hs)
