"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral): greedy tokens equal transformers (float32, CPU)
with dense and sparse layers, normalised top-k weights or not, Qwen2-MoE's gated shared expert and q/k/v
biases, under chunked prefill and preemption; the experts' stacked 3D tensors load as well as per-expert ones;
TP=2 (gloo) equals TP=1."""

import json
import os
import shutil

import pytest
import torch
from parity import MAX_TOKENS, engine_greedy, hf_greedy, random_prompts
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import build_tiny_model

from nanoserve.engine_pod import LLM, SamplingParams

MODELS = {
    # Layer 0 sparse, layer 1 dense (mlp_only_layers); top-k weights renormalised.
    "qwen3_moe": ("qwen3_moe", dict(mlp_only_layers=[1], norm_topk_prob=True)),
    # Layer 0 dense, layer 1 sparse (every second layer); top-k weights as the softmax gave them.
    "qwen3_moe_step2": ("qwen3_moe", dict(decoder_sparse_step=2, norm_topk_prob=False)),
    "mixtral": ("mixtral", {}),
    # Layer 0 sparse with the shared expert, layer 1 dense; top-k weights as the softmax gave them.
    "qwen2_moe": ("qwen2_moe", dict(mlp_only_layers=[1], norm_topk_prob=False)),
}


def _randomize_biases(path: str) -> None:
    """transformers initialises biases to zero: random q/k/v biases, so that loading them matters."""
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    gen = torch.Generator().manual_seed(2)
    for k in [k for k in state if k.endswith("_proj.bias")]:
        state[k] = torch.randn(state[k].shape, generator=gen) * 0.5
    save_file(state, file)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Per model: its folder, prompts of mixed lengths and transformers' greedy tokens."""
    root, out = tmp_path_factory.mktemp("moe"), {}
    for name, (arch, overrides) in MODELS.items():
        path = build_tiny_model(str(root / name), arch, seed=len(name), **overrides)
        if arch == "qwen2_moe":
            _randomize_biases(path)
        prompts = random_prompts(240, [1, 5, 17, 40, 77], seed=len(name))
        out[name] = (path, prompts, hf_greedy(path, prompts, MAX_TOKENS))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_transformers(cases, name):
    path, prompts, expected = cases[name]
    assert engine_greedy(path, prompts) == expected


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "qwen2_moe"])
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


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_stacked_expert_tensors_load_like_per_expert_ones(cases, tmp_path, name):
    # transformers holds the experts fused (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]);
    # its state dict, saved without the per-expert split, is a checkpoint in that layout (Qwen2-MoE's shared
    # expert keeps its gate_proj/up_proj/down_proj there).
    from transformers import AutoModelForCausalLM

    path, prompts, expected = cases[name]
    state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert not any(".experts.0." in k for k in state)
    if name == "qwen2_moe":
        assert state["model.layers.0.mlp.shared_expert.gate_proj.weight"].shape == (96, 64)
    stacked = str(tmp_path / "stacked")
    shutil.copytree(path, stacked, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(stacked, "model.safetensors"))
    assert engine_greedy(stacked, prompts) == expected


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_tp2_equals_tp1(cases, name):
    # Each rank holds every expert's half of the intermediate width (and half the dense layer's, and half
    # the shared expert's); one all-reduce after the block, of the experts' and the shared expert's partial
    # sums together. Mixtral's experts shard by the same code.
    path, prompts, expected = cases[name]
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


def test_shared_expert_and_its_gate_count(cases):
    # Layer 0's block as the engine builds and loads it gives transformers' Qwen2MoeSparseMoeBlock output;
    # the routed experts alone, or with the shared expert ungated, do not. The block all-reduces once.
    from transformers import AutoModelForCausalLM

    from nanoserve.engine_pod.layers.parallel import set_tensor_parallel
    from nanoserve.engine_pod.loader import load_model
    from nanoserve.engine_pod.models import build_model
    from nanoserve.engine_pod.models.moe import SparseMoeBlock

    set_tensor_parallel(0, 1)  # a TP=2 engine earlier in this process left its rank 0's
    path = cases["qwen2_moe"][0]
    with open(os.path.join(path, "config.json")) as f:
        model = build_model(json.load(f), 64)
    load_model(model, path)
    ours = model.model.layers[0].mlp
    assert isinstance(ours, SparseMoeBlock) and ours.shared_expert is not None and ours.shared_expert_gate
    assert not ours.experts.reduce_results and not ours.shared_expert.down_proj.reduce_results
    assert not isinstance(model.model.layers[1].mlp, SparseMoeBlock)  # mlp_only_layers=[1]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.layers[0].mlp
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(x[None])[0]
        torch.testing.assert_close(ours(x), expected)
        routed, shared = ours.experts(x, ours.gate(x)), ours.shared_expert(x)
        gate = torch.sigmoid(ours.shared_expert_gate(x))
    assert gate.shape == (32, 1) and gate.std() > 0.05  # a factor per token
    scale = expected.abs().mean()
    assert (routed - expected).abs().mean() > 0.1 * scale  # the shared expert matters
    assert (routed + shared - expected).abs().mean() > 0.1 * scale  # and so does its gate
