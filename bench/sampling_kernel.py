"""Sampling kernel micro-benchmark: time of one `sample` call (graph replay, median) at batch 1 / 64 / 256
over Qwen3's 151,936-token vocabulary in bf16, half the rows greedy at batch 64, against the time to
read the logits once at the card's copy bandwidth."""

import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
from common import copy_bandwidth  # noqa: E402
from nanoserve.kernels.sampling import sample  # noqa: E402

VOCAB = 151_936


def main() -> None:
    bw = copy_bandwidth()
    for rows in (1, 64, 256):
        logits = torch.randn(rows, VOCAB, device="cuda", dtype=torch.bfloat16)
        temps = torch.full((rows,), 0.6, device="cuda", dtype=torch.float64)
        if rows == 64:
            temps[::2] = 0
        seeds = torch.arange(rows, device="cuda")
        ms = triton.testing.do_bench_cudagraph(
            lambda logits=logits, temps=temps, seeds=seeds: sample(logits, temps, seeds), rep=100, return_mode="median"
        )
        floor_us = logits.numel() * 2 / bw * 1e6
        print(
            "RESULT "
            + json.dumps(
                {
                    "case": "sampling",
                    "rows": rows,
                    "us": round(ms * 1e3, 1),
                    "read_floor_us": round(floor_us, 1),
                    "card": torch.cuda.get_device_name(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
