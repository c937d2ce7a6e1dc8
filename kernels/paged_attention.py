"""Triton kernels: causal attention of varlen queries over a paged KV cache. Reference:
`attention_ref.paged_attention_ref`.

`paged_attention`: prefill, chunked prefill with a cached prefix, and decode in one kernel. Each program
takes one sequence, one KV head, a tile of its query tokens and one split of its context. The query rows
of a tile are (token, head-of-this-KV-group) pairs, so the KV tile read from memory is used by every query
head that shares it (GQA). When the batch is too small to fill the GPU, the context is split across
programs and the partial results are merged through their log-sum-exp.

`decode_attention`: decode steps (one new token a sequence), with the new token's q/k norms, rotary and
KV-cache store done by the attention kernel itself (one launch a layer instead of two). Each program
rotates its own heads' q and k; the new k/v are written to their slot by one program and attended from
registers by all, so no program reads a slot that another is writing.
"""
import torch
import triton
import triton.language as tl

from nanoserve.kernels.elementwise import norm_rotate_rows


@triton.jit
def _attend(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, lo, hi, pos,
            stride_kb, stride_kt, stride_kh, scale_log2,
            HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of q's rows over the cached keys [lo, hi) of one sequence (`table_ptr`: its block-table
    row); row r sees keys up to pos[r]. Returns the updated running max, sum and output."""
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM
    n_offs = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        n = start + n_offs
        n_ok = n < hi
        page = tl.load(table_ptr + n // BLOCK_SIZE, mask=n_ok, other=0)
        kv_off = page.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        visible = n_ok[None, :] & (n[None, :] <= pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _store_rows(out_ptr, lse_ptr, acc, m_i, l_i, token, head, row_ok, split, stride_ot, stride_oh,
                stride_split_o, stride_split_l, num_heads,
                HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Each row's output (and with splits its log-sum-exp, for the merge)."""
    d = tl.arange(0, HEAD_DIM_P)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = split * stride_split_o + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + split * stride_split_l + token * num_heads + head, lse, mask=row_ok)


# Strides that change from step to step (the block table's widest row, the split buffers' token counts):
# specializing on them (== 1, % 16) would compile new variants while serving.
@triton.jit(do_not_specialize=["stride_bt", "stride_split_o", "stride_split_l"])
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
        cu_q_ptr, ctx_ptr, block_table_ptr,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_ot, stride_oh,
        stride_bt, stride_split_o, stride_split_l, num_heads,
        scale_log2,
        GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr):
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
    pos = ctx - q_len + t_local                      # absolute position of each query row
    head = kv_head * GROUP + g
    d = tl.arange(0, HEAD_DIM_P)
    q = tl.load(q_ptr + (q_start + t_local)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)

    # Keys this tile may see (causal), then this split's share of them, in whole BLOCK_N steps.
    last_t = tl.minimum(q_len, (tile + 1) * BLOCK_T) - 1
    kv_end = ctx - q_len + last_t + 1
    per_split = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(kv_end, lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_ptr + seq * stride_bt, kv_head,
                            lo, hi, pos, stride_kb, stride_kt, stride_kh, scale_log2,
                            HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, BLOCK_N)
    _store_rows(out_ptr, lse_ptr, acc, m_i, l_i, q_start + t_local, head, row_ok, split, stride_ot, stride_oh,
                stride_split_o, stride_split_l, num_heads, HEAD_DIM, HEAD_DIM_P, NUM_SPLITS)


@triton.jit(do_not_specialize=["stride_bt", "stride_split_o", "stride_split_l"])
def _decode_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, slot_ptr,
        k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr, ctx_ptr, block_table_ptr,
        stride_qt, stride_qh, stride_nkt, stride_nkh, stride_nvt, stride_nvh,
        stride_kb, stride_kt, stride_kh, stride_ot, stride_oh,
        stride_bt, stride_split_o, stride_split_l, num_heads, eps,
        scale_log2,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_NORM: tl.constexpr):
    seq = tl.program_id(0)  # = its token: one a sequence
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    pos = tl.load(pos_ptr + seq)  # the new token's position, ctx - 1 (padded graph rows: ctx 0)
    new = ctx - 1

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    head = kv_head * GROUP + rows
    q = norm_rotate_rows(q_ptr + seq * stride_qt + head[:, None] * stride_qh, row_ok[:, None], q_w_ptr, cos_sin_ptr,
                         pos, eps, HEAD_DIM // 2, HEAD_DIM_P, HAS_NORM)
    one = tl.zeros([1, 1], tl.int32)
    k_new = norm_rotate_rows(k_ptr + seq * stride_nkt + kv_head * stride_nkh + one, one == 0, k_w_ptr, cos_sin_ptr,
                             pos, eps, HEAD_DIM // 2, HEAD_DIM_P, HAS_NORM)
    d = tl.arange(0, HEAD_DIM_P)[None, :]
    d_ok = d < HEAD_DIM
    v_new = tl.load(v_ptr + seq * stride_nvt + kv_head * stride_nvh + d, mask=d_ok, other=0.0)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    if (split == 0) & (slot >= 0):
        off = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_kt + kv_head * stride_kh + d
        tl.store(k_cache_ptr + off, k_new, mask=d_ok)
        tl.store(v_cache_ptr + off, v_new, mask=d_ok)

    # This split's share of the context; the cache is read for every key but the new one.
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(ctx, lo + per_split)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, block_table_ptr + seq * stride_bt, kv_head,
                            lo, tl.minimum(hi, new), tl.zeros([BLOCK_M], tl.int32) + new,
                            stride_kb, stride_kt, stride_kh, scale_log2, HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, BLOCK_N)
    if (new >= lo) & (new < hi):  # the new key, from registers
        s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * scale_log2
        m_new = tl.maximum(m_i, s)
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)
        m_i = m_new
    _store_rows(out_ptr, lse_ptr, acc, m_i, l_i, seq + rows * 0, head, row_ok, split, stride_ot, stride_oh,
                stride_split_o, stride_split_l, num_heads, HEAD_DIM, HEAD_DIM_P, NUM_SPLITS)


@triton.jit(do_not_specialize=["stride_split_o", "stride_split_l"])
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, stride_split_o, stride_split_l, stride_pt, stride_ph,
                         stride_ot, stride_oh, num_heads,
                         NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    lse = tl.load(lse_ptr + s * stride_split_l + token * num_heads + head)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    w = w / tl.maximum(tl.sum(w, 0), 1e-30)
    d = tl.arange(0, HEAD_DIM_P)
    part = tl.load(part_ptr + s[:, None] * stride_split_o + token * stride_pt + head * stride_ph + d[None, :],
                   mask=d[None, :] < HEAD_DIM, other=0.0)
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


def tile_config(max_seqlen_q: int, group_p: int, num_splits: int = 1) -> tuple[int, int, int, int]:
    """(query rows a program, keys a loop step, warps, pipeline stages). Decode: one token's heads of a KV
    group per program, 128 keys a step (H200, batch 256: 2-2.5% faster than 64 at mean context 850-2,000,
    equal at 256); split contexts keep 64, so short splits do not round up to a mostly empty step."""
    if max_seqlen_q == 1:
        return max(16, group_p), 128 if num_splits == 1 else 64, 4, 3
    return max(64, group_p), 32, 4, 3  # best of 24 tiles for a 16k-token prefill on an H200 (186 TFLOP/s)


def _split_buffers(out: torch.Tensor, num_splits: int, dim_p: int):
    """(target, lse, split strides, token and head strides of target): unsplit programs write `out` itself,
    split ones float32 partials and log-sum-exps for `_merge`."""
    tokens, heads, _ = out.shape
    if num_splits == 1:
        return out, out, 0, 0, out.stride(0), out.stride(1)
    part = torch.empty((num_splits, tokens, heads, dim_p), dtype=torch.float32, device=out.device)
    lse = torch.empty((num_splits, tokens, heads), dtype=torch.float32, device=out.device)
    return part, lse, part.stride(0), lse.stride(0), part.stride(1), part.stride(2)


def _merge(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, num_splits: int) -> None:
    if num_splits > 1:
        tokens, heads, dim = out.shape
        _merge_splits_kernel[(tokens, heads)](part, lse, out, part.stride(0), lse.stride(0), part.stride(1),
                                              part.stride(2), out.stride(0), out.stride(1), heads,
                                              NUM_SPLITS=num_splits, HEAD_DIM=dim, HEAD_DIM_P=part.shape[-1])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_seqlen_q: int,
                    num_splits: int = 1, out: torch.Tensor | None = None,
                    tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """q: [tokens, heads, head_dim]; caches [num_blocks, block_size, kv_heads, head_dim]; block_tables int32
    [seqs, max_blocks]; cu_seqlens_q int32 [seqs + 1]; context_lens int32 [seqs]. `max_seqlen_q` bounds the
    grid (it is 1 for decode, so a CUDA graph can capture this call). `tiles` overrides `tile_config`
    (benchmarks tune with it)."""
    tokens, heads, dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    group_p = triton.next_power_of_2(group)
    num_seqs = context_lens.shape[0]
    block_m, block_n, warps, stages = tiles or tile_config(max_seqlen_q, group_p, num_splits)
    block_t = 1 if max_seqlen_q == 1 else block_m // group_p  # decode: one token, its group of heads
    num_tiles = -(-max_seqlen_q // block_t)
    out = torch.empty_like(q) if out is None else out
    dim_p = triton.next_power_of_2(dim)
    target, lse, stride_split_o, stride_split_l, t_stride, h_stride = _split_buffers(out, num_splits, dim_p)
    _paged_attention_kernel[(num_seqs, kv_heads, num_tiles * num_splits)](
        q, k_cache, v_cache, target, lse, cu_seqlens_q, context_lens, block_tables,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), t_stride, h_stride,
        block_tables.stride(0), stride_split_o, stride_split_l, heads, scale * 1.4426950408889634,
        GROUP=group, GROUP_P=group_p, HEAD_DIM=dim, HEAD_DIM_P=dim_p, BLOCK_SIZE=block_size, BLOCK_T=block_t,
        BLOCK_M=block_m, BLOCK_N=block_n, NUM_SPLITS=num_splits, num_warps=warps, num_stages=stages)
    _merge(target, lse, out, num_splits)
    return out


def decode_attention(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                     scale: float, num_splits: int = 1, q_weight: torch.Tensor | None = None,
                     k_weight: torch.Tensor | None = None, eps: float = 1e-6,
                     tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """A decode step's attention, row i being sequence i's one new token at `positions[i]` (= its context
    length - 1): q [seqs, heads, dim], k/v [seqs, kv_heads, dim] as the QKV projection gives them (strided,
    before norms and rotary). RMSNorms each head of q and k when weights are given (Qwen3), rotates them,
    writes k and v into slot `slot_mapping[i]` of the caches (-1: not kept) and attends q over the whole
    context, the new token included. Returns [seqs, heads, dim]."""
    seqs, heads, dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    block_m, block_n, warps, stages = tiles or tile_config(1, triton.next_power_of_2(group), num_splits)
    out = torch.empty((seqs, heads, dim), dtype=q.dtype, device=q.device)
    dim_p = triton.next_power_of_2(dim)
    target, lse, stride_split_o, stride_split_l, t_stride, h_stride = _split_buffers(out, num_splits, dim_p)
    has_norm = q_weight is not None
    _decode_kernel[(seqs, kv_heads, num_splits)](
        q, k, v, positions, cos_sin, q_weight if has_norm else q, k_weight if has_norm else k, slot_mapping,
        k_cache, v_cache, target, lse, context_lens, block_tables,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), t_stride, h_stride,
        block_tables.stride(0), stride_split_o, stride_split_l, heads, eps, scale * 1.4426950408889634,
        GROUP=group, HEAD_DIM=dim, HEAD_DIM_P=dim_p, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, HAS_NORM=has_norm, num_warps=warps, num_stages=stages)
    _merge(target, lse, out, num_splits)
    return out
