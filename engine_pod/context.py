"""What the attention layers need to know about the current batch, set once per step by the model runner."""

from dataclasses import dataclass

import torch


@dataclass
class Context:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token's KV (-1: do not store)
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] query offsets into the flat token batch
    context_lens: torch.Tensor  # [num_seqs] tokens of KV each sequence attends to (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] block ids, -1 padded
    max_seqlen_q: int
    max_seqlen_k: int
    query_lens_list: list[int]  # host copies, so the reference path needs no device sync
    context_lens_list: list[int]
    is_decode: bool  # every sequence computes exactly one token
    num_splits: int = 1  # KV splits per sequence in the Triton decode kernel


_context: Context | None = None


def set_context(ctx: Context | None) -> None:
    global _context
    _context = ctx


def get_context() -> Context:
    if _context is None:
        raise RuntimeError("no step context: get_context() outside a model forward")
    return _context
