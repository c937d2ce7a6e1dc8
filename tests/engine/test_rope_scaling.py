"""Rope scaling as transformers defines it (linear, llama3, YaRN) and Mistral: the rotary tables against
transformers' own rotary embedding, greedy tokens against transformers past the pretrained length, and the
model length each implies (YaRN extends it, a sliding window bounds it)."""

import pytest
import torch
from parity import engine_greedy, hf_greedy, random_prompts
from tiny_models import build_tiny_model

from nanoserve.engine_pod.errors import ModelLoadError
from nanoserve.engine_pod.layers.rotary import RotaryEmbedding
from nanoserve.engine_pod.rope_params import model_max_len, rope_parameters

HEAD_DIM, THETA = 32, 10000.0
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-attention-factor": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "attention_factor": 0.8,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 16,
        "beta_slow": 2,
    },
    "yarn-no-truncate": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 48, "truncate": False},
    "yarn-factor-from-lengths": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64},
}


def hf_config(scaling: dict, max_position: int = 256):
    from transformers import LlamaConfig

    params = {**scaling, "rope_theta": THETA}
    return LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position,
        rope_parameters=params,
    )


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_rotary_tables_equal_transformers(name):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = hf_config(SCALINGS[name])
    positions = torch.arange(256)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions[None])
    theta, scaling = rope_parameters(cfg.to_dict())
    ours = RotaryEmbedding(HEAD_DIM, 256, theta, scaling).cos_sin
    half = HEAD_DIM // 2
    torch.testing.assert_close(ours[:, :half], cos[0, :, :half], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, half:], sin[0, :, :half], rtol=1e-5, atol=1e-5)


def test_model_length_yarn_extends_and_a_sliding_window_does_not_bound():
    yarn = {"max_position_embeddings": 40960, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    yarn["rope_scaling"]["original_max_position_embeddings"] = 32768
    assert model_max_len(yarn) == 131072  # Qwen3's documented 128k with YaRN
    # Mistral v0.1: attention applies the window, so the sequence may run past it.
    assert model_max_len({"max_position_embeddings": 32768, "sliding_window": 4096}) == 32768
    with pytest.raises(ModelLoadError, match="rope type 'dynamic' is not supported"):
        model_max_len({"max_position_embeddings": 64, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


@pytest.fixture(scope="module")
def yarn_model(tmp_path_factory):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": THETA}
    path = str(tmp_path_factory.mktemp("yarn") / "qwen3")
    return build_tiny_model(path, "qwen3", max_position_embeddings=32, rope_parameters=scaling)


def test_yarn_greedy_equals_transformers_past_the_pretrained_length(yarn_model):
    from nanoserve.engine_pod import LLM

    llm = LLM(yarn_model, num_kvcache_blocks=64)
    assert llm.config.max_model_len == 128  # 32 pretrained x 4
    llm.exit()
    prompts = random_prompts(240, [20, 45, 90], seed=3)  # before, across and well past position 32
    assert engine_greedy(yarn_model, prompts) == hf_greedy(yarn_model, prompts, 12)


def test_mistral_greedy_equals_transformers(tmp_path):
    # Mistral v0.1's window on every layer (8 here: prompts and outputs run well past it).
    path = build_tiny_model(str(tmp_path / "mistral"), "mistral", sliding_window=8, head_dim=32)
    prompts = random_prompts(240, [1, 17, 60], seed=5)
    expected = hf_greedy(path, prompts, 12)
    assert engine_greedy(path, prompts) == expected
    assert engine_greedy(path, prompts, max_num_batched_tokens=16, kvcache_block_size=8) == expected
