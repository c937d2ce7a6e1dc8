"""The fused-MoE Triton kernel against the loop over experts (engine_pod/layers/fused_moe.py) on random
routings: uneven loads, experts that get no tokens, one token and many; and the align step's layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoserve.engine_pod.layers.fused_moe import fused_experts_ref, select_experts

SMALL_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4)  # several blocks even at these sizes


def random_moe(num_tokens, num_experts, top_k, hidden, inter, skew, seed, device, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    # skew > 0 piles the tokens onto the first experts: uneven loads, and experts left without tokens.
    logits = torch.randn(num_tokens, num_experts, generator=g) - skew * torch.arange(num_experts)
    weights, ids = select_experts(logits, top_k, renormalize=seed % 2 == 0)
    return [t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


@settings(max_examples=6, deadline=None)
@given(
    num_tokens=st.integers(1, 24),
    num_experts=st.sampled_from([4, 8]),
    top_k=st.sampled_from([1, 2, 3]),
    skew=st.sampled_from([0.0, 1.0, 4.0]),
    seed=st.integers(0, 1 << 20),
)
def test_kernel_matches_reference(device, num_tokens, num_experts, top_k, skew, seed):
    from nanoserve.kernels.fused_moe import fused_experts

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w13, w2, weights, ids = random_moe(num_tokens, num_experts, top_k, 32, 24, skew, seed, device, dtype)
    ref = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)
    for blocks in (SMALL_BLOCKS, None):  # None: the engine's own tile sizes
        out = fused_experts(x, w13, w2, weights, ids, block_config=blocks)
        assert out.dtype == dtype and out.shape == x.shape
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert ((out.float() - ref).norm() / ref.norm()).item() < tol


def test_align_groups_pairs_by_expert_in_padded_blocks():
    from nanoserve.kernels.fused_moe import align_to_blocks

    # Pairs (token * k + slot): expert 0 gets 0, 3; expert 2 gets 1, 2, 4; expert 3 gets 5; 1 and 4 none.
    sorted_ids, block_experts, num_padded = align_to_blocks(torch.tensor([[0, 2], [2, 0], [2, 3]]), 5, 4)
    pad = 6
    assert sorted_ids[:12].tolist() == [0, 3, pad, pad, 1, 2, 4, pad, 5, pad, pad, pad]
    assert (sorted_ids[12:] == pad).all() and num_padded.tolist() == [12]
    assert block_experts[:3].tolist() == [0, 2, 3]  # blocks past num_padded are skipped


@pytest.mark.parametrize("num_tokens", [1, 40])
def test_all_tokens_on_one_expert(device, num_tokens):
    from nanoserve.kernels.fused_moe import fused_experts

    x, w13, w2, _, _ = random_moe(num_tokens, 4, 1, 32, 16, 0.0, 1, device, torch.float32)
    ids = torch.full((num_tokens, 1), 3, device=device)
    weights = torch.ones(num_tokens, 1, device=device)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    out = fused_experts(x, w13, w2, weights, ids, block_config=SMALL_BLOCKS)
    tol = 1e-2 if device == "cuda" else 1e-5  # tf32 tensor cores on CUDA
    assert ((out - ref).norm() / ref.norm()).item() < tol


@settings(max_examples=4, deadline=None)
@given(num_tokens=st.integers(1, 24), seed=st.integers(0, 1 << 20))
def test_biases_and_clamped_swiglu_match_reference(device, num_tokens, seed):
    # gpt-oss's experts: biases after both GEMMs, a SwiGLU clamped at a limit the activations cross.
    from nanoserve.kernels.fused_moe import fused_experts

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w13, w2, weights, ids = random_moe(num_tokens, 4, 2, 32, 24, 1.0, seed, device, dtype)
    g = torch.Generator().manual_seed(seed)
    b13, b2 = (torch.randn(4, n, generator=g).to(device, dtype) for n in (48, 32))
    swiglu = (1.702, 0.5)
    assert ((x.float() @ w13[0].float().t()).abs() > 0.5).any()
    ref = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids, b13.float(), b2.float(), swiglu)
    plain = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)
    assert ((plain - ref).norm() / ref.norm()).item() > 0.1  # the biases and the clamp change the result
    out = fused_experts(x, w13, w2, weights, ids, b13, b2, swiglu, block_config=SMALL_BLOCKS)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert ((out.float() - ref).norm() / ref.norm()).item() < tol
