"""Async scheduling (step N+1 scheduled while step N runs, its sampled tokens applied one step later)
gives exactly what synchronous scheduling gives, and loses nothing when a request ends mid-flight."""

import pytest
import torch

from nanoserve.engine_pod import LLM, SamplingParams
from nanoserve.engine_pod.sequence import PLACEHOLDER

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [100] * 20, list(range(30, 70))]


def run(path, async_scheduling, prompts, params):
    llm = LLM(path, num_kvcache_blocks=64, kvcache_block_size=8, async_scheduling=async_scheduling)
    try:
        outs = llm.generate(prompts, params)
        assert not llm.has_unfinished()
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        return outs
    finally:
        llm.exit()


def test_stops_mid_flight_match_sync(tiny_models):
    path = tiny_models["qwen3"]
    greedy = run(path, False, PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    # Stop tokens that occur early: async has already scheduled the next step when it sees them.
    params = [SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[o["token_ids"][2]]) for o in greedy[:2]]
    params += [
        SamplingParams(temperature=0.8, seed=7, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    ]
    sync, overlapped = run(path, False, PROMPTS, params), run(path, True, PROMPTS, params)
    assert sync == overlapped
    assert [o["finish_reason"] for o in sync] == ["stop", "stop", "length", "length"]
    assert [len(o["token_ids"]) for o in sync[2:]] == [11, 1]


def test_tokens_arrive_one_step_later(tiny_models):
    llm = LLM(tiny_models["llama"], num_kvcache_blocks=32, async_scheduling=True)
    try:
        seq = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert llm.step() == []  # the prefill's token is still on its way...
        assert seq.token_ids[-1] == PLACEHOLDER
        ((got, token),) = llm.step()  # ...and arrives while the first decode step runs
        assert got is seq and seq.token_ids[3] == token != PLACEHOLDER
        while llm.has_unfinished():
            llm.step()
        assert seq.finish_reason == "length" and len(seq.completion_token_ids) == 3
        assert PLACEHOLDER not in seq.token_ids
    finally:
        llm.exit()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_mid_flight_leaves_nothing(tiny_models, async_scheduling):
    llm = LLM(tiny_models["qwen3"], num_kvcache_blocks=32, kvcache_block_size=4, async_scheduling=async_scheduling)
    try:
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        keep, drop = llm.add_request([1, 2, 3], params), llm.add_request([4, 5, 6, 7, 8], params)
        for _ in range(3):
            llm.step()
        llm.abort(drop.seq_id)
        assert drop.finish_reason == "abort" and PLACEHOLDER not in drop.token_ids
        while llm.has_unfinished():
            llm.step()
        assert len(keep.completion_token_ids) == 10 and PLACEHOLDER not in keep.token_ids
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    finally:
        llm.exit()


def test_warmup_step_stores_nothing(tiny_models):
    # The GPU warm-up (a full-size prefill and a sampling decode step) runs the ordinary step path; here on
    # CPU it must leave the cache and the next request's tokens untouched.
    llm = LLM(tiny_models["qwen3"], num_kvcache_blocks=32, max_num_batched_tokens=64, max_model_len=48)
    try:
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        llm.model_runner.kv_cache.zero_()  # allocated uninitialized: NaNs would never compare equal
        before = llm.generate([[3, 4, 5]], params)[0]["token_ids"]
        cache = llm.model_runner.kv_cache.clone()
        llm.model_runner.warmup()
        assert torch.equal(cache, llm.model_runner.kv_cache)
        assert llm.model_runner.prev_tokens is None
        assert llm.generate([[3, 4, 5]], params)[0]["token_ids"] == before
    finally:
        llm.exit()
