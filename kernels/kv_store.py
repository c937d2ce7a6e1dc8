"""Triton kernel: write each new token's k and v into its paged-cache slot (slot -1: skip).

Reference: `attention_ref.store_kvcache_ref`. Cache layout [num_blocks, block_size, kv_heads, head_dim],
so a slot's kv_heads*head_dim values are contiguous and one program copies one token.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < WIDTH
    k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
    tl.store(k_cache_ptr + slot * WIDTH + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * WIDTH + offs, v, mask=mask)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim] (each token's heads contiguous); caches contiguous."""
    tokens, heads, dim = k.shape
    assert k.stride(-1) == 1 and k.stride(-2) == dim and v.stride(-1) == 1 and v.stride(-2) == dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    width = heads * dim
    _store_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                WIDTH=width, BLOCK=triton.next_power_of_2(width))
