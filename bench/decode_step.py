"""One decode step's CUDA graph, replayed alone, for each way of launching its kernels: cuBLAS GEMMs
and plain launches (the engine before dependent launch), dependent launch of the Triton kernels with
cuBLAS GEMMs, and dependent launch with the Triton GEMM (the default on Hopper). The graphs are recaptured
per variant on one loaded model; batch 16-256 at contexts of 400-1,200 tokens (random KV). Prints the median
time a step (ms) and each variant's output error against the first."""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import qwen3_0_6b_path  # noqa: E402

from nanoserve.engine_pod import LLM  # noqa: E402
from nanoserve.kernels import gemm, pdl  # noqa: E402

VARIANTS = {"plain+cublas": (False, False), "pdl+cublas": (True, False), "pdl+triton_gemm": (True, True),
            "plain+cublas again": (False, False)}
BATCHES = (16, 64, 128, 256)


def replay_ms(graph, reps: int = 40) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    llm = LLM(qwen3_0_6b_path(), max_model_len=4096, max_num_batched_tokens=16384)
    runner = llm.model_runner
    block = runner.config.kvcache_block_size
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(400, 1201, (max(BATCHES),), generator=gen)
    blocks_per_seq = -(-ctx // block)
    used = int(blocks_per_seq.sum())
    runner.kv_cache[:, :, :used].normal_()
    starts = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq
    print(json.dumps({"card": torch.cuda.get_device_name(), "kv_blocks_used": used}), flush=True)
    first: dict[int, torch.Tensor] = {}
    for name, (use_pdl, triton_gemm) in VARIANTS.items():
        pdl.ENABLED, gemm.ENABLED = use_pdl, triton_gemm
        runner.graphs = None
        torch.cuda.empty_cache()
        runner._capture_graphs()
        g = runner.graphs
        row = {"variant": name, "capture_s": round(runner.graph_capture_s, 2)}
        for bs in BATCHES:
            g.input_ids[:bs] = torch.arange(bs) * 37 % 10000
            g.positions[:bs] = ctx[:bs] - 1
            g.slot_mapping[:bs] = -1  # nothing stored: every replay reads the same cache
            g.context_lens[:bs] = ctx[:bs].to(torch.int32)
            for i in range(bs):
                g.block_tables[i, :blocks_per_seq[i]] = torch.arange(starts[i], starts[i] + blocks_per_seq[i])
            size = next(s for s in g.sizes if s >= bs)
            row[f"bs{bs}_ms"] = round(replay_ms(g.graphs[size]), 4)
            out = g.hidden[:bs].float().clone()
            if bs not in first:
                first[bs] = out
            row[f"bs{bs}_err"] = round(((out - first[bs]).norm() / first[bs].norm()).item(), 5)
        print(json.dumps(row), flush=True)
    llm.exit()


if __name__ == "__main__":
    main()
