"""Logprobs equal transformers' float32 log_softmax; n completions of a prompt equal n seeded requests and share
the prompt's KV blocks; best_of keeps the completions with the best logprob per token."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanoserve.engine_pod import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 60))]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tiny_models, request):
    engine = LLM(tiny_models["qwen3"], num_kvcache_blocks=128, async_scheduling=request.param)
    yield engine
    engine.exit()


@pytest.fixture(scope="module")
def hf_model(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], dtype=torch.float32).eval()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_equal_transformers_log_softmax(llm, hf_model, temperature):
    params = SamplingParams(
        temperature=temperature, max_tokens=8, ignore_eos=True, logprobs=5, seed=3, repetition_penalty=1.3
    )  # processing changes the draw, not the raw logprobs
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params)):
        ids = prompt + out["token_ids"]
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1)
        assert len(out["logprobs"]) == len(out["token_ids"]) == 8
        for step, (token, entry) in enumerate(zip(out["token_ids"], out["logprobs"])):
            row = expected[step]
            assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert entry.rank == int((row > row[token]).sum()) + 1
            top = row.topk(5)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_zero_gives_the_sampled_token_only(llm):
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3, logprobs=0, ignore_eos=True))[0]
    assert [e.top for e in out["logprobs"]] == [[], [], []]
    assert all(e.rank == 1 for e in out["logprobs"])  # greedy: the most likely token
    assert "logprobs" not in llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3))[0]


def test_n_equals_seeded_requests_and_shares_the_prompt_blocks(llm):
    bm = llm.block_manager
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=11, n=4)
    hits_before = bm.prefix_hits
    out = llm.generate([PROMPTS[1]], params)[0]
    hits = bm.prefix_hits - hits_before
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaked
    assert len(out["outputs"]) == 4 and out["token_ids"] == out["outputs"][0]["token_ids"]
    separate = [
        llm.generate([PROMPTS[1]], SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=11 + j))[0][
            "token_ids"
        ]
        for j in range(4)
    ]
    assert [o["token_ids"] for o in out["outputs"]] == separate
    assert len({tuple(s) for s in separate}) > 1
    # Children 2..4 found the first one's two full prompt blocks (40 tokens, blocks of 16) in the cache.
    assert hits >= 3 * 32


def test_n_in_a_batch_and_aborted_midway_frees_every_block(llm):
    bm = llm.block_manager
    params = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, n=3)
    seqs = [llm.add_request(PROMPTS[1], params.child(j)) for j in range(3)]
    for _ in range(3):
        llm.step()
    assert bm.num_free_blocks < bm.num_blocks
    for seq in seqs:
        llm.abort(seq.seq_id)
    while llm.has_unfinished():
        llm.step()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_best_of_keeps_the_best_logprob_per_token(llm):
    base = dict(temperature=1.5, max_tokens=6, ignore_eos=True, seed=21)
    out = llm.generate([PROMPTS[0]], SamplingParams(**base, n=2, best_of=5))[0]
    assert len(out["outputs"]) == 2 and "logprobs" not in out  # ranked by logprobs it did not ask for
    candidates = [
        llm.generate([PROMPTS[0]], SamplingParams(**{**base, "seed": 21 + j}, logprobs=0))[0] for j in range(5)
    ]
    means = [sum(e.logprob for e in c["logprobs"]) / 6 for c in candidates]
    order = sorted(range(5), key=lambda i: means[i], reverse=True)
    assert [o["token_ids"] for o in out["outputs"]] == [candidates[i]["token_ids"] for i in order[:2]]


def test_a_single_string_prompt_is_one_prompt(llm):
    out = llm.generate("w5 w6 w7", SamplingParams(temperature=0, max_tokens=4))
    assert (
        len(out) == 1
        and out[0]["token_ids"]
        == llm.generate(["w5 w6 w7"], SamplingParams(temperature=0, max_tokens=4))[0]["token_ids"]
    )


def test_prompt_logprobs_equal_transformers_chunked_and_after_a_cache_hit(tiny_models, hf_model):
    llm = LLM(tiny_models["qwen3"], num_kvcache_blocks=128, max_num_batched_tokens=24)  # 40 tokens: 2 chunks
    try:
        prompt = PROMPTS[1]
        llm.generate([prompt], SamplingParams(max_tokens=1))  # its blocks are cached now: scoring skips the cache
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))[0]
    finally:
        llm.exit()
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    scored = out["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(prompt)
    for position, entry in enumerate(scored[1:], 1):
        row = expected[position - 1]
        assert entry.logprob == pytest.approx(row[prompt[position]].item(), abs=1e-4)
        assert entry.rank == int((row > row[prompt[position]]).sum()) + 1
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
