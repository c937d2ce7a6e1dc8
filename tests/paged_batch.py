"""Random paged KV caches and queries for the attention kernel tests."""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_batch(query_lens, context_lens, block_size, kv_heads, head_dim, heads, dtype, device, seed):
    """Random caches with each sequence's blocks scattered, plus the new tokens' q/k/v."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, i = [], 0
    for n in blocks_per_seq:
        tables.append(perm[i : i + n])
        i += n
    width = max(blocks_per_seq)
    table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    tokens = sum(query_lens)
    q = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    to = lambda t: t.to(device)
    return to(q), to(k_cache), to(v_cache), to(cu), to(torch.tensor(context_lens, dtype=torch.int32)), to(table)
