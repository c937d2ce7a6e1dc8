"""Greedy tokens equal Hugging Face transformers (float32, CPU) on the same weights, under every
scheduling shape: plain, chunked prefill mixed with decode, prefix caching on and off, preemption."""

import pytest
from parity import MAX_TOKENS, engine_greedy, hf_greedy, random_prompts

from nanoserve.engine_pod import LLM, SamplingParams


@pytest.fixture(scope="module")
def cases(tiny_models):
    """Per architecture: prompts of mixed lengths (1 token up to several blocks) and HF's greedy tokens."""
    out = {}
    for arch, path in tiny_models.items():
        prompts = random_prompts(240, [1, 5, 16, 17, 40, 77], seed=len(arch))
        out[arch] = (path, prompts, hf_greedy(path, prompts, MAX_TOKENS))
    return out


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batch_matches_transformers(cases, arch, async_scheduling):
    path, prompts, expected = cases[arch]
    assert engine_greedy(path, prompts, async_scheduling=async_scheduling) == expected


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_one_at_a_time_matches_transformers(cases, arch):
    path, prompts, expected = cases[arch]
    assert [engine_greedy(path, [p])[0] for p in prompts[:3]] == expected[:3]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_chunked_prefill_mixed_with_decode(cases, arch, async_scheduling):
    # 24 tokens a step: long prompts are cut into chunks that share steps with other sequences' decodes.
    path, prompts, expected = cases[arch]
    assert (
        engine_greedy(path, prompts, max_num_batched_tokens=24, kvcache_block_size=8, async_scheduling=async_scheduling)
        == expected
    )


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_few_seats_and_odd_block_size(cases, async_scheduling):
    path, prompts, expected = cases["qwen3"]
    assert (
        engine_greedy(path, prompts, max_num_seqs=2, kvcache_block_size=5, async_scheduling=async_scheduling)
        == expected
    )


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_preemption_matches_unconstrained(cases, arch, async_scheduling):
    # 14 blocks of 8 tokens cannot hold six sequences of up to 89 tokens: sequences get preempted.
    path, prompts, expected = cases[arch]
    llm = LLM(path, num_kvcache_blocks=14, kvcache_block_size=8, async_scheduling=async_scheduling)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert llm.scheduler.num_preemptions > 0
        assert [o["token_ids"] for o in outs] == expected
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    finally:
        llm.exit()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefix_caching_off_gives_same_tokens(cases, async_scheduling):
    path, prompts, expected = cases["qwen2"]
    assert engine_greedy(path, prompts, enable_prefix_caching=False, async_scheduling=async_scheduling) == expected
