# pyright: reportArgumentType=false, reportCallIssue=false
# (Triton's launch: `kernel[grid](...)` takes plain ints for constexpr parameters, and num_warps)
"""Triton kernels for the small per-layer operations, each one launch instead of the many tiny kernels
eager PyTorch runs (at decode batch sizes those launches cost more than the math):
RMSNorm (optionally fused with the residual add), rotary embedding of q and k (with Qwen3's per-head
q/k RMSNorm, and optionally the KV-cache store, fused in), and SiLU(gate) * up (or GELU-tanh(gate) * up:
Gemma). The norms scale in their weight's dtype, then cast: a float32 weight is Gemma's folded 1 + w.
References: the plain-PyTorch functions in engine_pod/layers (layernorm, rotary, activation).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_xt,
    stride_xh,
    stride_rt,
    n,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, h = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + offs, mask=mask, other=0.0).to(tl.float32)
    row = (t * tl.num_programs(1) + h) * n
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + t * stride_rt + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row + offs, x.to(res_out_ptr.dtype.element_ty), mask=mask)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)  # scaled in w's dtype: a float32 w is Gemma's (1 + w)
    tl.store(out_ptr + row + offs, (y.to(w.dtype) * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: [tokens, n] or [tokens, heads, n] (last dim contiguous). With `residual` ([tokens, n]):
    returns (norm(x + residual), x + residual)."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    tokens, heads, n = x3.shape
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(residual) if residual is not None else out
    _rms_norm_kernel[(tokens, heads)](
        x3,
        residual if residual is not None else x3,
        weight,
        out,
        res_out,
        x3.stride(0),
        x3.stride(1),
        residual.stride(0) if residual is not None else 0,
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(n),
    )
    out = out.view(x.shape)
    return out if residual is None else (out, res_out)


@triton.jit
def _norm_rotate_heads(
    src_ptr,
    dst_ptr,
    w_ptr,
    stride_h,
    cos,
    sin,
    eps,
    NUM: tl.constexpr,
    NUM_P: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    HAS_NORM: tl.constexpr,
    inv_scale,
    FP8: tl.constexpr,
):
    """One token's heads [NUM, 2 * HALF] from src (strided heads) to dst (contiguous): optional RMSNorm
    per head, then neox-style rotation; into an fp8 cache (FP8) divided by its scale and saturated."""
    h = tl.arange(0, NUM_P)[:, None]
    d = tl.arange(0, HALF_P)[None, :]
    mask = (h < NUM) & (d < HALF)
    x1 = tl.load(src_ptr + h * stride_h + d, mask=mask, other=0.0)
    x2 = tl.load(src_ptr + h * stride_h + HALF + d, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:  # rounded like the reference: normalize in float32, scale in the weight's dtype, cast
        r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0)
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0)
        x1 = ((x1 * r).to(w1.dtype) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * r).to(w2.dtype) * w2).to(dtype).to(tl.float32)
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if FP8:  # (NaN to 0, as v)
        y1, y2 = y1.to(dtype).to(tl.float32) * inv_scale, y2.to(dtype).to(tl.float32) * inv_scale
        y1 = tl.clamp(tl.where(y1 == y1, y1, 0.0), -448.0, 448.0)
        y2 = tl.clamp(tl.where(y2 == y2, y2, 0.0), -448.0, 448.0)
        dtype = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + h * 2 * HALF + d, y1.to(dtype), mask=mask)
    tl.store(dst_ptr + h * 2 * HALF + HALF + d, y2.to(dtype), mask=mask)


@triton.jit
def _qk_norm_rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_sin_ptr,
    q_w_ptr,
    k_w_ptr,
    q_out_ptr,
    k_out_ptr,
    v_out_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    block_size,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_cd,
    eps,
    k_inv_scale,
    v_inv_scale,
    NUM_Q: tl.constexpr,
    NUM_Q_P: tl.constexpr,
    NUM_KV: tl.constexpr,
    NUM_KV_P: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    HAS_NORM: tl.constexpr,
    STORE: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF_P)[None, :]
    cos = tl.load(cos_sin_ptr + pos * 2 * HALF + d, mask=d < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * 2 * HALF + HALF + d, mask=d < HALF, other=0.0)
    _norm_rotate_heads(
        q_ptr + t * stride_qt,
        q_out_ptr + t * NUM_Q * 2 * HALF,
        q_w_ptr,
        stride_qh,
        cos,
        sin,
        eps,
        NUM_Q,
        NUM_Q_P,
        HALF,
        HALF_P,
        HAS_NORM,
        1.0,
        False,
    )
    width = NUM_KV * 2 * HALF
    if STORE:  # k and v go straight to the token's paged-cache slot (-1: nothing to keep)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            _norm_rotate_heads(
                k_ptr + t * stride_kt,
                k_out_ptr + slot * width,
                k_w_ptr,
                stride_kh,
                cos,
                sin,
                eps,
                NUM_KV,
                NUM_KV_P,
                HALF,
                HALF_P,
                HAS_NORM,
                k_inv_scale,
                FP8,
            )
            h = tl.arange(0, NUM_KV_P)[:, None]
            c = tl.arange(0, 2 * HALF_P)[None, :]
            mask = (h < NUM_KV) & (c < 2 * HALF)
            v = tl.load(v_ptr + t * stride_vt + h * stride_vh + c, mask=mask)
            if FP8:  # a NaN would stay in the slot after its request, where another's masked reads meet it: 0
                v = v.to(tl.float32) * v_inv_scale
                v = tl.clamp(tl.where(v == v, v, 0.0), -448.0, 448.0).to(v_out_ptr.dtype.element_ty)
            v_slot = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs  # v's cache: any strides
            tl.store(v_out_ptr + v_slot + h * stride_ch + c * stride_cd, v, mask=mask)
    else:
        _norm_rotate_heads(
            k_ptr + t * stride_kt,
            k_out_ptr + t * width,
            k_w_ptr,
            stride_kh,
            cos,
            sin,
            eps,
            NUM_KV,
            NUM_KV_P,
            HALF,
            HALF_P,
            HAS_NORM,
            1.0,
            False,
        )


def _qk_norm_rotary(positions, q, k, cos_sin, q_weight, k_weight, eps, k_out, store=None, kv_scales=(1.0, 1.0)):
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    q_out = torch.empty((tokens, heads, dim), dtype=q.dtype, device=q.device)
    v, v_out, slots = store or (k, k_out, positions)
    fp8 = k_out.dtype == torch.float8_e4m3fn
    has_norm = q_weight is not None
    p2 = triton.next_power_of_2
    _qk_norm_rotary_kernel[(tokens,)](
        q,
        k,
        v,
        positions,
        cos_sin,
        q_weight if has_norm else q,
        k_weight if has_norm else k,
        q_out,
        k_out,
        v_out,
        slots,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        v_out.shape[1] if store else 1,
        *(v_out.stride() if store else (0, 0, 0, 0)),
        eps,
        1.0 / kv_scales[0],
        1.0 / kv_scales[1],
        NUM_Q=heads,
        NUM_Q_P=p2(heads),
        NUM_KV=kv_heads,
        NUM_KV_P=p2(kv_heads),
        HALF=dim // 2,
        HALF_P=p2(dim // 2),
        HAS_NORM=has_norm,
        STORE=store is not None,
        FP8=fp8,
        num_warps=4,
    )
    return q_out


def qk_norm_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
):
    """q: [tokens, heads, dim], k: [tokens, kv_heads, dim] (last dim contiguous); cos_sin: [max_pos, dim]
    float32 (cos | sin). With weights, RMSNorm each head first (Qwen3's q/k norm). One program per token
    does all of it; returns new contiguous q and k."""
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    return _qk_norm_rotary(positions, q, k, cos_sin, q_weight, k_weight, eps, k_out), k_out


def qk_norm_rotary_store(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    kv_scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """`qk_norm_rotary`, and the KV-cache store in the same kernel: each token's rotated k and its v are
    written to its slot of the paged caches ([num_blocks, block_size, kv_heads, dim]; k's contiguous, v's
    any strides, e.g. keys-last; slot -1: skipped). An fp8 cache (float8_e4m3fn) gets them divided by
    `kv_scales` (k, v), saturated, NaN as 0 (the rotated k rounded to the model dtype first, as the
    reference). Returns the new q; k goes nowhere else."""
    assert k_cache.is_contiguous() and v.stride(-1) == 1
    store = (v, v_cache, slot_mapping)
    return _qk_norm_rotary(positions, q, k, cos_sin, q_weight, k_weight, eps, k_cache, store, kv_scales)


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, stride_xt, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
    t, b = tl.program_id(0), tl.program_id(1)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + n + offs, mask=mask, other=0.0)
    if GELU:  # tanh approximation: 0.5 (1 + tanh(z)) = sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3)
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate / (1.0 + tl.exp(-2.0 * z))
    else:
        act = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + t * n + offs, act.to(up.dtype) * up, mask=mask)


def _act_and_mul(x: torch.Tensor, gelu: bool) -> torch.Tensor:
    tokens, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    _act_and_mul_kernel[(tokens, triton.cdiv(n, block))](x, out, x.stride(0), n, BLOCK=block, GELU=gelu)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [tokens, 2n] (gate | up) -> silu(gate) * up: [tokens, n]."""
    return _act_and_mul(x, False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [tokens, 2n] (gate | up) -> gelu_tanh(gate) * up: [tokens, n] (Gemma's GeGLU)."""
    return _act_and_mul(x, True)
