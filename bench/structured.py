"""Structured output's cost: constrained vs unconstrained throughput at batch 1, 64 and 256 (GPU), and the
per-row cost of a step's mask on the host (fill, by one loop or xgrammar's thread pool) and on the device (apply).

The model is Qwen3-0.6B's shape with random bf16 weights and a real 49,152-token byte-level BPE vocabulary
(SmolLM2's tokenizer: `--tokenizer`, by default `.bench_tokenizer/` or the embedded default model), so the
grammar masks are as costly as a real model's. Every request writes 256 tokens: random weights never close
the schema's free strings, so constrained and unconstrained requests do the same work.
`--mask-only`: the host and device mask costs alone (runs on CPU too).
"""

import argparse
import functools
import json
import os
import shutil
import sys
import time
from random import Random

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import QWEN3_0_6B  # noqa: E402
from common import timed as timed_into
from nanoserve.engine_pod import LLM, SamplingParams  # noqa: E402
from nanoserve.engine_pod.structured_params import StructuredOutputsParams  # noqa: E402

TYPICAL = {
    "type": "object",
    "properties": {  # a typical extraction schema
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
}
OUTPUT_LEN = 256


def tokenizer_folder(arg: str | None) -> str:
    if arg:
        return arg
    here = os.path.join(os.path.dirname(__file__), "..", ".bench_tokenizer")
    if os.path.isdir(here):
        return here
    from nanoserve.engine_pod.default_model import resolve_model

    return resolve_model("smollm2-135m")


def model_folder(tokenizer: str, folder: str = "/tmp/nanoserve-bench/qwen3-0.6b-bpe49k") -> str:
    from transformers import AutoTokenizer

    from nanoserve.engine_pod.random_model import save_random_model

    if not os.path.isfile(os.path.join(folder, "config.json")):
        tok = AutoTokenizer.from_pretrained(tokenizer)
        config = {
            **QWEN3_0_6B,
            "vocab_size": 49152,
            "initializer_range": 0.02,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": None,
        }
        save_random_model(
            folder, config, seed=0, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu"
        )
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the real vocabulary over the placeholder one
            shutil.copy(os.path.join(tokenizer, name), folder)
    return folder


def throughput(llm: LLM, batch: int, constrained: bool, run: int) -> float:
    rng = Random(batch * 10 + run)  # other prompts every run: no prefix-cache hit from an earlier one
    prompts = [[rng.randint(0, 40000) for _ in range(rng.randint(100, 300))] for _ in range(batch)]
    spec = StructuredOutputsParams(json=TYPICAL) if constrained else None
    params = SamplingParams(temperature=0.6, max_tokens=OUTPUT_LEN, ignore_eos=not constrained, structured_outputs=spec)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    if spec is not None:
        check_tokens(llm, spec, [o["token_ids"] for o in outs])
    return sum(len(o["token_ids"]) for o in outs) / elapsed


def check_tokens(llm: LLM, spec: StructuredOutputsParams, outputs: list[list[int]]) -> None:
    """Every constrained output is a prefix the grammar allows (a fresh matcher accepts each token), or the
    mask let a wrong token through."""
    assert llm.grammars is not None
    for tokens in outputs:
        matcher = llm.grammars.matcher(spec)
        bad = next((i for i, t in enumerate(tokens) if not matcher.accept_token(t)), None)
        if bad is not None:
            raise AssertionError(f"token {bad} ({tokens[bad]}) of a constrained output is not allowed by its grammar")


def mask_costs(tokenizer: str, rows: int = 256) -> dict:
    """Host: filling one step's mask for `rows` requests inside a JSON string (the costliest state: most
    tokens are undecided), by one loop and by xgrammar's BatchGrammarMatcher; device: applying it."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from nanoserve.engine_pod.structured_output import GrammarMask, apply_grammar_mask

    tok = AutoTokenizer.from_pretrained(tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=49152)
    grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(TYPICAL), max_whitespace_cnt=20)
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
    for m in matchers:
        for t in tok.encode('{"name": "Al', add_special_tokens=False):
            assert m.accept_token(t)
    bitmask = xgr.allocate_token_bitmask(rows, 49152)

    def best_of(fn, n=20) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    loop = best_of(lambda: [m.fill_next_token_bitmask(bitmask, j) for j, m in enumerate(matchers)])
    batch = xgr.BatchGrammarMatcher()
    pooled = best_of(lambda: batch.batch_fill_next_token_bitmask(matchers, bitmask))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.randn(rows, 49152, device=device)
    mask = GrammarMask(np.arange(rows), bitmask)

    def apply():
        apply_grammar_mask(logits, mask)
        if device == "cuda":
            torch.cuda.synchronize()

    return {
        "rows": rows,
        "fill_loop_us_per_row": round(loop / rows * 1e6, 2),
        "fill_pool_us_per_row": round(pooled / rows * 1e6, 2),
        "fill_loop_ms": round(loop * 1e3, 3),
        "fill_pool_ms": round(pooled * 1e3, 3),
        "apply_ms": round(best_of(apply) * 1e3, 3),
        "device": device,
        "cpus": os.cpu_count(),
    }


def profiled(llm: LLM, batch: int) -> dict:
    """Host time by phase over one constrained run (bench/throughput.py's timers, and the mask's own)."""
    from throughput import profile_phases

    import nanoserve.engine_pod.llm_engine as engine_module
    import nanoserve.engine_pod.structured_output as so

    totals = profile_phases(llm)
    timed = functools.partial(timed_into, totals)
    # accept + fill on the engine thread (with --shapes inline; the grammar process's are not seen here)
    so.accept_and_fill = timed("accept_and_fill (inline)", so.accept_and_fill)
    engine_module.grammar_mask = timed("grammar_mask (rows, submit)", engine_module.grammar_mask)
    llm.model_runner.sample_deferred = timed("sample_deferred", llm.model_runner.sample_deferred)
    llm.step = timed("step", llm.step)
    tok_s = throughput(llm, batch, True, 1)
    return {
        "bench": "structured-profile",
        "batch": batch,
        "constrained_tok_s": round(tok_s),
        "phases_s": {k: round(v, 3) for k, v in totals.items()},
    }


def timeline(llm: LLM, batch: int) -> dict:
    """When each part of a constrained step happens, in ms after the step's start (medians over the steps
    with `batch` rows): the engine thread's phases, and the accepts and fill when they are inline."""
    import xgrammar as xgr

    import nanoserve.engine_pod.constrained_step as cs
    import nanoserve.engine_pod.grammar_process as gp

    marks: list[tuple[str, float]] = []
    clock = time.perf_counter

    def mark(name, fn):
        def wrapped(*a, **k):
            marks.append((name + ">", clock()))
            try:
                return fn(*a, **k)
            finally:
                marks.append((name + "<", clock()))

        return wrapped

    step_fn, prepare_fn, reply_fn = cs.constrained_step, cs.prepare, gp.GrammarReply.result
    cs.constrained_step, cs.prepare = mark("step", step_fn), mark("prepare", prepare_fn)
    gp.GrammarReply.result = mark("reply", reply_fn)  # (with the grammar process: its accepts and fill are there)
    accept_fn, fill_fn = (
        xgr.BatchGrammarMatcher.batch_accept_token,
        xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask,
    )
    xgr.BatchGrammarMatcher.batch_accept_token = staticmethod(mark("accept", accept_fn))
    xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask = mark("fill", fill_fn)
    for name in ("_mask", "_apply", "_run"):
        setattr(llm, name, mark(name, getattr(llm, name)))
    llm.scheduler.schedule = mark("schedule", llm.scheduler.schedule)
    try:
        tok_s = throughput(llm, batch, True, 2)
    finally:
        cs.constrained_step, cs.prepare, gp.GrammarReply.result = step_fn, prepare_fn, reply_fn
        xgr.BatchGrammarMatcher.batch_accept_token = staticmethod(accept_fn)
        xgr.BatchGrammarMatcher.batch_fill_next_token_bitmask = fill_fn
        for name in ("_mask", "_apply", "_run"):
            del llm.__dict__[name]
        del llm.scheduler.__dict__["schedule"]
    steps, current = [], None
    for name, t in marks:
        if name == "step>":
            current = {"t0": t, "events": {}}
            steps.append(current)
        elif current is not None:
            key = name
            while key in current["events"]:  # _run twice a step: sample_deferred, then run
                key += "'"
            current["events"][key] = (t - current["t0"]) * 1e3
    full = [s for s in steps[len(steps) // 4 : -len(steps) // 4 or None] if len(s["events"]) > 10]
    keys = sorted(
        {k for s in full for k in s["events"]}, key=lambda k: np.median([s["events"].get(k, 0) for s in full])
    )
    gaps = [(b["t0"] - a["t0"]) * 1e3 for a, b in zip(full, full[1:])]
    return {
        "bench": "structured-timeline",
        "batch": batch,
        "constrained_tok_s": round(tok_s),
        "steps": len(full),
        "step_ms_p50": round(float(np.median(gaps)), 3) if gaps else None,
        "ms_after_step_start_p50": {
            k: round(float(np.median([s["events"][k] for s in full if k in s["events"]])), 3) for k in keys
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--mask-only", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--profile", action="store_true", help="then host time by phase, constrained, batch 256")
    p.add_argument("--timeline", action="store_true", help="then when each part of a constrained step happens")
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["default"],
        choices=["default", "process", "inline"],
        help="constrained runs with the engine's grammars in the grammar process, on the engine thread, or as "
        "configured; several alternate in one run, each against the same unconstrained figure",
    )
    p.add_argument("--rounds", type=int, default=1, help="measure every batch size this many times")
    args = p.parse_args()
    tokenizer = tokenizer_folder(args.tokenizer)
    print("RESULT " + json.dumps({"bench": "structured-mask", **mask_costs(tokenizer)}), flush=True)
    if args.mask_only:
        return
    pipeline = {"async_scheduling": True, "grammar_process": "process" in args.shapes}  # (its two kinds)
    llm = LLM(model_folder(tokenizer), max_model_len=2048, **(pipeline if args.shapes != ["default"] else {}))
    try:
        for constrained in (False, True):  # warm-up: graphs, kernels, the grammar's compile
            throughput(llm, 8, constrained, run=99)
        worker = llm.grammar_process
        for repeat in range(args.rounds):
            for batch in args.batches:
                free = throughput(llm, batch, False, repeat)
                for shape in args.shapes:
                    if shape != "default":  # (between runs, with no request in flight: each kind of seq.grammar)
                        llm.grammar_process = worker if shape == "process" else None
                    forced = throughput(llm, batch, True, repeat)
                    result = {
                        "bench": "structured",
                        "shape": "process" if llm.grammar_process is not None else "inline",
                        "batch": batch,
                        "round": repeat,
                        "unconstrained_tok_s": round(free),
                        "constrained_tok_s": round(forced),
                        "ratio": round(forced / free, 3),
                    }
                    print("RESULT " + json.dumps(result), flush=True)
                llm.grammar_process = worker
        if args.timeline:
            print("RESULT " + json.dumps(timeline(llm, max(args.batches))), flush=True)
        if args.profile:
            print("RESULT " + json.dumps(profiled(llm, 256)), flush=True)
    finally:
        llm.exit()


if __name__ == "__main__":
    main()
