"""Tiny random Hugging Face models with fixed seeds, built on the spot (no hub): the suites' models."""

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.25,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)


# The GPU tests' random Qwen3 (bf16 there): big enough for the Triton kernels' tiles.
GPU_QWEN3 = dict(
    model_type="qwen3",
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
    initializer_range=0.1,
    tie_word_embeddings=True,
    eos_token_id=None,
    bos_token_id=None,
)


# Mixture-of-experts sizes: 8 or 4 small experts, top-2 (Qwen2-MoE: and a shared expert, 96 wide so that
# neither its weights nor a transposed load of them are square).
TINY_MOE = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=96
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
}


def build_tiny_model(folder: str, arch: str, seed: int = 0, **overrides) -> str:
    """Save a small random model of `arch` ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral",
    ...) with its tokenizer into `folder`."""
    from nanoserve.engine_pod.random_model import save_random_model

    params = {**TINY, **TINY_MOE.get(arch, {}), **overrides, "model_type": arch}
    if arch == "qwen3":
        params.setdefault("head_dim", 32)
    return save_random_model(folder, params, seed=seed)
