"""Offline throughput on Nano-vLLM's bench.py workload (DESIGN.md, Performance method).

256 sequences, prompts of randint(100, 1024) ids from randint(0, 10000), max_tokens randint(100, 1024),
temperature 0.6, ignore_eos, Qwen3-0.6B shape with random bf16 weights. Throughput = output tokens / time
of one generate after a warm-up. `--prefix-sharing` runs the prefix-sharing variant instead.
"""
import argparse
import json
import os
import sys
import time
from random import randint, seed

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import qwen3_0_6b_path  # noqa: E402

from nanoserve.engine_pod import LLM, SamplingParams  # noqa: E402


def nano_vllm_workload():
    seed(0)
    num_seqs, max_input_len, max_output_len = 256, 1024, 1024
    prompts = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_output_len))
              for _ in range(num_seqs)]
    return prompts, params


def prefix_sharing_workload():
    seed(1)
    prefix = [randint(0, 10000) for _ in range(1024)]
    prompts = [prefix + [randint(0, 10000) for _ in range(randint(100, 400))] for _ in range(256)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 300)) for _ in range(256)]
    return prompts, params


def profile_phases(llm) -> dict[str, float]:
    """Wrap the engine's per-step calls with host timers. GPU time shows up in "sample" (its .tolist() waits
    for the forward) and in "run" when the launch queue is full."""
    import nanoserve.engine_pod.llm_engine as engine_module
    totals: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    llm.scheduler.schedule = timed("schedule", llm.scheduler.schedule)
    llm.scheduler.postprocess = timed("postprocess", llm.scheduler.postprocess)
    llm.model_runner.call = timed("run", llm.model_runner.call)
    sampler = llm.sampler

    class TimedSampler:  # the engine also calls sampler.forget()
        __call__ = staticmethod(timed("sample", sampler.__call__))

        def __getattr__(self, name):
            return getattr(sampler, name)

    llm.sampler = TimedSampler()
    engine_module.prepare = timed("prepare", engine_module.prepare)
    return totals


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prefix-sharing", action="store_true")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--label", default="")
    ap.add_argument("--profile", action="store_true", help="split the wall time into host phases and GPU waits")
    args = ap.parse_args()
    path = qwen3_0_6b_path()
    t0 = time.perf_counter()
    llm = LLM(path, enforce_eager=args.enforce_eager, max_model_len=4096, kvcache_block_size=args.block_size,
              max_num_batched_tokens=args.max_num_batched_tokens, tensor_parallel_size=args.tp)
    load_s = time.perf_counter() - t0
    prompts, params = prefix_sharing_workload() if args.prefix_sharing else nano_vllm_workload()
    prompt_tokens, output_tokens = sum(map(len, prompts)), sum(p.max_tokens for p in params)
    if not args.prefix_sharing:
        assert (prompt_tokens, output_tokens) == (142_827, 133_966), (prompt_tokens, output_tokens)
    llm.generate(["Benchmark: "], SamplingParams())
    bm = llm.block_manager
    hits0, queries0 = bm.prefix_hits, bm.prefix_queries
    phases = profile_phases(llm) if args.profile else None
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    t = time.perf_counter() - t
    assert sum(len(o["token_ids"]) for o in outs) == output_tokens
    result = {
        "label": args.label or ("eager" if args.enforce_eager else "graphs"), "block_size": args.block_size,
        "tp": args.tp, "prefix_sharing": args.prefix_sharing, "seconds": round(t, 3),
        "output_tok_per_s": round(output_tokens / t), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "prefix_hit_rate": round((bm.prefix_hits - hits0) / max(1, bm.prefix_queries - queries0), 4),
        "load_s": round(load_s, 2), "graph_capture_s": round(llm.model_runner.graph_capture_s, 2), "kv_blocks": bm.num_blocks, "preemptions": llm.scheduler.num_preemptions,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "card": torch.cuda.get_device_name(),
    }
    if phases is not None:
        result["phases_s"] = {k: round(v, 3) for k, v in phases.items()}
    llm.exit()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
