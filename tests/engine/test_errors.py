"""Bad input fails with a typed, clear exception and leaves nothing behind (no queued request, no block)."""

import json
import os
import shutil

import pytest

from nanoserve.engine_pod import LLM, ConfigError, InvalidRequestError, ModelLoadError, SamplingParams


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tiny_models, request):
    engine = LLM(
        tiny_models["llama"],
        num_kvcache_blocks=8,
        kvcache_block_size=16,
        max_model_len=100,
        async_scheduling=request.param,
    )
    yield engine
    engine.exit()


def assert_clean(llm):
    assert not llm.has_unfinished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "empty"),
        ([], "empty"),
        ([1] * 100, "max_model_len"),
        ([1, 2, 999], "token id 999"),
        ([1, -2], "token id -2"),
    ],
)
def test_bad_prompts(llm, prompt, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate([[3, 4], prompt], SamplingParams(max_tokens=4))
    assert_clean(llm)  # the good prompt before the bad one was not queued either


def test_request_that_can_never_fit_is_rejected(tiny_models):
    small = LLM(tiny_models["llama"], num_kvcache_blocks=2, kvcache_block_size=16)  # 32 token slots
    try:
        with pytest.raises(InvalidRequestError, match="KV-cache blocks"):
            small.generate([[1] * 20], SamplingParams(max_tokens=40))
        assert_clean(small)
        assert len(small.generate([[1] * 20], SamplingParams(max_tokens=12))[0]["token_ids"]) == 12
    finally:
        small.exit()


def test_generation_stops_at_max_model_len(llm):
    out = llm.generate([[5] * 95], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 5
    assert_clean(llm)


def test_unknown_model_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM("/nonexistent/model")


def test_unsupported_architecture(tiny_models, tmp_path):
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_models["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    supported = "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM, "
    supported += "Qwen3ForCausalLM, Qwen3MoeForCausalLM"
    with pytest.raises(ModelLoadError, match=supported):
        LLM(str(folder))


def test_missing_weights(tiny_models, tmp_path):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_models["llama"], folder)
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            os.remove(folder / f)
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(str(folder))


def test_tensor_parallel_size_must_divide_heads(tiny_models):
    with pytest.raises(ConfigError, match="does not divide"):
        LLM(tiny_models["llama"], tensor_parallel_size=3, num_kvcache_blocks=8)
