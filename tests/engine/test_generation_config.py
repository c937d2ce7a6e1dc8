"""--generation-config auto (vLLM's default): a model's generation_config.json sampling values are the defaults
of requests that leave those fields out, offline and over the OpenAI API; `vllm` keeps vLLM's own defaults."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from nanoserve.engine_pod import LLM, SamplingParams
from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.openai_protocol import parse_completion

GENERATION = {
    "temperature": 0.0,
    "top_p": 0.9,
    "repetition_penalty": 1.3,
    "max_new_tokens": 5,
    "do_sample": False,
    "eos_token_id": 3,
}


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("gen") / "qwen3"
    shutil.copytree(tiny_models["qwen3"], folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION))
    return str(folder)


def test_the_models_sampling_values_are_the_defaults(model):
    config = Config(model, device="cpu")
    assert config.sampling_defaults == {"temperature": 0.0, "top_p": 0.9, "repetition_penalty": 1.3, "max_tokens": 5}
    assert 3 in config.eos_token_ids
    assert Config(model, device="cpu", generation_config="vllm").sampling_defaults == {}
    tok = AutoTokenizer.from_pretrained(model)
    req = parse_completion({"prompt": "w5 w6"}, tok, 256, 512, defaults=config.sampling_defaults)
    p = req.params
    assert (p.temperature, p.top_p, p.repetition_penalty, p.max_tokens) == (0.0, 0.9, 1.3, 5)
    asked = parse_completion(
        {"prompt": "w5 w6", "temperature": 0.7, "max_tokens": 9}, tok, 256, 512, defaults=config.sampling_defaults
    ).params
    assert (asked.temperature, asked.max_tokens, asked.repetition_penalty) == (0.7, 9, 1.3)  # the body wins
    assert parse_completion({"prompt": "w5 w6"}, tok, 256, 512).params.max_tokens == 16  # vLLM's own


def test_offline_generate_without_params_uses_them(model):
    llm = LLM(model, num_kvcache_blocks=64)
    try:
        default = llm.generate([[5, 6, 7]])[0]
        explicit = llm.generate(
            [[5, 6, 7]], SamplingParams(temperature=0, top_p=0.9, repetition_penalty=1.3, max_tokens=5)
        )[0]
        assert default["token_ids"] == explicit["token_ids"] and len(default["token_ids"]) <= 5
    finally:
        llm.exit()
