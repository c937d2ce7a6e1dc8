"""Shared by the benchmarks: the random Qwen3-0.6B model and the card's measured copy bandwidth."""

import json
import os
import time

import torch

SHARED_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "qwen3-0.6b-config.json")
QWEN3_0_6B = {  # Qwen3-0.6B's published config.json (the copy in ../shared/ wins when present)
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "vocab_size": 151936,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def qwen3_0_6b_path(folder: str = "/tmp/nanoserve-bench/qwen3-0.6b-random") -> str:
    """Write Qwen3-0.6B's shape with random bf16 weights once, return the folder."""
    from nanoserve.engine_pod.random_model import save_random_model

    if not os.path.isfile(os.path.join(folder, "config.json")):
        config = QWEN3_0_6B
        if os.path.isfile(SHARED_CONFIG):
            with open(SHARED_CONFIG) as f:
                config = json.load(f)
        config = {**config, "initializer_range": 0.02}
        save_random_model(
            folder, config, seed=0, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu"
        )
    return folder


def copy_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    import triton.testing

    n = int(gib * 2**30) // 2
    src = torch.randn(n // 2, device="cuda").view(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def timed(totals: dict[str, float], name: str, fn):
    """`fn`, adding its host time to totals[name] at each call."""

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t

    return wrapper
