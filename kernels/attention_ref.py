"""Plain-PyTorch references for the paged KV cache: the CPU path and the ground truth for the kernels.

KV cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]. An fp8 (e4m3) cache holds
k / k_scale and v / v_scale, saturated at +-448 (vLLM's kv_cache_dtype="fp8" with per-layer scales), its v
keys-last: indexed the same, each block stored as [num_kv_heads, head_dim, block_size] (`keys_last`).
"""

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # float8 e4m3's largest finite value


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` holds it: divided by the scale and saturated when the cache is fp8 (NaN: 0,
    so that no NaN outlives its request in a reused block's unused slots)."""
    if dtype == x.dtype:
        return x
    return (x.float() / scale).nan_to_num(0.0).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def keys_last(storage: torch.Tensor) -> torch.Tensor:
    """A contiguous [num_blocks, block_size, kv_heads, head_dim] tensor's memory as a keys-last cache with that
    indexing (a view: each block's memory read as [kv_heads, head_dim, block_size])."""
    num_blocks, block_size, kv_heads, head_dim = storage.shape
    return storage.view(num_blocks, kv_heads, head_dim, block_size).permute(0, 3, 1, 2)


def store_kvcache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Write each token's k/v ([tokens, kv_heads, head_dim]) into its slot; slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // k_cache.shape[1], slots % k_cache.shape[1]  # (any strides: v may be keys-last)
    k_cache[blocks, offsets] = quantize_kv(k[keep], kv_scales[0], k_cache.dtype)
    v_cache[blocks, offsets] = quantize_kv(v[keep], kv_scales[1], v_cache.dtype)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q: [total_query_tokens, heads, head_dim]; sequence i owns `query_lens[i]` consecutive rows, which are
    the last tokens of its `context_lens[i]`-token context (so prefill, chunked prefill with a cached
    prefix, and decode are one case). `sliding_window` W: a query at position p sees keys p-W+1..p.
    `sinks` [heads]: a logit per head that joins each softmax's denominator and adds nothing to the output
    (gpt-oss). `softcap`: scores become softcap * tanh(score / softcap) (Gemma 2). An fp8 cache is read
    back as its values times `kv_scales` (k, v), in q's dtype.
    """
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    start = 0
    for i, (n, length) in enumerate(zip(query_lens, context_lens)):
        blocks = block_tables[i, : (length + block_size - 1) // block_size]
        k = k_cache[blocks].flatten(0, 1)[:length]  # [length, kv_heads, head_dim]
        v = v_cache[blocks].flatten(0, 1)[:length]
        if k.dtype != q.dtype:  # fp8: dequantize
            k, v = (k.float() * kv_scales[0]).to(q.dtype), (v.float() * kv_scales[1]).to(q.dtype)
        qi = q[start : start + n]
        # Query j sits at position length - n + j and sees keys 0..that position (the last W of them).
        key_pos = torch.arange(length, device=q.device)[None, :]
        query_pos = torch.arange(length - n, length, device=q.device)[:, None]
        mask = key_pos <= query_pos
        if sliding_window:
            mask &= key_pos > query_pos - sliding_window
        if sinks is None and softcap is None:
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1),
                k.transpose(0, 1),
                v.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=q.shape[1] != num_kv_heads,
            )
        else:
            o = _attention_with_sinks_softcap(qi, k, v, mask, scale, sinks, softcap)
        out[start : start + n] = o.transpose(0, 1)
        start += n
    return out


def _attention_with_sinks_softcap(q, k, v, mask, scale, sinks, softcap):
    """[n, heads, d] x [len, kv_heads, d] -> [heads, n, d], scores in float32 (as transformers' eager path)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k.float()) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float()[:, None, None].expand(-1, scores.shape[1], 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return torch.einsum("hnl,lhd->hnd", probs, v.float()).to(q.dtype)
