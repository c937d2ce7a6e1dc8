"""Mixture-of-experts models (Qwen3-MoE, Mixtral): greedy tokens equal transformers (float32, CPU) with
dense and sparse layers, normalised top-k weights or not, under chunked prefill and preemption; the
experts' stacked 3D tensors load as well as per-expert ones; TP=2 (gloo) equals TP=1."""

import os
import shutil

import pytest
import torch
from parity import MAX_TOKENS, engine_greedy, hf_greedy, random_prompts
from safetensors.torch import save_file
from tiny_models import build_tiny_model

from nanoserve.engine_pod import LLM, SamplingParams

MODELS = {
    # Layer 0 sparse, layer 1 dense (mlp_only_layers); top-k weights renormalised.
    "qwen3_moe": ("qwen3_moe", dict(mlp_only_layers=[1], norm_topk_prob=True)),
    # Layer 0 dense, layer 1 sparse (every second layer); top-k weights as the softmax gave them.
    "qwen3_moe_step2": ("qwen3_moe", dict(decoder_sparse_step=2, norm_topk_prob=False)),
    "mixtral": ("mixtral", {}),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per model: its folder, prompts of mixed lengths and transformers' greedy tokens."""
    root, out = tmp_path_factory.mktemp("moe"), {}
    for name, (arch, overrides) in MODELS.items():
        path = build_tiny_model(str(root / name), arch, seed=len(name), **overrides)
        prompts = random_prompts(240, [1, 5, 17, 40, 77], seed=len(name))
        out[name] = (path, prompts, hf_greedy(path, prompts, MAX_TOKENS))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_transformers(cases, name):
    path, prompts, expected = cases[name]
    assert engine_greedy(path, prompts) == expected


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_chunked_prefill_mixed_with_decode(cases, name):
    path, prompts, expected = cases[name]
    assert engine_greedy(path, prompts, max_num_batched_tokens=24, kvcache_block_size=8) == expected


def test_preemption_and_prefix_cache(cases):
    path, prompts, expected = cases["mixtral"]
    llm = LLM(path, num_kvcache_blocks=12, kvcache_block_size=8)
    try:
        outs = llm.generate(
            prompts + prompts[3:], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        )
        assert llm.scheduler.num_preemptions > 0
        assert [o["token_ids"] for o in outs] == expected + expected[3:]
    finally:
        llm.exit()


def test_stacked_expert_tensors_load_like_per_expert_ones(cases, tmp_path):
    # transformers holds the experts fused (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]);
    # its state dict, saved without the per-expert split, is a checkpoint in that layout.
    from transformers import AutoModelForCausalLM

    path, prompts, expected = cases["qwen3_moe"]
    state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    stacked = str(tmp_path / "stacked")
    shutil.copytree(path, stacked, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(stacked, "model.safetensors"))
    assert engine_greedy(stacked, prompts) == expected


def test_tp2_equals_tp1(cases):
    # Each rank holds every expert's half of the intermediate width (and half the dense layer's); one
    # all-reduce after the block. Mixtral's experts shard by the same code.
    path, prompts, expected = cases["qwen3_moe"]
    assert engine_greedy(path, prompts, tensor_parallel_size=2, max_num_batched_tokens=32) == expected


def test_experts_load_their_tp_slice_from_either_layout():
    # Rank 1 of 2 holds the second half of each expert's intermediate width, whether the checkpoint has
    # the stacked tensors or Mixtral's per-expert w1 (gate), w3 (up), w2 (down).
    from nanoserve.engine_pod.layers.fused_moe import FusedMoE
    from nanoserve.engine_pod.layers.parallel import set_tensor_parallel
    from nanoserve.engine_pod.models.moe import MoeSpec, moe_weight_target

    experts, hidden, inter = 3, 4, 6
    gate_up, down = torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)
    stacked = {"model.layers.0.mlp.experts.gate_up_proj": gate_up, "model.layers.0.mlp.experts.down_proj": down}
    split = {
        f"model.layers.0.block_sparse_moe.experts.{e}.w{i}.weight": t
        for e in range(experts)
        for i, t in ((1, gate_up[e, :inter]), (3, gate_up[e, inter:]), (2, down[e]))
    }
    set_tensor_parallel(1, 2)
    try:
        for tensors in (stacked, split):
            moe = FusedMoE(experts, 2, hidden, inter, renormalize=True)
            params = dict(moe.named_parameters(prefix="model.layers.0.mlp.experts"))
            for name, tensor in tensors.items():
                spec = MoeSpec(experts, 2, inter, True, frozenset([0]))
                target, shard = moe_weight_target(name, spec) or ("", None)
                params[target].weight_loader(params[target], tensor, shard)
            half = slice(inter // 2, inter)
            assert torch.equal(moe.w13_weight, torch.cat([gate_up[:, half], gate_up[:, inter:][:, half]], 1))
            assert torch.equal(moe.w2_weight, down[:, :, half])
    finally:
        set_tensor_parallel(0, 1)
