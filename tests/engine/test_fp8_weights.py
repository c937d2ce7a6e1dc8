"""FP8 weight checkpoints (engine_pod/quantization.py) on CPU: tiny random models quantized here into each
format vLLM loads (compressed-tensors per tensor / per channel with dynamic or static activations, the fp8
method's block-wise weight_scale_inv, ignore lists), config.json written as those tools write it. The engine
dequantizes at load on CPU, so its greedy tokens must equal transformers' on the dequantized weights; TP=2
equals TP=1; what is not supported fails at load naming the config field."""

import os

import pytest
import torch
from fp8_checkpoints import ct_config, fp8_config, make_fp8, quantize
from parity import engine_greedy, hf_greedy, random_prompts
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_model

from nanoserve.engine_pod import LLM
from nanoserve.engine_pod.errors import ModelLoadError
from nanoserve.engine_pod.quantization import parse_quantization_config

PROMPTS = random_prompts(240, [1, 7, 23], seed=4)
TOKENS = 8


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return root, {
        "llama": build_tiny_model(str(root / "llama"), "llama", seed=2),
        "qwen3": build_tiny_model(str(root / "qwen3"), "qwen3", seed=3),
    }


def loaded_linears(path: str, **kw):
    """The engine's linear layers after load (dtype of each weight), and its greedy tokens."""
    llm = LLM(path, num_kvcache_blocks=64, **kw)
    try:
        from nanoserve.engine_pod.layers.linear import LinearBase

        layers = {n: m for n, m in llm.model_runner.model.named_modules() if isinstance(m, LinearBase)}
        return {n: (m.weight.dtype, m.weight_scale is None, m.fp8 is None) for n, m in layers.items()}
    finally:
        llm.exit()


CASES = {
    # name: arch, quantization_config, weight strategy, block, checkpoint modules left unquantized, static
    "ct-tensor-dynamic": ("llama", ct_config("tensor", "tensor", ["lm_head"]), "tensor", None, (), False),
    "ct-channel-token": (
        "qwen3",
        ct_config("channel", "token", ["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"]),
        "channel",
        None,
        ("model.layers.1.mlp.down_proj",),
        False,
    ),
    "ct-tensor-static": ("qwen3", ct_config("tensor", "static", ["lm_head"]), "tensor", None, (), True),
    "ct-channel-weight-only": ("llama", ct_config("channel", None, ["lm_head"]), "channel", None, (), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_matches_transformers_on_dequantized_weights(bases, case):
    root, models = bases
    arch, qcfg, strategy, block, skip, static = CASES[case]
    path, deq = make_fp8(models[arch], str(root / case), qcfg, strategy, block, skip, static)
    expected = hf_greedy(deq, PROMPTS, TOKENS)
    assert engine_greedy(path, PROMPTS, TOKENS) == expected
    # and the quantized weights made a difference: the dequantized model is not the original one
    assert (
        load_file(os.path.join(deq, "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
        .ne(load_file(os.path.join(models[arch], "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"])
        .any()
    )


def test_fp8_block_checkpoint_matches_transformers_loading_it(bases):
    """transformers itself loads the fp8-method checkpoint on CPU (dequantizing its weight_scale_inv blocks):
    the engine's greedy tokens equal its greedy tokens on the FP8 checkpoint, and the ignored layer stays in
    the model's dtype in both."""
    root, models = bases
    skip = ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")  # gate_up_proj of layer 0
    qcfg = fp8_config((32, 32), ["lm_head", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"])
    path, deq = make_fp8(models["qwen3"], str(root / "fp8-block"), qcfg, "block", (32, 32), skip)
    expected = hf_greedy(path, PROMPTS, TOKENS)
    assert hf_greedy(deq, PROMPTS, TOKENS) == expected
    assert engine_greedy(path, PROMPTS, TOKENS) == expected
    layers = loaded_linears(path)
    # CPU: every FP8 layer dequantized to float32 at load, scales gone
    assert set(layers.values()) == {(torch.float32, True, True)}
    assert "model.layers.0.mlp.gate_up_proj" in layers


def test_block_scales_with_partial_blocks_and_tp2_equals_tp1(bases):
    """Blocks that straddle q/k/v, shard and matrix edges (48 x 32 blocks on 128/64/64-row q/k/v and
    64-column o_proj shards): TP=2 (gloo) gives TP=1's tokens, and both transformers' on the dequantized
    weights."""
    root, models = bases
    qcfg = fp8_config((48, 32))
    path, deq = make_fp8(models["qwen3"], str(root / "fp8-partial"), qcfg, "block", (48, 32))
    expected = hf_greedy(deq, PROMPTS, TOKENS)
    assert engine_greedy(path, PROMPTS, TOKENS) == expected
    assert engine_greedy(path, PROMPTS, TOKENS, tensor_parallel_size=2, num_kvcache_blocks=64) == expected


def test_per_tensor_scales_of_merged_parts_under_tp2(bases):
    """Per-tensor scales differ between q, k and v (and gate, up): each fills its own rows, on each rank."""
    root, models = bases
    path, deq = make_fp8(models["llama"], str(root / "ct-tp2"), ct_config("tensor", "token", ["lm_head"]), "tensor")
    expected = hf_greedy(deq, PROMPTS, TOKENS)
    assert engine_greedy(path, PROMPTS, TOKENS, tensor_parallel_size=2) == expected


def _cfg(q: dict) -> dict:
    return {"quantization_config": q}


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(quant_method="awq"), "quant_method='awq'"),
        (dict(quant_method="gptq"), "quant_method='gptq'"),
        (dict(kv_cache_scheme=dict(num_bits=8, type="float", strategy="tensor")), "kv_cache_scheme"),
        (dict(format="pack-quantized"), "format='pack-quantized'"),
    ],
)
def test_unsupported_compressed_tensors_configs_name_the_field(change, field):
    q = {**ct_config("channel", "token", ["lm_head"]), **change}
    with pytest.raises(ModelLoadError, match=field.replace("[", r"\[")):
        parse_quantization_config(_cfg(q))


def test_unsupported_schemes_name_the_field():
    q = ct_config("channel", "token", [])
    q["config_groups"]["group_0"]["weights"].update(num_bits=4, type="int")
    with pytest.raises(ModelLoadError, match=r"config_groups\.group_0\.weights\.num_bits/type"):
        parse_quantization_config(_cfg(q))
    q = ct_config("group", "token", [])
    with pytest.raises(ModelLoadError, match=r"weights\.strategy='group'"):
        parse_quantization_config(_cfg(q))
    with pytest.raises(ModelLoadError, match="activation_scheme"):
        parse_quantization_config(_cfg({**fp8_config((128, 128)), "activation_scheme": "static"}))
    with pytest.raises(ModelLoadError, match="scale_fmt='ue8m0'"):
        parse_quantization_config(_cfg({**fp8_config((128, 128)), "scale_fmt": "ue8m0"}))
    assert parse_quantization_config({}) is None
    parsed = parse_quantization_config(_cfg(fp8_config((128, 128), ["lm_head"])))
    assert parsed is not None and parsed.scheme.block_size == (128, 128) and parsed.ignored("lm_head")
    assert not parsed.ignored("model.layers.0.mlp.gate_proj")


def test_checkpoints_that_do_not_fit_their_config_fail_at_load(bases):
    root, models = bases
    # lm_head quantized in the checkpoint but the ignore list says nothing of it: the engine keeps lm_head
    # in the model's dtype, and refuses the float8 tensor rather than reading it unscaled.
    path, _ = make_fp8(models["qwen3"], str(root / "bad-ignore"), ct_config("tensor", "token", []), "tensor")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    q, scale, _ = quantize(tensors["lm_head.weight"], "tensor")
    tensors.update({"lm_head.weight": q, "lm_head.weight_scale": scale})
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(ModelLoadError, match="'lm_head.weight' is torch.float8_e4m3fn"):
        LLM(path, num_kvcache_blocks=16)
    # q_proj skipped but k_proj and v_proj quantized: one qkv_proj cannot be both
    q = ct_config("tensor", "token", ["lm_head", "model.layers.0.self_attn.q_proj"])
    path, _ = make_fp8(models["qwen3"], str(root / "bad-split"), q, "tensor", skip=("model.layers.0.self_attn.q_proj",))
    with pytest.raises(ModelLoadError, match=r"quantization_config\.ignore skips only some of"):
        LLM(path, num_kvcache_blocks=16)
