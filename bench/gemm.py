"""Decode GEMMs: the four projections of a Qwen3-0.6B layer at the batch sizes the CUDA graphs use, each
as a chain of 28 launches with different weights (one per layer, together well over L2) captured in one
CUDA graph, as in a decode step. Per launch (median graph replay / 28): cuBLAS (`F.linear`), the engine's
Triton GEMM (kernels/gemm.py) without and with programmatic dependent launch, and the best of a tile sweep
with it; against the weight-read time at copy bandwidth. One JSON line per case; `--sweep` adds the sweep.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
from common import copy_bandwidth  # noqa: E402

from nanoserve.kernels.gemm import linear, tile_config  # noqa: E402

SHAPES = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}
LAYERS = 28


def sweep(m: int):
    p2 = max(16, 1 << (m - 1).bit_length())
    for bm in sorted({min(64, p2), min(128, p2)}):
        for bn in (16, 32, 64, 128):
            for bk in (128, 256):
                for stages in (3, 4):
                    yield bm, bn, bk, 8 if bm * bn >= 8192 else 4, stages


def chain_us(fn, ws, rep: int = 100) -> float:
    graph = torch.cuda.CUDAGraph()
    fn(ws[0])
    with torch.cuda.graph(graph):
        for w in ws:
            fn(w)
    ms = triton.testing.do_bench(graph.replay, warmup=min(20, rep), rep=rep, return_mode="median")
    return round(1e3 * ms / len(ws), 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--rows", default="1,16,64,128,256")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(json.dumps({"card": props.name, "copy_tb_per_s": round(bw / 1e12, 3)}), flush=True)
    for name, (k, n) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), ws[0].float())
            row = {"gemm": name, "M": m, "K": k, "N": n, "floor_us": round(1e6 * n * k * 2 / bw, 2),
                   "tiles": tile_config(m, n, k, props.multi_processor_count),
                   "cublas_us": chain_us(lambda w: F.linear(x, w), ws),
                   "triton_us": chain_us(lambda w: linear(x, w, pdl=False), ws),
                   "triton_pdl_us": chain_us(lambda w: linear(x, w, pdl=True), ws)}
            row["err"] = round(((linear(x, ws[0]).float() - ref).norm() / ref.norm()).item(), 5)
            if args.sweep:
                best = None
                for tiles in sweep(m):
                    try:
                        us = chain_us(lambda w: linear(x, w, tiles=tiles, pdl=True), ws, rep=30)
                    except Exception as e:  # a tile that does not fit in shared memory
                        print(json.dumps({"skip": tiles, "why": type(e).__name__}), flush=True)
                        continue
                    if best is None or us < best[0]:
                        best = (us, tiles)
                row["best_pdl_us"], row["best_tiles"] = best
                row["best_tiles_no_pdl_us"] = chain_us(lambda w: linear(x, w, tiles=best[1], pdl=False), ws)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
