"""Profile a few decode steps of the throughput workload with torch.profiler (host and device time per op)."""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from common import qwen3_0_6b_path  # noqa: E402
from throughput import nano_vllm_workload  # noqa: E402

from nanoserve.engine_pod import LLM  # noqa: E402

llm = LLM(qwen3_0_6b_path(), max_model_len=4096, max_num_batched_tokens=16384)
prompts, params = nano_vllm_workload()
for p, sp in zip(prompts, params):
    llm.add_request(p, sp)
for _ in range(40):  # past the prefills: a steady decode batch of 256
    llm.step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(20):
        llm.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
