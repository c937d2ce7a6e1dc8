"""Decode GEMMs: are the four projections of a Qwen3-0.6B layer near their floor at the batch sizes
the CUDA graphs use? Times (graph replay, median) of cuBLAS (`F.linear`), cuBLASLt, and a Triton GEMM
candidate tuned per shape, against max(weight-read time, matrix-rate time). One JSON line per case.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
from common import copy_bandwidth  # noqa: E402

SHAPES = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}


def configs(m: int) -> list[dict]:
    """Tiles worth trying at M rows: BM the next power of two of M (at least 16, at most 128) or half of it."""
    top = min(128, max(16, triton.next_power_of_2(m)))
    out = []
    for bm in sorted({top, max(16, top // 2)}):
        for bn in (32, 64, 128):
            for bk in (64, 128):
                for split in (1, 2, 4):
                    out.append(
                        {
                            "BM": bm,
                            "BN": bn,
                            "BK": bk,
                            "SPLIT_K": split,
                            "num_warps": 4 if bm * bn <= 4096 else 8,
                            "num_stages": 4 if bk == 64 else 3,
                        }
                    )
    return out


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr
):
    # c[M, N] (+)= a[M, K] @ b[N, K]^T; split-K programs add fp32 partial sums atomically.
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    rm = (pid // num_n) * BM + tl.arange(0, BM)
    rn = (pid % num_n) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_per = tl.cdiv(K, SPLIT_K * BK) * BK
    k0 = pid_k * k_per
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(k0, tl.minimum(k0 + k_per, K), BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(b_ptr + rn[:, None] * K + (k + rk)[None, :], mask=rn[:, None] < N, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask)
    else:
        tl.atomic_add(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask, sem="relaxed")


def triton_linear(x: torch.Tensor, w: torch.Tensor, out32: torch.Tensor, cfg: dict) -> torch.Tensor:
    """fp32 out; with SPLIT_K > 1 it must start zeroed (a real layer would add a memset and a cast)."""
    M, K = x.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]), cfg["SPLIT_K"])
    matmul_kernel[grid](x, w, out32, M, N, K, **cfg)
    return out32


def graph_ms(fn, rep: int = 100) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def main() -> None:
    torch.manual_seed(0)
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(json.dumps({"card": props.name, "copy_tb_per_s": round(bw / 1e12, 3)}), flush=True)
    for name, (k, n) in SHAPES.items():
        copies = -(-160 * 2**20 // (n * k * 2))  # weights together well over L2, as in a real forward
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in (32, 128, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            out32 = torch.zeros(m, n, device="cuda", dtype=torch.float32)
            row = {
                "gemm": name,
                "M": m,
                "K": k,
                "N": n,
                "floor_us": round(1e6 * max(n * k * 2 / bw, 2 * m * n * k / 790e12), 2),
            }
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row[f"{lib}_us"] = round(1e3 * graph_ms(lambda x=x, ws=ws: [F.linear(x, w) for w in ws]) / copies, 2)
            torch.backends.cuda.preferred_blas_library("cublas")
            best = None
            for cfg in configs(m):
                out32.zero_()
                err = ((triton_linear(x, ws[0], out32, cfg) - ref).norm() / ref.norm()).item()
                us = (
                    1e3
                    * graph_ms(
                        lambda x=x, ws=ws, cfg=cfg, out32=out32: [triton_linear(x, w, out32, cfg) for w in ws], rep=20
                    )
                    / copies
                )
                if err < 1e-2 and (best is None or us < best[0]):
                    best = (us, cfg)
            row["triton_us"], row["triton_config"] = round(best[0], 2), best[1]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
