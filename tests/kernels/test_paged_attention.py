"""Triton paged attention against its PyTorch reference, on fresh random inputs of many
shapes: block sizes, GQA groups, head dims, query/context mixes, splits. Outputs are poisoned first."""
import random

import pytest
import torch

from nanoserve.kernels.attention_ref import paged_attention_ref


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
        tables.append(perm[i:i + n])
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


CASES = [  # (query_lens, context_lens, block_size, kv_heads, heads, head_dim)
    ([1, 1, 1], [1, 17, 40], 16, 2, 4, 32),           # decode, GQA 2
    ([5, 9], [5, 30], 16, 1, 8, 64),                  # prefill, one with a cached prefix, GQA 8
    ([1, 7, 1, 20], [33, 7, 64, 50], 32, 2, 2, 32),   # mixed prefill chunks and decodes, MHA
    ([3], [70], 48, 2, 6, 40),                         # odd head dim (padded), GQA 3, block 48
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_attention_matches_reference(device, case, num_splits):
    from nanoserve.kernels.paged_attention import paged_attention
    query_lens, context_lens, block_size, kv_heads, heads, dim = case
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, kc, vc, cu, ctx, table = make_batch(query_lens, context_lens, block_size, kv_heads, dim, heads, dtype,
                                           device, seed=random.randrange(1 << 30))
    out = torch.full_like(q, float("nan"))
    paged_attention(q, kc, vc, cu, ctx, table, dim ** -0.5, max(query_lens), num_splits=num_splits, out=out)
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), query_lens, context_lens, table, dim ** -0.5)
    assert not out.isnan().any()
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-4)


DECODE_CASES = [  # (context_lens (0: a padded graph row), block_size, kv_heads, heads, head_dim)
    ([1, 17, 40, 0], 16, 2, 4, 32),     # GQA 2, a padded row
    ([70, 3], 48, 2, 6, 40),            # odd head dim (padded), GQA 3, block 48
    ([300, 129, 128], 16, 1, 8, 64),    # GQA 8, contexts across several 128-key steps
]


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("with_norm", [False, True])
def test_decode_attention_matches_norm_rotary_store_then_reference(device, case, num_splits, with_norm):
    """The fused decode kernel equals the unfused pipeline: q/k norms and rotary (reference), k/v stored at
    their slots, reference attention over the whole context; no other cache slot changes."""
    from nanoserve.engine_pod.layers.layernorm import rms_norm as rms_ref
    from nanoserve.engine_pod.layers.rotary import RotaryEmbedding, apply_rotary
    from nanoserve.kernels.attention_ref import store_kvcache_ref
    from nanoserve.kernels.paged_attention import decode_attention
    context_lens, block_size, kv_heads, heads, dim = case
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    seed = random.randrange(1 << 30)
    _, kc, vc, _, ctx, table = make_batch([1] * len(context_lens), [max(c, 1) for c in context_lens], block_size,
                                          kv_heads, dim, heads, dtype, device, seed)
    ctx = torch.tensor(context_lens, dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(len(context_lens), (heads + 2 * kv_heads) * dim, generator=g).to(device, dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)  # strided views, as the model has them
    q, k, v = q.view(-1, heads, dim), k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim)
    positions = (ctx.long() - 1).clamp(min=0)
    slots = torch.tensor([int(table[i, (c - 1) // block_size]) * block_size + (c - 1) % block_size if c else -1
                          for i, c in enumerate(context_lens)], device=device)
    rope = RotaryEmbedding(dim, 512, 10000.0, {}).to(device)
    norms = {}
    if with_norm:
        norms = {"q_weight": torch.randn(dim, generator=g).to(device, dtype),
                 "k_weight": torch.randn(dim, generator=g).to(device, dtype), "eps": 1e-6}
    ref_kc, ref_vc = kc.clone(), vc.clone()
    out = decode_attention(positions, q, k, v, rope.cos_sin, kc, vc, slots, ctx, table, dim ** -0.5,
                           num_splits=num_splits, **norms)

    nq, nk = (rms_ref(q, norms["q_weight"], 1e-6), rms_ref(k, norms["k_weight"], 1e-6)) if with_norm else (q, k)
    rq, rk = apply_rotary(positions, nq, nk, rope.cos_sin)
    store_kvcache_ref(rk, v, ref_kc, ref_vc, slots)
    real = [i for i, c in enumerate(context_lens) if c]
    ref = paged_attention_ref(rq[real].float(), ref_kc.float(), ref_vc.float(), [1] * len(real),
                              [context_lens[i] for i in real], table[real], dim ** -0.5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert not out.isnan().any()
    assert rel_err(out[real], ref) < tol
    assert (out[[i for i in range(len(context_lens)) if i not in real]] == 0).all()  # padded rows: nothing read
    assert torch.equal(vc, ref_vc)  # v stored where the reference stores it, bit for bit
    stored = torch.zeros(kc.shape[0] * block_size, dtype=torch.bool, device=device)
    stored[slots[slots >= 0]] = True
    assert rel_err(kc.flatten(0, 1)[stored], ref_kc.flatten(0, 1)[stored]) < tol
    assert torch.equal(kc.flatten(0, 1)[~stored], ref_kc.flatten(0, 1)[~stored])
