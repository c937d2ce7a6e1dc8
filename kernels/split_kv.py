# pyright: reportArgumentType=false, reportCallIssue=false
"""Split-KV decode for small batches: how many splits of the context, and the merge of their partial
results (each split's output and log-sum-exp, in log2 units) into one, with attention sinks joining the
denominator here when a layer has them. The splits themselves are `paged_attention`'s programs."""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_split_o", "stride_split_l"])
def _merge_splits_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    sinks_ptr,
    stride_split_o,
    stride_split_l,
    stride_pt,
    stride_ph,
    stride_ot,
    stride_oh,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    lse = tl.load(lse_ptr + s * stride_split_l + token * num_heads + head)
    m = tl.max(lse, 0)
    if HAS_SINKS:  # the sink: one more term of the denominator, with no value
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m = tl.maximum(m, sink)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.math.exp2(lse - m)
        w = w / tl.maximum(tl.sum(w, 0) + tl.math.exp2(sink - m), 1e-30)
    else:
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.math.exp2(lse - m)
        w = w / tl.maximum(tl.sum(w, 0), 1e-30)
    d = tl.arange(0, HEAD_DIM_P)
    part = tl.load(
        part_ptr + s[:, None] * stride_split_o + token * stride_pt + head * stride_ph + d[None, :],
        mask=d[None, :] < HEAD_DIM,
        other=0.0,
    )
    out = tl.sum(part * w[:, None], 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def num_splits_for(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Split the context only when sequences x KV heads give fewer than two programs per multiprocessor
    (on an H200, batch 32 x 8 KV heads at context ~1,200: 56 us unsplit, 48 us in 2 splits)."""
    programs = num_seqs * num_kv_heads
    if programs >= 2 * num_sms:
        return 1
    splits = triton.next_power_of_2(-(-2 * num_sms // programs))
    return max(1, min(splits, 16, triton.next_power_of_2(-(-max_context // 256))))


def merge_splits(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, sinks: torch.Tensor | None) -> None:
    """part [splits, tokens, heads, dim_p] float32, lse [splits, tokens, heads] -> out [tokens, heads, dim]."""
    tokens, heads, dim = out.shape
    _merge_splits_kernel[(tokens, heads)](
        part,
        lse,
        out,
        part if sinks is None else sinks,
        part.stride(0),
        lse.stride(0),
        part.stride(1),
        part.stride(2),
        out.stride(0),
        out.stride(1),
        heads,
        NUM_SPLITS=part.shape[0],
        HEAD_DIM=dim,
        HEAD_DIM_P=part.shape[3],
        HAS_SINKS=sinks is not None,
    )
