"""Logits processing (logit bias, allowed ids, bad words, min_tokens, penalties, min_p) against transformers'
own logits processors on the same logits, with the newest token on the host or still on the device; and
end to end: greedy generation with a repetition penalty / bad words / min_tokens equals transformers'."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from nanoserve.engine_pod import LLM, SamplingParams
from nanoserve.engine_pod.logits_processing import apply_processing, processing_inputs
from nanoserve.engine_pod.sampler import apply_min_p
from nanoserve.engine_pod.sequence import PLACEHOLDER, Sequence

VOCAB = 50


def processed(seqs: list[Sequence], logits: torch.Tensor, eos: list[int], prev=None) -> torch.Tensor:
    host = processing_inputs(seqs, eos)
    if host is None:
        return logits
    dev = {k: torch.from_numpy(v) for k, v in host.items()}
    return apply_processing(logits, dev, prev)


def sequence(prompt: list[int], output: list[int], pending: bool, **params) -> tuple[Sequence, torch.Tensor | None]:
    """A sequence whose last output token is, with `pending`, still a placeholder: the device has it at row 1 of
    the previous step's tokens."""
    seq = Sequence(prompt, SamplingParams(**params))
    seq.token_ids += output
    prev = None
    if pending and output:
        prev = torch.tensor([7, output[-1], 3])
        seq.token_ids[-1] = PLACEHOLDER
        seq.num_pending, seq.pending_row = 1, 1
    return seq, prev


tokens = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(prompt=tokens, output=tokens, pending=st.booleans(), penalty=st.floats(0.3, 3.0), seed=st.integers(0, 99))
def test_repetition_penalty_equals_transformers(prompt, output, pending, penalty, seed):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(seed))
    seq, prev = sequence(prompt, output, pending, repetition_penalty=penalty)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(processed([seq], logits, [], prev), expected)


@settings(max_examples=60, deadline=None)
@given(prompt=tokens, output=tokens, pending=st.booleans(), presence=st.floats(-2, 2), frequency=st.floats(-2, 2))
def test_presence_and_frequency_penalties_follow_openai_formula(prompt, output, pending, presence, frequency):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(len(output)))
    seq, prev = sequence(prompt, output, pending, presence_penalty=presence, frequency_penalty=frequency)
    counts = torch.bincount(torch.tensor(output), minlength=VOCAB).float()  # the output only, not the prompt
    expected = logits - frequency * counts - presence * (counts > 0).float()
    torch.testing.assert_close(processed([seq], logits, [], prev), expected)


@settings(max_examples=60, deadline=None)
@given(
    output=tokens,
    pending=st.booleans(),
    words=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3), min_size=1, max_size=4),
)
def test_bad_words_equal_transformers(output, pending, words):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(len(words)))
    seq, prev = sequence([1, 2], output, pending)
    seq.bad_words_ids = words
    # transformers matches against all the ids it is given: the output alone is what vLLM compares to.
    expected = NoBadWordsLogitsProcessor(words, eos_token_id=[VOCAB + 1])(torch.tensor([output]), logits.clone())
    assert torch.equal(processed([seq], logits, [], prev).isinf(), expected.isinf())


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.randn(1, VOCAB)
    for done in range(5):
        seq, _ = sequence([1, 2, 3], list(range(10, 10 + done)), False, min_tokens=3, max_tokens=8, stop_token_ids=[9])
        expected = MinNewTokensLengthLogitsProcessor(3, 3, eos_token_id=[0, 9])(
            torch.tensor([seq.token_ids]), logits.clone()
        )
        assert torch.equal(processed([seq], logits, [0]), expected)


def test_logit_bias_equals_sequence_bias_and_is_clamped():
    logits = torch.randn(2, VOCAB)
    seq, _ = sequence([1], [], False, logit_bias={"3": 5.0, 7: -250})
    other, _ = sequence([1], [], False)
    expected = SequenceBiasLogitsProcessor({(3,): 5.0, (7,): -100.0})(torch.tensor([[1]]), logits[1:].clone())
    out = processed([other, seq], logits, [])
    assert torch.equal(out[0], logits[0])  # a row without processing is untouched
    torch.testing.assert_close(out[1:], expected)


def test_allowed_token_ids_leave_only_them():
    logits = torch.randn(3, VOCAB)
    seqs = [sequence([1], [], False, allowed_token_ids=ids)[0] for ids in ([4, 9], None, [0])]
    out = processed(seqs, logits, [])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [4, 9]
    assert torch.equal(out[1], logits[1])
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [0]


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9])
def test_min_p_equals_transformers(min_p):
    scaled = torch.randn(4, VOCAB) * 3
    out = apply_min_p(scaled, torch.full((4,), min_p))
    expected = MinPLogitsWarper(min_p)(None, scaled.clone()) if min_p else scaled
    assert torch.equal(out.isinf(), expected.isinf())


# ---- end to end, greedy, against transformers' generate -----------------------------------------------
PROMPTS = [[5, 6, 7, 5, 6, 7], [9, 10, 11, 12, 13, 14, 9, 10], [100] * 20]


@pytest.fixture(scope="module")
def hf_model(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], dtype=torch.float32).eval()


def hf_generate(model, prompt, max_tokens, **options) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, **options
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_with_repetition_penalty_equals_transformers(tiny_models, hf_model, async_scheduling):
    llm = LLM(tiny_models["qwen3"], num_kvcache_blocks=64, async_scheduling=async_scheduling)
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8)
        plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        outs = llm.generate(PROMPTS + PROMPTS[:1], [params] * len(PROMPTS) + [plain])
        assert [o["token_ids"] for o in outs[:-1]] == [
            hf_generate(hf_model, p, 16, repetition_penalty=1.8) for p in PROMPTS
        ]
        assert outs[-1]["token_ids"] == hf_generate(hf_model, PROMPTS[0], 16)  # its neighbour is unaffected
        assert outs[0]["token_ids"] != outs[-1]["token_ids"]  # the penalty changed something
        # A bad word taken from the greedy output itself: it must no longer appear.
        greedy = outs[-1]["token_ids"]
        word = greedy[3:5]
        text = llm.tokenizer.decode(word)
        banned = llm.generate(
            [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, bad_words=[text])
        )[0]["token_ids"]
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        assert not any(banned[i : i + len(ids)] == ids for i in range(len(banned)))
        assert banned[:3] == greedy[:3]
    finally:
        llm.exit()
