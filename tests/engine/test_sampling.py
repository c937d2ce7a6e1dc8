"""Sampling parameters end to end: seeds, top-k/top-p, temperature, stop strings and stop tokens."""

import pytest
import torch

from nanoserve.engine_pod import LLM, InvalidRequestError, SamplingParams
from nanoserve.engine_pod.sampler import apply_top_k_top_p

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [100] * 20]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tiny_models, request):
    engine = LLM(tiny_models["qwen3"], num_kvcache_blocks=128, async_scheduling=request.param)
    yield engine
    engine.exit()


def tokens(llm, prompts, params):
    return [o["token_ids"] for o in llm.generate(prompts, params)]


def test_seeded_requests_reproduce_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, max_tokens=10, seed=1234, ignore_eos=True)
    alone = tokens(llm, [PROMPTS[0]], p)[0]
    in_batch = tokens(
        llm,
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
        [SamplingParams(temperature=1.0, max_tokens=7), p, SamplingParams(temperature=0.5, max_tokens=3)],
    )[1]
    assert alone == in_batch
    other_seed = tokens(llm, [PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=10, seed=99, ignore_eos=True))[0]
    assert other_seed != alone


def test_top_k_1_equals_greedy(llm):
    greedy = tokens(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    top1 = tokens(llm, PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_tokens=8, ignore_eos=True))
    assert greedy == top1


def test_sampling_is_not_greedy(llm):
    greedy = tokens(llm, [PROMPTS[0]] * 4, SamplingParams(temperature=0, max_tokens=12))
    sampled = tokens(llm, [PROMPTS[0]] * 4, SamplingParams(temperature=2.0, max_tokens=12))
    assert greedy[0] == greedy[3]
    assert len({tuple(s) for s in sampled}) > 1


def test_top_k_top_p_mask():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 10.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, -1, -1]), torch.tensor([1.0, 0.5, 0.9]))
    kept = torch.isfinite(out)
    assert kept.tolist() == [
        [True, True, False, False],  # top-2
        [True, False, False, False],  # p(4.0) = 0.64 >= 0.5 on its own
        [False, False, False, True],
    ]  # the 10.0 logit alone holds > 0.9
    assert torch.equal(out[kept], logits[kept])


def test_stop_string_cuts_text(llm):
    full = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10))[0]
    words = full["text"].split()
    stop = words[3]
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=10, stop=[stop]))[0]
    assert out["finish_reason"] == "stop"
    assert stop not in out["text"]
    assert full["text"].startswith(out["text"])
    assert out["text"].split() == words[: words.index(stop)]


def test_stop_token_ids_and_max_tokens(llm):
    full = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=10))[0]
    assert full["finish_reason"] == "length" and len(full["token_ids"]) == 10
    stop_at = full["token_ids"][4]
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))[0]
    assert out["finish_reason"] == "stop"
    assert out["token_ids"] == full["token_ids"][: full["token_ids"].index(stop_at) + 1]


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_tokens=0), dict(max_tokens=-3), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)],
)
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_top_k_zero_is_off_as_in_vllm():
    assert SamplingParams(top_k=0).top_k == SamplingParams().top_k == -1
    assert SamplingParams().max_tokens == 16  # vLLM's default
