"""Scheduling policies: first-come first-served by default; `priority` runs lower values first and
preempts the least important running request first."""

import pytest

from nanoserve.engine_pod import LLM, SamplingParams


def finish_order(llm, params_list):
    seqs = [llm.add_request([10 + i, 11, 12], p) for i, p in enumerate(params_list)]
    order = []
    while llm.has_unfinished():
        order += [seqs.index(s) for s, _ in llm.step() if s.is_finished]
    return order


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("policy, order", [("fcfs", [0, 1, 2]), ("priority", [1, 2, 0])])
def test_one_seat_runs_in_policy_order(tiny_models, policy, order, async_scheduling):
    llm = LLM(
        tiny_models["qwen3"],
        num_kvcache_blocks=32,
        max_num_seqs=1,
        scheduling_policy=policy,
        async_scheduling=async_scheduling,
    )
    try:
        params = [SamplingParams(max_tokens=3, priority=p, ignore_eos=True) for p in (5, 1, 3)]
        assert finish_order(llm, params) == order
    finally:
        llm.exit()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_priority_preempts_the_least_important(tiny_models, async_scheduling):
    # Two sequences that each grow to 4 blocks share 6 blocks: one must be preempted, and it must be
    # the one with the larger priority value even though it arrived first.
    llm = LLM(
        tiny_models["qwen3"],
        num_kvcache_blocks=6,
        kvcache_block_size=4,
        scheduling_policy="priority",
        async_scheduling=async_scheduling,
    )
    try:
        low = llm.add_request([1, 2, 3], SamplingParams(max_tokens=12, priority=9, ignore_eos=True))
        high = llm.add_request([4, 5, 6], SamplingParams(max_tokens=12, priority=0, ignore_eos=True))
        while llm.has_unfinished():
            llm.step()
        assert low.num_preemptions > 0 and high.num_preemptions == 0
        assert llm.block_manager.num_free_blocks == 6
    finally:
        llm.exit()


def test_decodes_share_steps_with_prefill_chunks(tiny_models):
    llm = LLM(tiny_models["qwen3"], num_kvcache_blocks=64, max_num_batched_tokens=16)
    try:
        short = llm.add_request([1, 2], SamplingParams(max_tokens=20, ignore_eos=True))
        llm.step()
        long = llm.add_request(list(range(3, 60)), SamplingParams(max_tokens=2, ignore_eos=True))
        mixed = 0
        while not long.num_completion_tokens:
            before_short = short.num_completion_tokens
            before_long = long.num_computed_tokens
            llm.step()
            if short.num_completion_tokens > before_short and long.num_computed_tokens > before_long:
                mixed += 1
        assert mixed >= 3  # 57 prompt tokens at <= 15 a step: every chunk step also decoded `short`
    finally:
        llm.exit()


def test_cpu_steps_are_bounded_by_default_so_a_long_prompt_cannot_stall_decodes(tiny_models):
    """On CPU one step takes at most CPU_BATCHED_TOKENS tokens (issue 16: a 4,000-token prompt held the engine
    for 36 s in one step while every other request waited)."""
    from nanoserve.engine_pod.config import CPU_BATCHED_TOKENS

    llm = LLM(tiny_models["qwen3"], device="cpu", num_kvcache_blocks=128)
    try:
        assert llm.scheduler.max_num_batched_tokens == CPU_BATCHED_TOKENS
        short = llm.add_request([1, 2], SamplingParams(max_tokens=20, ignore_eos=True))
        llm.step()
        long = llm.add_request([5] * (3 * CPU_BATCHED_TOKENS), SamplingParams(max_tokens=1, ignore_eos=True))
        while not long.num_completion_tokens:
            before_short, before_long = short.num_completion_tokens, long.num_computed_tokens
            llm.step()
            assert long.num_computed_tokens - before_long < CPU_BATCHED_TOKENS
            assert short.num_completion_tokens == before_short + 1  # the decode never waited
    finally:
        llm.exit()
