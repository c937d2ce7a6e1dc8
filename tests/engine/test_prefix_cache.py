"""Prefix caching through the engine: shared prefixes reuse blocks, count hits, change no token."""

import random

import pytest

from nanoserve.engine_pod import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_shared_prefix_reuses_blocks_and_keeps_tokens(tiny_models, async_scheduling):
    rng = random.Random(1)
    prefix = [rng.randrange(200) for _ in range(64)]  # 4 full blocks of 16
    a, b = prefix + [7, 8, 9], prefix + [10, 11]
    cold = LLM(tiny_models["llama"], num_kvcache_blocks=64, enable_prefix_caching=False)
    expected = [o["token_ids"] for o in cold.generate([a, b], GREEDY)]
    cold.exit()

    llm = LLM(tiny_models["llama"], num_kvcache_blocks=64, async_scheduling=async_scheduling)
    try:
        first = llm.generate([a], GREEDY)[0]["token_ids"]
        bm = llm.block_manager
        seq = llm.add_request(b, GREEDY)
        free_before = bm.num_free_blocks
        llm.step()
        # b's 66 tokens need 5 blocks; the 4 prefix blocks come from the cache, so only 1 is new.
        # (The 4 cached blocks were free, so they leave the free list too: 5 taken in all, 4 of them hits.)
        assert seq.num_cached_tokens == 64
        assert free_before - bm.num_free_blocks == 5
        assert bm.prefix_hits == 64
        while llm.has_unfinished():
            llm.step()
        assert [first, seq.completion_token_ids] == expected
    finally:
        llm.exit()


def test_concurrent_sharers_share_physical_blocks(tiny_models):
    prefix = list(range(10, 42))  # 2 blocks
    llm = LLM(tiny_models["qwen3"], num_kvcache_blocks=64)
    try:
        llm.generate([prefix + [1]], GREEDY)
        s1, s2 = llm.add_request(prefix + [2], GREEDY), llm.add_request(prefix + [3], GREEDY)
        llm.step()
        assert s1.block_table[:2] == s2.block_table[:2]
        assert all(llm.block_manager.blocks[b].ref_count == 2 for b in s1.block_table[:2])
        while llm.has_unfinished():
            llm.step()
        assert llm.block_manager.num_free_blocks == 64
    finally:
        llm.exit()


def test_whole_prompt_cached_still_computes_last_token(tiny_models):
    prompt = list(range(20, 52))  # exactly 2 blocks
    llm = LLM(tiny_models["qwen3"], num_kvcache_blocks=64)
    try:
        first = llm.generate([prompt], GREEDY)[0]["token_ids"]
        again = llm.generate([prompt], GREEDY)[0]["token_ids"]
        assert first == again
        assert llm.block_manager.prefix_hits == 16  # one block hit: the last token must be computed
    finally:
        llm.exit()


def test_cache_salt_separates_prefixes_and_changes_no_token(tiny_models):
    prompt = list(range(60, 93))  # 2 full blocks and one token
    llm = LLM(tiny_models["qwen3"], num_kvcache_blocks=64)
    try:

        def run(salt):
            seq = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, cache_salt=salt))
            while llm.has_unfinished():
                llm.step()
            return seq.num_cached_tokens, seq.completion_token_ids

        cached_a, tokens = run("a")
        assert cached_a == 0
        assert run("b") == (0, tokens) and run(None) == (0, tokens)  # other salts, or none, share nothing
        assert run("a") == (32, tokens)  # the same salt does
    finally:
        llm.exit()
