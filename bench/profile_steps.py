"""Profile the throughput workload's steps with torch.profiler (host and device time per op): the first
steps (prefill batches of up to 16k tokens), 20 steady decode steps at batch 256, and 20 decode steps once
the batch has shrunk to 64 (the workload's tail). Per profile also the device time a step: the kernels'
sum against the wall time shows how much of a step is gaps between kernels."""

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from throughput import nano_vllm_workload  # noqa: E402

from common import qwen3_0_6b_path  # noqa: E402
from nanoserve.engine_pod import LLM, SamplingParams  # noqa: E402


def show(prof, title: str, steps: int = 0, wall_s: float = 0.0) -> None:
    print(f"==== {title}")
    if steps:
        kernels_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
        print(f"per step: wall {1e3 * wall_s / steps:.2f} ms, kernels {kernels_us / 1e3 / steps:.2f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))


llm = LLM(qwen3_0_6b_path(), max_model_len=4096, max_num_batched_tokens=16384)
llm.generate(["Benchmark: "], SamplingParams())  # the throughput benchmark's warm-up
prompts, params = nano_vllm_workload()
for p, sp in zip(prompts, params):
    llm.add_request(p, sp)
for i in range(3):  # unprofiled: first-call costs (compiles) show up here
    torch.cuda.synchronize()
    t = time.perf_counter()
    batch = llm.run_step().batch
    torch.cuda.synchronize()
    print(f"step {i}: {1e3 * (time.perf_counter() - t):.1f} ms, {sum(n for _, n in batch)} tokens")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        llm.step()
    torch.cuda.synchronize()
show(prof, "3 prefill steps")
for _ in range(40):  # past the prefills: a steady decode batch of 256
    llm.step()
torch.cuda.synchronize()
for title, ready in (
    ("20 decode steps at batch 256", lambda: True),
    ("20 decode steps at batch <= 64", lambda: len(llm.run_step().batch) <= 64),
):
    while not ready():
        llm.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(20):
            llm.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    show(prof, f"{title} (batch now {len(llm.scheduler.running)} running)", 20, wall)
