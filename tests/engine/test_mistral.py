"""Mistral (a window on every layer, 8 here, well inside these sequences) through the paths the other
architectures take: preemption with prefix-cache hits, and TP=2 (gloo). Greedy and chunked prefill parity:
tests/engine/test_rope_scaling.py."""

import pytest
from parity import MAX_TOKENS, engine_greedy, hf_greedy, preempted_greedy, random_prompts
from tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = build_tiny_model(str(tmp_path_factory.mktemp("mistral") / "m"), "mistral", sliding_window=8, head_dim=32)
    prompts = random_prompts(240, [3, 19, 44, 70], seed=8)
    return path, prompts, hf_greedy(path, prompts, MAX_TOKENS)


def test_preemption_and_prefix_cache(case):
    path, prompts, expected = case
    tokens, preemptions, hits = preempted_greedy(path, prompts, num_blocks=12)
    assert preemptions > 0 and hits > 0
    assert tokens == expected + expected[2:]


def test_tp2_equals_transformers(case):
    path, prompts, expected = case
    assert engine_greedy(path, prompts, tensor_parallel_size=2, max_num_batched_tokens=32) == expected
