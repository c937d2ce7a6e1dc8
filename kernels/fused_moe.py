# pyright: reportArgumentType=false, reportCallIssue=false
# (Triton's launch: `kernel[grid](...)` takes plain ints for constexpr parameters, and num_warps)
"""Fused mixture-of-experts: every token's top-k experts as two grouped GEMMs, in the manner of vLLM's
fused_moe.

1. `align_to_blocks` sorts the (token, slot) pairs by expert and pads each expert's run to a multiple of
   BLOCK_M, so that every block of BLOCK_M rows belongs to one expert (torch ops, no host sync: the step
   stays inside a CUDA graph).
2. `_grouped_gemm_kernel` multiplies each block of rows by its expert's weight: first x @ w13 (the rows are
   tokens, each read once per slot), then, after SiLU(gate) * up (or gpt-oss's clamped SwiGLU), @ w2 with
   the routing weight applied; each expert's bias (gpt-oss) is added in the GEMM's epilogue.
3. The k slots of each token are summed.
Reference: engine_pod/layers/fused_moe.py's `fused_experts_ref`.
"""

import torch
import triton
import triton.language as tl

from nanoserve.kernels.elementwise import silu_and_mul


def align_to_blocks(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (sorted_pair_ids, block_experts, num_padded): the pair ids (token * k + slot) grouped by
    expert, each group padded with the id num_pairs (a row that is neither read nor written) to a multiple
    of block_m; the expert of each block; and the padded length in use (a 1-element tensor: blocks past it
    are skipped). Sizes depend only on the shapes, so the result is the same in a graph replay."""
    flat = topk_ids.flatten().long()
    num_pairs, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # not bincount: that syncs to size its output
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # pair ids sorted by expert
    expert = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[expert]
    # At most min(E, pairs) experts get pairs, each padded by fewer than block_m rows.
    num_blocks = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)
    sorted_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, (padded_end - padded)[expert] + rank_in_expert, order.int())
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_experts.int(), padded_end[-1:]


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    weights_ptr,
    sorted_ids_ptr,
    block_experts_ptr,
    num_padded_ptr,
    N,
    K,
    num_pairs,
    stride_am,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_bias_e,
    A_ROWS_PER_PAIR_DIV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """c[pair, :N] = (a[pair // A_ROWS_PER_PAIR_DIV, :K] @ b[expert].T + bias[expert] if HAS_BIAS) (times
    weights[pair] if MUL_WEIGHT), for the BLOCK_M pairs of this program's block, all of one expert."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // A_ROWS_PER_PAIR_DIV).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def _block_config(num_tokens: int, num_experts: int) -> dict:
    # vLLM's untuned defaults: small blocks of rows while few tokens reach each expert.
    if num_tokens <= num_experts:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4)


def _grouped_gemm(a, b, bias, c, weights, sorted_ids, block_experts, num_padded, rows_div, mul_weight, cfg) -> None:
    num_n = triton.cdiv(b.shape[1], cfg["BLOCK_N"])
    grid = (triton.cdiv(sorted_ids.numel(), cfg["BLOCK_M"]) * num_n,)
    _grouped_gemm_kernel[grid](
        a,
        b,
        c,
        b if bias is None else bias,  # (not read without a bias)
        weights,
        sorted_ids,
        block_experts,
        num_padded,
        b.shape[1],
        b.shape[2],
        c.shape[0],
        a.stride(0),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        c.stride(0),
        0 if bias is None else bias.stride(0),
        A_ROWS_PER_PAIR_DIV=rows_div,
        HAS_BIAS=bias is not None,
        MUL_WEIGHT=mul_weight,
        **cfg,
    )


@triton.jit
def _clamped_swiglu_kernel(x_ptr, out_ptr, stride_xt, n, alpha, limit, BLOCK: tl.constexpr):
    t, b = tl.program_id(0), tl.program_id(1)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + n + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    y = (up + 1.0) * gate / (1.0 + tl.exp(-alpha * gate))
    tl.store(out_ptr + t * n + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def clamped_swiglu(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """x: [tokens, 2n] (gate | up) -> gpt-oss's (up + 1) * g * sigmoid(alpha g), g and up clamped: [tokens, n].
    Reference: engine_pod/layers/fused_moe.py's `clamped_swiglu`."""
    tokens, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    _clamped_swiglu_kernel[(tokens, triton.cdiv(n, block))](x, out, x.stride(0), n, alpha, limit, BLOCK=block)
    return out


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    swiglu: tuple[float, float] | None = None,
    block_config: dict | None = None,
) -> torch.Tensor:
    """x: [M, H]; w13: [E, 2I, H] (gate | up); w2: [E, H, I]; topk_weights (float32) and topk_ids: [M, k];
    optional biases w13_bias [E, 2I], w2_bias [E, H]; `swiglu` (alpha, limit): gpt-oss's clamped SwiGLU
    instead of SiLU(gate) * up. Returns sum_k weight_k * expert_k(x): [M, H], in x's dtype. `block_config`
    overrides the tile sizes."""
    num_tokens, hidden = x.shape
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    cfg = block_config or _block_config(num_tokens, num_experts)
    sorted_ids, block_experts, num_padded = align_to_blocks(topk_ids, num_experts, cfg["BLOCK_M"])
    num_pairs, weights = num_tokens * top_k, topk_weights.float().contiguous().view(-1)
    x = x.contiguous()
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, w13_bias, gate_up, weights, sorted_ids, block_experts, num_padded, top_k, False, cfg)
    act = silu_and_mul(gate_up) if swiglu is None else clamped_swiglu(gate_up, *swiglu)  # [pairs, I]
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, w2_bias, out, weights, sorted_ids, block_experts, num_padded, 1, True, cfg)
    return out.view(num_tokens, top_k, hidden).sum(1)
