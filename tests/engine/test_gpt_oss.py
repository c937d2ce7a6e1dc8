"""gpt-oss (GptOssForCausalLM): greedy tokens equal transformers (float32, CPU) with its attention sinks,
alternating sliding-window and full layers, q/k/v/o biases, YaRN, biased router and experts and clamped
SwiGLU; under chunked prefill, preemption with the prefix cache, and TP=2 (gloo); and from its published
MXFP4 expert format (blocks and scales), dequantized at load exactly as transformers dequantizes it."""

import json
import os
import shutil

import pytest
import torch
from parity import MAX_TOKENS, engine_greedy, hf_greedy, preempted_greedy, random_prompts
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import build_tiny_model

from nanoserve.engine_pod import LLM
from nanoserve.engine_pod.errors import ModelLoadError
from nanoserve.engine_pod.mxfp4 import quantize_mxfp4

GPT_OSS = dict(
    num_local_experts=4,
    num_experts_per_tok=2,
    intermediate_size=96,  # a multiple of 32 (MXFP4 groups); 2I != H, so a transposed layout cannot load
    head_dim=16,
    sliding_window=8,  # layers alternate sliding (8) and full: the window matters within these prompts
    swiglu_limit=1.5,  # low enough that the random activations are clamped
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 150000.0,
        "factor": 4.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 256,
    },
)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    path = build_tiny_model(str(root / "bf16"), "gpt_oss", seed=3, **GPT_OSS)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    # Sinks of a few nats, so that they take a real share of each head's attention.
    for k in [k for k in state if k.endswith("self_attn.sinks")]:
        state[k] = torch.randn(state[k].shape, generator=torch.Generator().manual_seed(1)) * 2
    save_file(state, os.path.join(path, "model.safetensors"))
    prompts = random_prompts(256, [1, 6, 17, 40, 77], seed=4)
    return path, state, prompts, hf_greedy(path, prompts, MAX_TOKENS)


def test_greedy_matches_transformers(case):
    path, _, prompts, expected = case
    assert engine_greedy(path, prompts) == expected


def test_chunked_prefill_mixed_with_decode(case):
    path, _, prompts, expected = case
    assert engine_greedy(path, prompts, max_num_batched_tokens=24, kvcache_block_size=8) == expected


def test_preemption_and_prefix_cache(case):
    path, _, prompts, expected = case
    tokens, preemptions, hits = preempted_greedy(path, prompts, num_blocks=14, repeat_from=3)
    assert preemptions > 0 and hits > 0
    assert tokens == expected + expected[3:]


def test_tp2_equals_tp1(case):
    # Heads (and their sinks) and each expert's intermediate width split over the ranks; the down bias once.
    path, _, prompts, expected = case
    assert engine_greedy(path, prompts, tensor_parallel_size=2, max_num_batched_tokens=32) == expected


def mxfp4_checkpoint(src: str, state: dict, folder: str) -> dict:
    """The experts in gpt-oss's published form: X_blocks/X_scales over [E, out, in], biases as they are."""
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    quantized = {}
    for name, t in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # transformers' [E, in, out]
            quantized[name + "_blocks"], quantized[name + "_scales"] = quantize_mxfp4(t.transpose(1, 2))
        else:
            quantized[name] = t
    save_file(quantized, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return quantized


def test_mxfp4_experts_load_as_transformers_dequantizes_them(case, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    path, state, prompts, _ = case
    quantized = mxfp4_checkpoint(path, state, str(tmp_path / "mxfp4"))
    # The oracle: transformers' own dequantization of those blocks, as a plain float32 checkpoint.
    dequantized = dict(state)
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = convert_moe_packed_tensors(quantized[name + "_blocks"], quantized[name + "_scales"], dtype=torch.float32)
        assert w.shape == state[name].shape and not torch.equal(w, state[name])  # FP4 is lossy: a real check
        dequantized[name] = w
    reference = str(tmp_path / "dequantized")
    shutil.copytree(path, reference, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(dequantized, os.path.join(reference, "model.safetensors"))
    expected = hf_greedy(reference, prompts, MAX_TOKENS)
    assert engine_greedy(str(tmp_path / "mxfp4"), prompts) == expected


def test_mxfp4_blocks_without_scales_and_mxfp4_on_another_architecture_are_refused(case, tmp_path):
    path, state, _, _ = case
    folder = str(tmp_path / "no_scales")
    quantized = mxfp4_checkpoint(path, state, folder)
    without = {k: v for k, v in quantized.items() if not k.endswith("gate_up_proj_scales")}
    save_file(without, f"{folder}/model.safetensors")
    with pytest.raises(ModelLoadError, match="gate_up_proj_blocks came without gate_up_proj_scales"):
        LLM(folder, num_kvcache_blocks=16)
    dense = build_tiny_model(str(tmp_path / "llama"), "llama", seed=0)
    with open(f"{dense}/config.json") as f:
        cfg = json.load(f)
    with open(f"{dense}/config.json", "w") as f:
        json.dump({**cfg, "quantization_config": {"quant_method": "mxfp4"}}, f)
    with pytest.raises(ModelLoadError, match="mxfp4.*GptOssForCausalLM"):
        LLM(dense, num_kvcache_blocks=16)
