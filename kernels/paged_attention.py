# pyright: reportArgumentType=false, reportCallIssue=false
# (Triton's launch: `kernel[grid](...)` takes plain ints for constexpr parameters, and num_warps)
"""Triton kernel: causal attention of varlen queries over a paged KV cache (prefill, chunked prefill with
a cached prefix, and decode are one kernel). Reference: `attention_ref.paged_attention_ref`.

Each program takes one sequence, one KV head, a tile of its query tokens and one split of its context.
The query rows of a tile are (token, head-of-this-KV-group) pairs, so the KV tile read from memory is
used by every query head that shares it (GQA). When the batch is too small to fill the GPU, the context
is split across programs and the partial results are merged through their log-sum-exp (split_kv.py).
An fp8 cache is dequantized as it is read: k's scale folds into the softmax scale, v's into the output.
Its values go to float16 (exactly: e4m3 is a subset) one instruction a pair, and the dots run in float16
with q pre-scaled. Its v is kept keys-last (`attention_ref.keys_last`): the P.V dot reduces over keys, so its operand
needs a block's keys adjacent, and 8-bit values have no transposing shared-memory load.
Per layer (constexpr, one variant each): a sliding window (a query sees its last WINDOW keys: the loop
starts at the tile's first visible key), a logit soft-cap, and attention sinks (a per-head logit in the
softmax denominator; added after the loop, or in the merge when the context is split).
"""

import torch
import triton
import triton.language as tl

from nanoserve.kernels.split_kv import merge_splits


# Strides that change from step to step (the block table's widest row, the split buffers' token counts):
# specializing on them (== 1, % 16) would compile new variants while serving.
@triton.jit(do_not_specialize=["stride_bt", "stride_split_o", "stride_split_l"])
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    lse_ptr,
    cu_q_ptr,
    ctx_ptr,
    block_table_ptr,
    sinks_ptr,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_split_o,
    stride_split_l,
    num_heads,
    scale_log2,
    v_scale,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    DOT_F16: tl.constexpr,
    V_RUN: tl.constexpr,
    V_LIKE_K: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    ctx = tl.load(ctx_ptr + seq)
    if tile * BLOCK_T >= q_len:
        return

    rows = tl.arange(0, BLOCK_M)
    t_local = tile * BLOCK_T + rows // GROUP_P
    g = rows % GROUP_P
    row_ok = (rows // GROUP_P < BLOCK_T) & (g < GROUP) & (t_local < q_len)
    pos = ctx - q_len + t_local  # absolute position of each query row
    head = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM

    q = tl.load(
        q_ptr + (q_start + t_local)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    qk_scale = scale_log2
    if DOT_F16:  # an fp8 cache: float16 dots, the scale (log2 units, k's scale) applied to q once
        q = (q.to(tl.float32) * scale_log2).to(tl.float16)
        qk_scale = 1.0

    # Keys this tile may see (causal, within the window), then this split's share, in whole BLOCK_N steps.
    last_t = tl.minimum(q_len, (tile + 1) * BLOCK_T) - 1
    kv_end = ctx - q_len + last_t + 1
    kv_start = 0
    if WINDOW > 0:
        kv_start = tl.maximum(ctx - q_len + tile * BLOCK_T - WINDOW + 1, 0)
        kv_start = kv_start // V_RUN * V_RUN  # whole runs of adjacent v keys (the window masks the extra)
    per_split = tl.cdiv(tl.cdiv(kv_end - kv_start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = kv_start + split * per_split
    hi = tl.minimum(kv_end, lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    n_offs = tl.arange(0, BLOCK_N)
    runs = tl.arange(0, BLOCK_N // V_RUN)
    in_run = tl.arange(0, V_RUN)
    for start in range(lo, hi, BLOCK_N):
        if V_RUN > 1:
            start = tl.multiple_of(start, V_RUN)
        n = start + n_offs
        n_ok = n < hi
        whole_run_ok = n_ok
        if V_RUN > 1 and BLOCK_T > 1:  # prefill's keys-last v is loaded by whole runs (the keys past hi get p = 0)
            whole_run_ok = n // V_RUN * V_RUN < hi
        page = tl.load(block_table_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=whole_run_ok, other=0)
        kv_off = page.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        k = k.to(q.dtype)  # an fp8 cache: float16 (q's dtype now), its k_scale is in q
        if SOFTCAP > 0:  # cap * tanh(score / cap), scores in log2 units after
            s = tl.dot(q, tl.trans(k)) * (qk_scale / 1.4426950408889634 / SOFTCAP)
            s = (2.0 * tl.sigmoid(2.0 * s) - 1.0) * (SOFTCAP * 1.4426950408889634)
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        if BLOCK_T == 1:  # one token a tile (decode): its keys end at hi, so n < hi is the causal mask
            visible = n_ok[None, :]
        else:
            visible = n_ok[None, :] & (n[None, :] <= pos[:, None])
        if WINDOW > 0:
            visible = visible & (n[None, :] > pos[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_RUN > 1 and BLOCK_T == 1:  # decode's keys-last v, read [dim, runs, run]: lanes along the dim
            run_start = start + runs * V_RUN  # (whole runs: the keys past hi in the last one get p = 0)
            run_ok = run_start < hi
            run_page = tl.load(block_table_ptr + seq * stride_bt + run_start // BLOCK_SIZE, mask=run_ok, other=0)
            run_off = run_page.to(tl.int64) * stride_vb + (run_start % BLOCK_SIZE) + kv_head * stride_vh
            run_off = tl.multiple_of(run_off, V_RUN)
            v_ptrs = v_cache_ptr + run_off[None, :, None] + d[:, None, None] * stride_vd + in_run[None, None, :]
            v = tl.load(v_ptrs, mask=d_ok[:, None, None] & run_ok[None, :, None], other=0.0)
            v = tl.trans(tl.reshape(v, (HEAD_DIM_P, BLOCK_N)))
        elif V_LIKE_K:
            v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v_off = page.to(tl.int64) * stride_vb + (n % BLOCK_SIZE) * stride_vt + kv_head * stride_vh
            if V_RUN > 1:  # prefill's keys-last v, [keys, dim] with 16-byte loads along the keys (H200, 16k-token
                # fp8 prefill: 0.256 ms at 64 x 32 x 4 x 3; read [dim, runs, run] as decode does, 0.316, its best 0.268)
                v_off = tl.max_contiguous(tl.multiple_of(v_off, V_RUN), V_RUN)
            v_ptrs = v_cache_ptr + v_off[:, None] + d[None, :] * stride_vd
            v = tl.load(v_ptrs, mask=whole_run_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new

    if HAS_SINKS and NUM_SPLITS == 1:  # the sink joins the denominator (split contexts: in the merge)
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(m_i, sink)
        shrink = tl.math.exp2(m_i - m_all)
        acc = acc * shrink[:, None]
        l_i = l_i * shrink + tl.math.exp2(sink - m_all)
    out = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    token = q_start + t_local
    o_off = split * stride_split_o + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + split * stride_split_l + token * num_heads + head, lse, mask=row_ok)


def tile_config(
    max_seqlen_q: int, group_p: int, num_splits: int = 1, v_keys_last: bool = False
) -> tuple[int, int, int, int]:
    """(query rows a program, keys a loop step, warps, pipeline stages). Decode: one token's heads of a KV
    group per program, 128 keys a step (H200, batch 256: 2-2.5% faster than 64 at mean context 850-2,000,
    equal at 256); split contexts keep 64, so short splits do not round up to a mostly empty step. Keys-last v
    (an fp8 cache) decodes 64 keys x 1 warp x 3 stages, the best of 22 tiles for its [dim, runs, run] read
    (H200, batch 256, fp8: 134.9 / 53.8 / 292.5 us at mean context 850 / 256 / 2,000, against 161 / 65 / 356 us
    for the keys-first read at 128 x 4 x 3; at 128 x 4 it takes 152 registers and is 55% slower)."""
    if max_seqlen_q == 1:
        if v_keys_last:
            return max(16, group_p), 64, 1, 3
        return max(16, group_p), 128 if num_splits == 1 else 64, 4, 3
    if max_seqlen_q * group_p <= 16:  # a verify step's 1 + k tokens a sequence (speculative decoding): one tile
        return 16, 128, 4, 3  # (H200, batch 256 x 5 tokens, context 850: bf16 220 / fp8 168 us, 64 x 32: 265 / 304)
    return max(64, group_p), 32, 4, 3  # best of 24 tiles for a 16k-token prefill on an H200 (186 TFLOP/s)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    tiles: tuple[int, int, int, int] | None = None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """q: [tokens, heads, head_dim]; caches [num_blocks, block_size, kv_heads, head_dim]; block_tables int32
    [seqs, max_blocks]; cu_seqlens_q int32 [seqs + 1]; context_lens int32 [seqs]. `max_seqlen_q` bounds the
    grid (it is 1 for decode, so a CUDA graph can capture this call). `tiles` overrides `tile_config`
    (benchmarks tune with it). `sliding_window`, `sinks` [heads], `softcap`: as `paged_attention_ref`; an fp8
    cache (float8_e4m3fn) is read as its values times `kv_scales` (k, v); `v_cache` may be keys-last (a view
    from `attention_ref.keys_last`, what an fp8 engine cache is), any other strides work too."""
    tokens, heads, dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    group_p = triton.next_power_of_2(group)
    num_seqs = context_lens.shape[0]
    v_keys_last = v_cache.stride(1) == 1 and block_size > 1
    block_m, block_n, warps, stages = tiles or tile_config(max_seqlen_q, group_p, num_splits, v_keys_last)
    block_t = 1 if max_seqlen_q == 1 else block_m // group_p  # decode: one token, its group of heads
    num_tiles = -(-max_seqlen_q // block_t)
    out = torch.empty_like(q) if out is None else out
    dim_p = triton.next_power_of_2(dim)
    # keys-last v: adjacent keys a load takes (within a block and a loop step; 16 bytes of fp8)
    v_run = min(block_size & -block_size, block_n, 16) if v_keys_last else 1
    if num_splits > 1:
        part = torch.empty((num_splits, tokens, heads, dim_p), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_splits, tokens, heads), dtype=torch.float32, device=q.device)
        target, stride_split_o, stride_split_l = part, part.stride(0), lse.stride(0)
        t_stride, h_stride = part.stride(1), part.stride(2)
    else:
        target, lse, stride_split_o, stride_split_l = out, out, 0, 0
        t_stride, h_stride = out.stride(0), out.stride(1)
    _paged_attention_kernel[(num_seqs, kv_heads, num_tiles * num_splits)](
        q,
        k_cache,
        v_cache,
        target,
        lse,
        cu_seqlens_q,
        context_lens,
        block_tables,
        q if sinks is None else sinks,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        v_cache.stride(3),
        t_stride,
        h_stride,
        block_tables.stride(0),
        stride_split_o,
        stride_split_l,
        heads,
        scale * kv_scales[0] * 1.4426950408889634,
        kv_scales[1],
        GROUP=group,
        GROUP_P=group_p,
        HEAD_DIM=dim,
        HEAD_DIM_P=dim_p,
        BLOCK_SIZE=block_size,
        BLOCK_T=block_t,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        WINDOW=sliding_window or 0,
        SOFTCAP=float(softcap or 0.0),
        HAS_SINKS=sinks is not None,
        DOT_F16=k_cache.dtype == torch.float8_e4m3fn and q.dtype in (torch.bfloat16, torch.float16),
        V_RUN=v_run,
        V_LIKE_K=v_cache.stride() == k_cache.stride(),  # (the same offsets: no second address computation)
        num_warps=warps,
        num_stages=stages,
    )
    if num_splits > 1:
        merge_splits(part, lse, out, sinks)
    return out
