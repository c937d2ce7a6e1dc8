"""Mixture of experts against a dense model of the same active size, on Nano-vLLM's bench.py workload (GPU).

`--model qwen3-30b-a3b` (default): Qwen3-30B-A3B's layer shape (hidden 2048, 32 query / 4 KV heads of 128,
128 experts of width 768, top-8, its vocabulary); the dense peer has the same attention and one MLP as wide
as the 8 active experts together (6144): the same FLOPs a token.
`--model gpt-oss-20b`: gpt-oss-20b's (hidden 2880, 64 query / 8 KV heads of 64 with biases and sinks, sliding
window 128 on every other layer, YaRN, 32 biased experts of width 2880 with the clamped SwiGLU, top-4, its
vocabulary of 201088); the dense peer a Llama with the same heads and an MLP of 4 x 2880 = 11520.
Random bf16 weights; `--layers` layers (default 6, not 48 / 24: the per-layer shape is what the kernels see,
and the folders stay small enough to write). One `RESULT moe {...}` line: seconds and output tok/s of each,
and their ratio.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from throughput import nano_vllm_workload  # noqa: E402

from nanoserve.engine_pod import LLM, SamplingParams  # noqa: E402

ATTENTION = {
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
SPARSE = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "intermediate_size": 6144,  # (the dense layers', none here)
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
DENSE = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "intermediate_size": 6144}
GPT_OSS_ATTENTION = {
    "hidden_size": 2880,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "attention_bias": True,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "vocab_size": 201088,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 199998,
    "eos_token_id": 200002,
}
GPT_OSS_SPARSE = {
    "model_type": "gpt_oss",
    "architectures": ["GptOssForCausalLM"],
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "intermediate_size": 2880,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    },
}
GPT_OSS_DENSE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "intermediate_size": 4 * 2880,
    "rope_theta": 150000.0,
}
MODELS = {
    "qwen3-30b-a3b": (ATTENTION, SPARSE, DENSE),
    "gpt-oss-20b": (GPT_OSS_ATTENTION, GPT_OSS_SPARSE, GPT_OSS_DENSE),
}


def model_folder(model: str, kind: str, layers: int) -> str:
    from nanoserve.engine_pod.random_model import save_random_model

    folder = f"/tmp/nanoserve-bench/{model}-{kind}-{layers}l"
    if not os.path.isfile(os.path.join(folder, "config.json")):
        attention, sparse, dense = MODELS[model]
        config = {**attention, **(sparse if kind == "moe" else dense), "num_hidden_layers": layers}
        save_random_model(folder, config, seed=0, dtype=torch.bfloat16, device="cuda")
    return folder


def run(path: str) -> dict:
    llm = LLM(path, max_model_len=4096, max_num_batched_tokens=16384)
    prompts, params = nano_vllm_workload()
    llm.generate(["Benchmark: "], SamplingParams())
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    t = time.perf_counter() - t
    tokens = sum(len(o["token_ids"]) for o in outs)
    llm.exit()
    return {"seconds": round(t, 3), "output_tok_per_s": round(tokens / t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=list(MODELS), default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--kind", choices=["moe", "dense"], help="run this one alone (each runs in its own process)")
    args = ap.parse_args()
    if args.kind:
        print("ONE " + json.dumps(run(model_folder(args.model, args.kind, args.layers))), flush=True)
        return
    runs = {}
    for kind in ("moe", "dense"):
        cmd = [sys.executable, __file__, "--model", args.model, "--kind", kind, "--layers", str(args.layers)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[kind] = json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ONE ")))
    result = {
        "bench": "moe",
        "model": args.model,
        "layers": args.layers,
        "moe": runs["moe"],
        "dense_same_active": runs["dense"],
        "moe_over_dense_tok_s": round(runs["moe"]["output_tok_per_s"] / runs["dense"]["output_tok_per_s"], 3),
        "card": torch.cuda.get_device_name(),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
