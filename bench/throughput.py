"""Offline throughput on Nano-vLLM's bench.py workload (docs/benchmarks.md).

256 sequences, prompts of randint(100, 1024) ids from randint(0, 10000), max_tokens randint(100, 1024),
temperature 0.6, ignore_eos, Qwen3-0.6B shape with random bf16 weights. Throughput = output tokens / time
of one generate after a warm-up. `--prefix-sharing` runs the prefix-sharing variant instead.

`--repetitive` is the speculative decoding workload: edit-style prompts (a passage of ids, an edited copy of it,
then its first half again: a model that copies continues with the rest) whose n-gram matches drafts can come
from; run it with and without `--speculative-config '{"method": "ngram", ...}'` for the speed-up (the result has
the acceptance counts). `--model smollm2-135m` (real weights: its induction heads copy repeated spans) gives a
meaningful acceptance rate; the random Qwen3-0.6B weights copy nothing. Under async scheduling only some steps
look for drafts (engine_pod/spec_decode.py LookPacing); verify steps stay in flight like decode steps.
"""

import argparse
import contextlib
import functools
import gc
import json
import os
import sys
import time
from random import randint, seed

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import qwen3_0_6b_path  # noqa: E402
from common import timed as timed_into
from nanoserve.common.gc_heap import freeze_heap  # noqa: E402
from nanoserve.engine_pod import LLM, SamplingParams  # noqa: E402
from nanoserve.engine_pod.spec_decode import SpecStats  # noqa: E402


def nano_vllm_workload():
    seed(0)
    num_seqs, max_input_len, max_output_len = 256, 1024, 1024
    prompts = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_output_len))
        for _ in range(num_seqs)
    ]
    return prompts, params


def prefix_sharing_workload():
    seed(1)
    prefix = [randint(0, 10000) for _ in range(1024)]
    prompts = [prefix + [randint(0, 10000) for _ in range(randint(100, 400))] for _ in range(256)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 300)) for _ in range(256)]
    return prompts, params


def repetitive_workload(temperature: float, num_seqs: int = 256):
    seed(2)
    prompts, params = [], []
    for _ in range(num_seqs):
        passage = [randint(0, 10000) for _ in range(randint(100, 400))]
        edited = list(passage)
        for _ in range(len(passage) // 50):  # a few ids changed: matches break and resume
            edited[randint(0, len(edited) - 1)] = randint(0, 10000)
        prompts.append(passage + edited + passage[: len(passage) // 2])
        params.append(SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=randint(100, 400)))
    return prompts, params


def profile_phases(llm) -> dict[str, float]:
    """Wrap the engine's per-step calls with host timers. GPU time shows up in "apply" (it waits for the
    sampled tokens) and in "run" when the launch queue is full."""
    import nanoserve.engine_pod.llm_engine as engine_module

    totals: dict[str, float] = {}
    timed = functools.partial(timed_into, totals)

    llm.scheduler.schedule = timed("schedule", llm.scheduler.schedule)
    llm.scheduler.advance = timed("advance", llm.scheduler.advance)
    llm.model_runner.call = timed("run", llm.model_runner.call)
    llm._apply = timed("apply", llm._apply)
    engine_module.sampling_inputs = timed("sampling_inputs", engine_module.sampling_inputs)
    engine_module.prepare = timed("prepare", engine_module.prepare)
    return totals


def record_steps(llm) -> list[tuple[float, int, int, int]]:
    """Per step: (wall seconds, sequences, tokens computed, KV tokens attended). Every step waits for
    sampled tokens (its own, or with async scheduling the previous step's), so in the steady state the
    wall time per step is the larger of the step's host and GPU time."""
    steps, step = [], llm.run_step

    def timed_step():
        t = time.perf_counter()
        batch, out = step()
        steps.append(
            (
                time.perf_counter() - t,
                len(batch),
                sum(n for _, n in batch),
                sum(s.num_computed_tokens for s, _ in batch),
            )
        )
        return out

    llm.step = timed_step
    return steps


def summarize_steps(steps, kv_bytes_per_token: int) -> dict:
    """Where the wall time goes: prefill-carrying steps vs pure decode steps by batch size, and the time the
    decode steps' KV reads alone would take at 4.2 TB/s (what attention cannot go below)."""
    out = {"steps": len(steps), "step_s_total": round(sum(s[0] for s in steps), 3)}
    mixed = [s for s in steps if s[2] > s[1]]
    out["prefill_steps"] = {
        "n": len(mixed),
        "s": round(sum(s[0] for s in mixed), 3),
        "tokens": sum(s[2] for s in mixed),
        "each_ms_seqs_tokens": [(round(1e3 * s[0], 1), s[1], s[2]) for s in mixed],
    }
    for lo, hi in [(1, 16), (17, 64), (65, 128), (129, 192), (193, 256)]:
        d = [s for s in steps if s[2] == s[1] and lo <= s[1] <= hi]
        if d:
            kv_s = sum(s[3] for s in d) * kv_bytes_per_token / 4.2e12
            out[f"decode_bs{lo}-{hi}"] = {
                "n": len(d),
                "s": round(sum(s[0] for s in d), 3),
                "ms_per_step": round(1e3 * sum(s[0] for s in d) / len(d), 2),
                "kv_read_floor_s": round(kv_s, 3),
            }
    return out


@contextlib.contextmanager
def gc_pauses():
    """The garbage collector's collections per generation and their time while the block runs."""
    out = {"collections": [0, 0, 0], "ms": 0.0, "max_ms": 0.0}
    began = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - began[0]) * 1000
        out["collections"][info["generation"]] += 1
        out["ms"] += ms
        out["max_ms"] = max(out["max_ms"], ms)

    gc.callbacks.append(callback)
    try:
        yield out
    finally:
        gc.callbacks.remove(callback)
        out["ms"], out["max_ms"] = round(out["ms"], 1), round(out["max_ms"], 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--sync", action="store_true", help="synchronous scheduling (no overlap of host and GPU)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prefix-sharing", action="store_true")
    ap.add_argument("--repetitive", action="store_true", help="edit-style prompts with repeated spans (spec decoding)")
    ap.add_argument("--temperature", type=float, default=0.0, help="the --repetitive workload's temperature")
    ap.add_argument("--num-prompts", type=int, default=256, help="the --repetitive workload's requests")
    ap.add_argument("--speculative-config", default=None, help="vLLM's JSON, e.g. the ngram method's")
    ap.add_argument("--model", default=None, help="a model folder or smollm2-135m (default: random Qwen3-0.6B)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, or fp8 (e4m3, scales 1.0)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--label", default="")
    ap.add_argument("--blas", choices=["cublas", "cublaslt"], help="torch's preferred BLAS library for the GEMMs")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() the heap once the engine is built (A/B)")
    ap.add_argument("--profile", action="store_true", help="split the wall time into host phases and GPU waits")
    args = ap.parse_args()
    path = args.model or qwen3_0_6b_path()
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    t0 = time.perf_counter()
    llm = LLM(
        path,
        enforce_eager=args.enforce_eager,
        max_model_len=4096,
        kvcache_block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tp,
        async_scheduling=not args.sync,
        speculative_config=args.speculative_config,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    load_s = time.perf_counter() - t0
    if args.repetitive:
        prompts, params = repetitive_workload(args.temperature, args.num_prompts)
    else:
        prompts, params = prefix_sharing_workload() if args.prefix_sharing else nano_vllm_workload()
    prompt_tokens, output_tokens = sum(map(len, prompts)), sum(p.max_tokens for p in params)
    if not args.prefix_sharing and not args.repetitive:
        assert (prompt_tokens, output_tokens) == (142_827, 133_966), (prompt_tokens, output_tokens)
    llm.generate(["Benchmark: "], SamplingParams())
    if args.gc_freeze:
        freeze_heap()
    bm = llm.block_manager
    hits0, queries0 = bm.prefix_hits, bm.prefix_queries
    llm.spec_stats = SpecStats()  # the measured run's alone
    phases = profile_phases(llm) if args.profile else None
    steps = record_steps(llm) if args.profile else None
    torch.cuda.synchronize()
    t = time.perf_counter()
    with gc_pauses() as pauses:
        outs = llm.generate(prompts, params)
        torch.cuda.synchronize()
    t = time.perf_counter() - t
    assert sum(len(o["token_ids"]) for o in outs) == output_tokens
    result = {
        "label": args.label or ("eager" if args.enforce_eager else "graphs"),
        "block_size": args.block_size,
        "tp": args.tp,
        "blas": args.blas or "default",
        "async_scheduling": llm.config.async_scheduling,
        "prefix_sharing": args.prefix_sharing,
        "workload": "repetitive" if args.repetitive else "prefix_sharing" if args.prefix_sharing else "nano_vllm",
        "num_prompts": len(prompts),
        "speculative_config": args.speculative_config,
        "kv_cache_dtype": args.kv_cache_dtype,
        "seconds": round(t, 3),
        "output_tok_per_s": round(output_tokens / t),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "prefix_hit_rate": round((bm.prefix_hits - hits0) / max(1, bm.prefix_queries - queries0), 4),
        "load_s": round(load_s, 2),
        "graph_capture_s": round(llm.model_runner.graph_capture_s, 2),
        "kv_blocks": bm.num_blocks,
        "preemptions": llm.scheduler.num_preemptions,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "card": torch.cuda.get_device_name(),
        "gc_freeze": args.gc_freeze,
        "gc": pauses,  # the garbage collector's pauses in the measured run
        "gc_tracked_objects": len(gc.get_objects()),
    }
    if llm.config.speculative is not None:
        spec = llm.spec_stats
        result["spec_decode"] = {
            "num_drafts": spec.num_drafts,
            "num_draft_tokens": spec.num_draft_tokens,
            "num_accepted_tokens": spec.num_accepted_tokens,
            "acceptance_rate": round(spec.acceptance_rate, 4),
            "mean_acceptance_length": round(spec.mean_acceptance_length, 3),
            "accepted_per_pos": spec.accepted_per_pos,
        }
    if phases is not None:
        result["phases_s"] = {k: round(v, 3) for k, v in phases.items()}
        a = llm.model_runner.attention_layers[0]
        width = llm.model_runner.kv_cache.element_size()  # 1 for an fp8 cache
        kv_bytes = 2 * len(llm.model_runner.attention_layers) * a.num_kv_heads * a.head_dim * width
        result["steps"] = summarize_steps(steps, kv_bytes * args.tp)
    llm.exit()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
