"""How far an fp8 KV cache (--kv-cache-dtype fp8, scales 1.0) moves a model from its unquantized cache:
prompt logprob errors (nats) and greedy agreement over a long generation, on the same prompts.

    python bench/fp8_kv_accuracy.py                     # CPU: the default model (SmolLM2-135M, real weights)
    python bench/fp8_kv_accuracy.py --model qwen3-0.6b  # GPU: the random Qwen3-0.6B of the throughput runs
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import qwen3_0_6b_path  # noqa: E402
from nanoserve.engine_pod import LLM, SamplingParams  # noqa: E402

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "def fibonacci(n):\n    # return the n-th Fibonacci number\n",
    "Photosynthesis is the process by which green plants",
    "Ten tips for a first marathon: 1.",
]


def run(model: str, kv_cache_dtype: str, prompts, max_tokens: int):
    llm = LLM(model, kv_cache_dtype=kv_cache_dtype, max_model_len=4096)
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0)
        outs = llm.generate(prompts, params)
    finally:
        llm.exit()
    return [[e.logprob for e in o["prompt_logprobs"][1:]] for o in outs], [o["token_ids"] for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="a model folder, smollm2-135m or qwen3-0.6b (random)")
    ap.add_argument("--max-tokens", type=int, default=512)
    args = ap.parse_args()
    model = qwen3_0_6b_path() if args.model == "qwen3-0.6b" else args.model
    if args.model == "qwen3-0.6b":
        prompts = [[(i * 7919 + j * 104729) % 10000 for j in range(200 + 50 * i)] for i in range(8)]
    else:
        from transformers import AutoTokenizer

        from nanoserve.engine_pod.default_model import resolve_model

        model = resolve_model(model)
        tok = AutoTokenizer.from_pretrained(model)
        prompts = [tok.encode(t) for t in TEXTS]
    exact_lp, exact_ids = run(model, "auto", prompts, args.max_tokens)
    fp8_lp, fp8_ids = run(model, "fp8", prompts, args.max_tokens)
    errors = torch.tensor([a - b for e, f in zip(exact_lp, fp8_lp) for a, b in zip(e, f)]).abs()
    first_diff = [next((i for i, (a, b) in enumerate(zip(e, f)) if a != b), len(e)) for e, f in zip(exact_ids, fp8_ids)]
    same = sum(a == b for e, f in zip(exact_ids, fp8_ids) for a, b in zip(e, f)) / sum(map(len, exact_ids))
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "prompt_logprob_err_max": round(errors.max().item(), 4),
        "prompt_logprob_err_mean": round(errors.mean().item(), 4),
        "greedy_first_divergence": first_diff,
        "greedy_same_position_fraction": round(same, 4),
        "max_tokens": args.max_tokens,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
