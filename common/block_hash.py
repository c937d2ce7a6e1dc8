"""Prefix block hashing: the contract shared by the engine's prefix cache and the gateway's router.

Block i of a token sequence (block size B) hashes to
    h_i = xxh64(h_{i-1} as 8 little-endian bytes || token ids of block i as int64 little-endian)
with no prefix for block 0, or, for a request with a cache salt (vLLM's `cache_salt`), with
h_{-1} = salt_root(salt) as block 0's parent: salted requests share blocks only with the same salt.
Only full blocks are hashed. Torch-free on purpose (the gateway image has no torch).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

import xxhash


def _int64_le(token_ids: Sequence[int]) -> bytes:
    """The ids as int64 little-endian, packed in one C call (the router hashes every prompt it routes)."""
    packed = array("q", token_ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def _chained(data: bytes, parent: int | None) -> int:
    return xxhash.xxh64_intdigest(data if parent is None else parent.to_bytes(8, "little") + data)


def hash_block(token_ids: Sequence[int], parent: int | None = None) -> int:
    """Hash one full block of token ids, chained to the previous block's hash (None for block 0)."""
    return _chained(_int64_le(token_ids), parent)


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of every full block of `token_ids` (a trailing partial block is not hashed)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    data, step = _int64_le(token_ids[: len(token_ids) // block_size * block_size]), 8 * block_size
    hashes: list[int] = []
    for start in range(0, len(data), step):
        parent = _chained(data[start : start + step], parent)
        hashes.append(parent)
    return hashes


def salt_root(salt: str | None) -> int | None:
    """Block 0's parent for a salted request (None: unsalted). Tagged so that no salt hashes like a block."""
    if salt is None:
        return None
    return xxhash.xxh64_intdigest(b"nanoserve-cache-salt\x00" + salt.encode("utf-8", "surrogatepass"))


def tenant_salt(api_key: str, cache_salt: str | None = None) -> str:
    """The salt of a request under --cache-salt-by-api-key: its key's digest (never the key itself, which
    must not reach logs or hashes an attacker can brute-force cheaply), then the request's own salt."""
    digest = hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()  # fixed length: unambiguous
    return digest + ":" + (cache_salt or "")
