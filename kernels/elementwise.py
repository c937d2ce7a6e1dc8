"""Triton kernels for the small per-layer operations, each one launch instead of the many tiny kernels
eager PyTorch runs (at decode batch sizes those launches cost more than the math):
RMSNorm (optionally fused with the residual add), rotary embedding of q and k, and SiLU(gate) * up.
References: the plain-PyTorch functions in engine_pod/layers (layernorm, rotary, activation).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_xt, stride_xh, stride_rt, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + offs, mask=mask, other=0.0).to(tl.float32)
    row = (t * tl.num_programs(1) + h) * n
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + t * stride_rt + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row + offs, x.to(res_out_ptr.dtype.element_ty), mask=mask)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row + offs, y.to(w.dtype) * w, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: [tokens, n] or [tokens, heads, n] (last dim contiguous). With `residual` ([tokens, n]):
    returns (norm(x + residual), x + residual)."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    tokens, heads, n = x3.shape
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(residual) if residual is not None else out
    _rms_norm_kernel[(tokens, heads)](x3, residual if residual is not None else x3, weight, out, res_out,
                                      x3.stride(0), x3.stride(1), residual.stride(0) if residual is not None else 0,
                                      n, eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_sin_ptr, q_out_ptr, k_out_ptr, stride_qt, stride_qh, stride_kt,
                   stride_kh, num_q_heads, num_kv_heads, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_sin_ptr + pos * 2 * HALF + offs, mask=mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * 2 * HALF + HALF + offs, mask=mask, other=0.0)
    if h < num_q_heads:
        src = q_ptr + t * stride_qt + h * stride_qh
        dst = q_out_ptr + (t * num_q_heads + h) * 2 * HALF
    else:
        src = k_ptr + t * stride_kt + (h - num_q_heads) * stride_kh
        dst = k_out_ptr + (t * num_kv_heads + h - num_q_heads) * 2 * HALF
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + offs, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + offs, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    """q: [tokens, heads, dim], k: [tokens, kv_heads, dim] (last dim contiguous); cos_sin: [max_pos, dim]
    float32 (cos | sin). Returns new contiguous rotated q and k."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty(
        k.shape, dtype=k.dtype, device=k.device)
    _rotary_kernel[(tokens, heads + kv_heads)](q, k, positions, cos_sin, q_out, k_out, q.stride(0), q.stride(1),
                                               k.stride(0), k.stride(1), heads, kv_heads, HALF=dim // 2,
                                               BLOCK=triton.next_power_of_2(dim // 2))
    return q_out, k_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, n, BLOCK: tl.constexpr):
    t, b = tl.program_id(0), tl.program_id(1)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + n + offs, mask=mask, other=0.0)
    y = (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up
    tl.store(out_ptr + t * n + offs, y, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [tokens, 2n] (gate | up) -> silu(gate) * up: [tokens, n]."""
    tokens, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(tokens, triton.cdiv(n, block))](x, out, x.stride(0), n, BLOCK=block)
    return out
