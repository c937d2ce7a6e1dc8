"""Triton GEMM for decode-sized batches: y = x @ w.T (+ bias), x [M, K] with M up to a few hundred rows.

At decode batch sizes a projection is a weight read (1-13 MB for Qwen3-0.6B) that cuBLAS finishes in 5-8 us
against 1-3 us of bandwidth: most of it is the latency of starting a kernel and of its first loads. With
programmatic dependent launch (kernels/pdl.py) this kernel starts while the one before it still runs,
prefetches its slice of the weights into L2 (weights never change while serving), and only then waits for
its input. Reference: `torch.nn.functional.linear`.
"""
import torch
import triton
import triton.language as tl

from nanoserve.kernels.pdl import use_pdl

MAX_ROWS = 256  # above this (prefill), cuBLAS
ENABLED = True  # benchmarks switch it off to compare with cuBLAS


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


# M changes with every batch size: specializing on it (== 1, % 16) would compile variants while serving.
@triton.jit(do_not_specialize=["M"])
def _linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = rn < N
    w_rows = w_ptr + tl.where(n_ok, rn, 0).to(tl.int64)[:, None] * K  # rows past N re-read row 0: no masks
    rk = tl.arange(0, BK)
    if PDL:
        if tl.program_id(1) == 0:  # the programs of other row tiles read the same columns
            lines = tl.arange(0, BK // 64)[None, :] * 64  # one prefetch per 128-byte line
            for k in range(0, K, BK):
                _prefetch_l2(w_rows + k + lines)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    m_ok = rm < M
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(x_rows + k + rk[None, :], mask=m_ok[:, None], other=0.0)
        b = tl.load(w_rows + k + rk[None, :])
        acc = tl.dot(a, tl.trans(b), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def tile_config(m: int, n: int, k: int, num_sms: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages): rows a program as few as the batch needs, then the widest column tile
    that still gives every multiprocessor a program (a weight read needs all of them pulling)."""
    bm = min(64, max(16, triton.next_power_of_2(m)))
    programs_m = -(-m // bm)
    bn = next((b for b in (128, 64, 32) if -(-n // b) * programs_m >= num_sms), 16)
    bk = 128 if k % 128 == 0 else 64
    return bm, bn, bk, 4, 4


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes this kernel takes: a decode-sized CUDA batch, K a multiple of 64, Hopper's dependent launch."""
    return (ENABLED and x.dim() == 2 and x.shape[0] <= MAX_ROWS and weight.shape[1] % 64 == 0 and use_pdl(x)
            and x.dtype == weight.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tiles: tuple[int, int, int, int, int] | None = None, pdl: bool | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias [N]) -> [M, N] in x's dtype. `tiles` overrides `tile_config`
    and `pdl` the dependent launch (benchmarks)."""
    m, k = x.shape
    n = weight.shape[0]
    assert k % 64 == 0 and weight.is_contiguous(), "K must be a multiple of 64, the weight contiguous"
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    pdl = use_pdl(x) if pdl is None else pdl
    bm, bn, bk, warps, stages = tiles or tile_config(m, n, k, _num_sms(x.device))
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _linear_kernel[grid](x, weight, bias if bias is not None else weight, y, m, n, k, HAS_BIAS=bias is not None,
                         BM=bm, BN=bn, BK=bk, PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl)
    return y


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 1
    return _SMS[device]
