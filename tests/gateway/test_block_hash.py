"""The prefix block hash is a contract between engines and gateways (common/block_hash.py's docstring):
h_i = xxh64(h_{i-1} as 8 little-endian bytes || block i's ids as int64 little-endian). Checked here against
that definition written out with struct, on random ids (large and negative ones too) and block sizes."""

import struct

import xxhash
from hypothesis import given
from hypothesis import strategies as st

from nanoserve.common.block_hash import block_hashes, hash_block

IDS = st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 200_000), max_size=80)


def by_definition(ids: list[int], block_size: int, parent: int | None) -> list[int]:
    out = []
    for start in range(0, len(ids) - block_size + 1, block_size):
        prefix = b"" if parent is None else struct.pack("<Q", parent)
        parent = xxhash.xxh64_intdigest(prefix + struct.pack(f"<{block_size}q", *ids[start : start + block_size]))
        out.append(parent)
    return out


@given(IDS, st.integers(1, 17), st.none() | st.integers(0, 2**64 - 1))
def test_block_hashes_follow_the_contract(ids, block_size, parent):
    expected = by_definition(ids, block_size, parent)
    assert block_hashes(ids, block_size, parent) == expected
    if len(ids) >= block_size:
        assert hash_block(tuple(ids[:block_size]), parent) == expected[0]
