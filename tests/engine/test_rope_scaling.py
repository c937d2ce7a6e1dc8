"""Rope scaling as transformers defines it (linear, dynamic NTK, llama3, YaRN, LongRoPE) and Mistral: the rotary
tables against transformers' own rotary embedding, greedy tokens against transformers past the pretrained
length, and the model length each implies (YaRN and dynamic NTK extend it, a sliding window bounds it).
Dynamic NTK and LongRoPE are fixed for the served length (layers/rotary.py), so they meet transformers, which
switches per forward, where its sequence-length rule picks the same frequencies."""

import math

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
    "proportional": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "factor": 2.0},
    "proportional-whole": {"rope_type": "proportional"},
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
    # Dynamic NTK: max_position_embeddings x factor (vLLM); LongRoPE's max_position_embeddings is the extended
    # length already, and Phi-3 keeps the pretrained one at the top level (transformers' priority).
    assert model_max_len({"max_position_embeddings": 4096, "rope_scaling": {"type": "dynamic", "factor": 2.0}}) == 8192
    phi3 = {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096}
    phi3["rope_scaling"] = {"type": "su", "short_factor": [1.0], "long_factor": [2.0]}  # "su": its first name
    assert model_max_len(phi3) == 131072
    assert rope_parameters(phi3)[1]["original_max_position_embeddings"] == 4096
    assert rope_parameters(phi3)[1]["rope_type"] == "longrope"
    with pytest.raises(ModelLoadError, match="rope type 'mrope' is not supported"):
        model_max_len({"max_position_embeddings": 64, "rope_scaling": {"rope_type": "mrope", "factor": 2.0}})
    with pytest.raises(ModelLoadError, match="with rope type 'proportional' only"):
        rope_parameters({"partial_rotary_factor": 0.5, "rope_theta": 10000.0})


def _table(inv_freq: torch.Tensor, length: int, scale: float = 1.0) -> torch.Tensor:
    freqs = torch.outer(torch.arange(length, dtype=torch.float), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], -1) * scale


def test_dynamic_ntk_table_is_transformers_at_the_served_length():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = hf_config({"rope_type": "dynamic", "factor": 4.0}, max_position=64)
    assert model_max_len(cfg.to_dict()) == 256  # the default max_model_len: 64 x 4
    theta, scaling = rope_parameters(cfg.to_dict())
    for served in (256, 100, 64, 40):
        hf_inv_freq, attention = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=served)
        ours = RotaryEmbedding(HEAD_DIM, served, theta, scaling).cos_sin
        torch.testing.assert_close(ours, _table(hf_inv_freq, served, attention), rtol=1e-5, atol=1e-5)
    # At the default length that is vLLM's static table: base x (factor^2 - factor + 1)^(d/(d-2)) ...
    vllm_base = THETA * (4.0 * 4.0 - 3.0) ** (HEAD_DIM / (HEAD_DIM - 2))
    vllm_inv_freq = 1.0 / vllm_base ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    default_len = RotaryEmbedding(HEAD_DIM, 256, theta, scaling).cos_sin
    torch.testing.assert_close(default_len, _table(vllm_inv_freq, 256), rtol=1e-5, atol=1e-5)
    # ... for every position, where transformers keeps its initial, unscaled frequencies while a sequence stays
    # within max_position_embeddings: served at that length, ours are those.
    unscaled = _table(ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu")[0], 64)
    torch.testing.assert_close(unscaled, _table(1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM), 64))
    assert not torch.allclose(default_len[:64], unscaled, atol=1e-3)
    torch.testing.assert_close(RotaryEmbedding(HEAD_DIM, 64, theta, scaling).cos_sin, unscaled)


LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)],
    "long_factor": [1.0 + 0.9 * i for i in range(HEAD_DIM // 2)],
    "original_max_position_embeddings": 32,
}


@pytest.mark.parametrize("extra", [{}, {"attention_factor": 1.3}, {"factor": 8.0}])
def test_longrope_tables_equal_transformers_short_and_long(extra):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = hf_config({**LONGROPE, **extra}, max_position=128)  # default attention factor from 128 / 32
    theta, scaling = rope_parameters(cfg.to_dict())
    tables = {}
    for served in (32, 128):  # transformers: short factors up to the pretrained length, long ones past it
        cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.arange(served)[None])
        ours = tables[served] = RotaryEmbedding(HEAD_DIM, served, theta, scaling).cos_sin
        half = HEAD_DIM // 2
        torch.testing.assert_close(ours, torch.cat([cos[0, :, :half], sin[0, :, :half]], -1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tables[32], tables[128][:32], atol=1e-3)  # served past 32: long factors everywhere
    expected = extra.get("attention_factor") or math.sqrt(1 + math.log(extra.get("factor", 4.0)) / math.log(32))
    assert tables[128][0, 0].item() == pytest.approx(expected)  # cos 0 x the attention factor


def test_dynamic_ntk_greedy_equals_transformers_within_max_position_embeddings(tmp_path):
    # Served at max_position_embeddings the base is transformers' below that length: the unscaled one.
    params = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": THETA}
    path = build_tiny_model(str(tmp_path / "dyn"), "qwen3", max_position_embeddings=32, rope_parameters=params)
    prompts = random_prompts(240, [6, 20], seed=7)  # + 12 outputs: at most 32
    assert engine_greedy(path, prompts, max_model_len=32) == hf_greedy(path, prompts, 12)


def test_longrope_greedy_equals_transformers_short_and_long_factors(tmp_path):
    params = {**LONGROPE, "rope_theta": THETA}
    path = build_tiny_model(str(tmp_path / "longrope"), "qwen3", max_position_embeddings=64, rope_parameters=params)
    short, long = random_prompts(240, [6, 20], seed=8), random_prompts(240, [36, 50], seed=9)
    # Served within the pretrained 32: short factors, as transformers on sequences that stay within it.
    assert engine_greedy(path, short, max_model_len=32) == hf_greedy(path, short, 12)
    # Served at the model's 64: long factors at every position, as transformers once a prompt passes 32.
    assert engine_greedy(path, long) == hf_greedy(path, long, 12)


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
