"""The HF transformers parity harness: greedy tokens of transformers (float32, CPU) and of the engine on the
same model folder and prompts."""

import random

import torch
from transformers import AutoModelForCausalLM

from nanoserve.engine_pod import LLM, SamplingParams

MAX_TOKENS = 12


def hf_greedy(path: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens)
        outs.append(ids[0, len(p) :].tolist())
    return outs


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def engine_greedy(path: str, prompts, max_tokens=MAX_TOKENS, **kwargs) -> list[list[int]]:
    llm = LLM(path, **{"num_kvcache_blocks": 256, **kwargs})
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks  # nothing leaked
        return [o["token_ids"] for o in outs]
    finally:
        llm.exit()


def preempted_greedy(path: str, prompts, num_blocks: int, repeat_from: int = 2) -> tuple[list[list[int]], int, int]:
    """Greedy tokens of `prompts` + `prompts[repeat_from:]` (repeats that can hit the prefix cache) in a cache
    of `num_blocks` blocks of 8, small enough to preempt: (tokens, preemptions, prefix-cache hit tokens)."""
    llm = LLM(path, num_kvcache_blocks=num_blocks, kvcache_block_size=8)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate(prompts + prompts[repeat_from:], params)
        return [o["token_ids"] for o in outs], llm.scheduler.num_preemptions, llm.block_manager.prefix_hits
    finally:
        llm.exit()
