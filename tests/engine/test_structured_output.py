"""Structured output in the engine (xgrammar masks) on a tiny random model with a byte-level BPE tokenizer:
constrained completions always match their schema, regex, choice or grammar, at temperature 0 and 1,
batched with unconstrained requests (which stay token for token what they are alone), under preemption
and async scheduling; a grammar that allows everything changes no token."""

import json
import re

import pytest
import torch
from bpe_model import SCHEMA

from nanoserve.engine_pod import LLM, SamplingParams
from nanoserve.engine_pod.errors import GrammarProcessDied, InvalidRequestError
from nanoserve.engine_pod.structured_params import StructuredOutputsParams as SO

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

FREE = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def constrained(spec: SO, seeds=(None, 1, 2), max_tokens=300) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0 if s is None else 1.0, seed=s, max_tokens=max_tokens, structured_outputs=spec)
        for s in seeds
    ]


STEP_SHAPES = {  # each is the default somewhere: sync on CPU, the grammar process on CUDA
    "sync": {"async_scheduling": False},
    "pipelined": {"async_scheduling": True, "grammar_process": False},
    "process": {"async_scheduling": True, "grammar_process": True},
}


@pytest.fixture(scope="module", params=list(STEP_SHAPES))
def llm(bpe_model, request):
    """Every step shape: synchronous (mask before the forward); async scheduling's pipeline, its accepts and
    fill on the engine thread; the same pipeline with the matchers in the grammar process, which accepts and
    fills while the engine thread schedules the next step."""
    engine = LLM(bpe_model, num_kvcache_blocks=256, max_model_len=512, **STEP_SHAPES[request.param])
    yield engine
    engine.exit()


def no_grammar_left(llm) -> bool:
    """No constrained request in the engine's books, nor a matcher in its grammar process."""
    return not llm.constrained and (llm.grammar_process is None or llm.grammar_process.held()[0] == 0)


def check_json(outs, schema=SCHEMA):
    for o in outs:
        assert o["finish_reason"] == "stop", o
        jsonschema.validate(json.loads(o["text"]), schema)


def test_json_schema_batched_with_unconstrained(llm):
    alone = llm.generate(["hello", "abc xyz"], FREE)
    # (greedy with free whitespace, the slowest to finish, runs through the server in test_structured_server.py)
    params = (
        [FREE, FREE]
        + constrained(SO(json=SCHEMA, disable_any_whitespace=True))
        + constrained(SO(json=SCHEMA), seeds=(1, 2))
    )
    outs = llm.generate(["hello", "abc xyz"] + ["a person:"] * 5, params)
    assert [o["token_ids"] for o in outs[:2]] == [o["token_ids"] for o in alone]  # neighbours change nothing
    check_json(outs[2:])
    assert all(o["text"] == json.dumps(json.loads(o["text"])) for o in outs[2:5])  # no free whitespace
    assert no_grammar_left(llm) and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_choice_regex_grammar_and_json_object(llm):
    choices = ["yes", "no", "maybe never", 'a "quoted" \\ one']
    regex = r"[a-z]{3}-[0-9]{2,4}"
    grammar = 'root ::= "(" num (("+" | "*") num){0,3} ")"\nnum ::= [1-9] [0-9]{0,2}'
    lark = 'start: "(" NUM OP NUM ")"\nNUM: /[1-9][0-9]{0,2}/\nOP: "+" | "*"'  # Lark: no `::=` (as vLLM tells)
    params = (
        constrained(SO(choice=choices))
        + constrained(SO(regex=regex))
        + constrained(SO(grammar=grammar))
        + constrained(SO(json_object=True))
        + constrained(SO(grammar=lark))
    )
    outs = llm.generate(["pick one"] * len(params), params)
    assert all(o["finish_reason"] == "stop" for o in outs), outs
    texts = [o["text"] for o in outs]
    assert all(t in choices for t in texts[:3])
    assert all(re.fullmatch(regex, t) for t in texts[3:6]), texts[3:6]
    assert all(re.fullmatch(r"\([1-9][0-9]{0,2}([+*][1-9][0-9]{0,2}){0,3}\)", t) for t in texts[6:9]), texts[6:9]
    assert all(isinstance(json.loads(t), dict) for t in texts[9:12])
    assert all(re.fullmatch(r"\([1-9][0-9]{0,2}[+*][1-9][0-9]{0,2}\)", t) for t in texts[12:]), texts[12:]


def test_a_grammar_allowing_everything_changes_no_token(llm):
    prompts = ["hello", "abc", "x y z"]
    free = [SamplingParams(temperature=0, max_tokens=16)] + [SamplingParams(seed=s, max_tokens=16) for s in (3, 4)]
    anything = [
        SamplingParams(temperature=p.temperature, seed=p.seed, max_tokens=16, structured_outputs=SO(regex=r"[\s\S]*"))
        for p in free
    ]
    assert [o["token_ids"] for o in llm.generate(prompts, anything)] == [
        o["token_ids"] for o in llm.generate(prompts, free)
    ]


def test_all_allowing_mask_leaves_logits_alone():
    from nanoserve.engine_pod.structured_output import GrammarMask, apply_grammar_mask

    logits = torch.randn(3, 70)
    masked = logits.clone()
    apply_grammar_mask(masked, GrammarMask(torch.tensor([0, 2]).numpy(), torch.full((2, 3), -1, dtype=torch.int32)))
    assert torch.equal(masked, logits)
    bits = torch.zeros(1, 3, dtype=torch.int32)
    bits[0, 1] = 1 << 4  # token 36 only
    apply_grammar_mask(masked, GrammarMask(torch.tensor([1]).numpy(), bits))
    assert masked[1].argmax() == 36 and torch.isinf(masked[1]).sum() == 69 and torch.equal(masked[0], logits[0])


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [3, 1]])
def test_the_mask_refuses_exactly_what_xgrammar_refuses(rows):
    import numpy as np
    import xgrammar as xgr

    from nanoserve.engine_pod.structured_output import GrammarMask, apply_grammar_mask

    g = torch.Generator().manual_seed(len(rows))
    bits = torch.randint(-(2**31), 2**31 - 1, (len(rows), 4), dtype=torch.int32, generator=g)
    logits = torch.randn(4, 100, generator=g)
    ours, theirs = logits.clone(), logits.clone()
    apply_grammar_mask(ours, GrammarMask(np.asarray(rows), bits))
    full = torch.full((4, 4), -1, dtype=torch.int32)  # xgrammar's bitmask rows are the logits' rows
    full[rows] = bits
    xgr.apply_token_bitmask_inplace(theirs, full, vocab_size=100, indices=rows, backend="torch_native")
    assert torch.equal(ours, theirs) and torch.isinf(ours).any()


def test_preemption_async_scheduling_and_tp_give_the_same_valid_json(bpe_model, llm):
    specs = [SO(json=SCHEMA, disable_any_whitespace=True), SO(json_object=True, disable_any_whitespace=True)]
    # Unconstrained rows that outlive the constrained ones: async steps leave the constrained pipeline mid-run.
    params = (
        [FREE]
        + constrained(specs[0], max_tokens=48)
        + constrained(specs[1], seeds=(4,), max_tokens=48)
        + [
            SamplingParams(temperature=0, max_tokens=90, ignore_eos=True),
            SamplingParams(temperature=1.0, seed=9, max_tokens=70, ignore_eos=True),
        ]
    )
    if llm.config.async_scheduling:  # (the same comparisons from another reference would add nothing)
        pytest.skip("the sync engine's run is compared with every other step shape, preemption and TP")
    prompts = ["some prompt words"] * len(params)
    want = llm.generate(prompts, params)
    check_json(want[1:4])
    small = {"num_kvcache_blocks": 30, "kvcache_block_size": 4}
    for kw in (
        small,
        {"async_scheduling": True, "grammar_process": False},
        {**small, "async_scheduling": True, "grammar_process": False},
        {**small, "async_scheduling": True, "grammar_process": True},
        {"tensor_parallel_size": 2, "async_scheduling": True, "grammar_process": True},
    ):  # rank 0 masks and samples
        other = LLM(bpe_model, max_model_len=512, **{"num_kvcache_blocks": 256, "async_scheduling": False, **kw})
        try:
            assert other.generate(prompts, params) == want
            if "kvcache_block_size" in kw:
                assert other.scheduler.num_preemptions > 0
            assert no_grammar_left(other) and other.block_manager.num_free_blocks == other.block_manager.num_blocks
        finally:
            other.exit()


def test_invalid_constraints_name_their_field(llm):
    for spec, words in (
        (SO(json={"type": "nope"}, param="response_format"), "Unsupported type"),
        (SO(regex="a((", param="guided_regex"), "parenthesis"),
        (SO(grammar="root ::= foo"), "not defined"),
    ):
        with pytest.raises(InvalidRequestError, match=words) as e:
            llm.make_sequence("hi", SamplingParams(structured_outputs=spec))
        assert e.value.param == spec.param
    with pytest.raises(InvalidRequestError, match="exactly one"):
        SO(regex="a", choice=["b"])


@pytest.mark.parametrize("shape", list(STEP_SHAPES))
def test_a_grammar_the_vocabulary_cannot_spell_ends_the_request_with_no_token(tiny_models, shape):
    llm = LLM(tiny_models["qwen3"], num_kvcache_blocks=32, **STEP_SHAPES[shape])  # words w0..w255
    try:
        free, json_object = llm.generate(
            [[5, 6], [7, 8]], [FREE, SamplingParams(structured_outputs=SO(json_object=True))]
        )
        assert free["finish_reason"] == "length" and len(free["token_ids"]) == 12
        assert json_object == {"text": "", "token_ids": [], "finish_reason": "abort"}
        assert no_grammar_left(llm) and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    finally:
        llm.exit()


def _schemas():
    """Random JSON schemas whose every instance is short (bounded strings, integers, arrays, depth), so that a
    random model always closes them within max_tokens: what fails is the mask, not the budget."""
    from hypothesis import strategies as st

    names = st.sampled_from(["a", "b", "id", "name", "x_y", "k9"])
    leaves = st.one_of(
        st.builds(
            lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
            st.integers(-50, 50),
            st.integers(0, 500),
        ),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(lambda n: {"type": "string", "pattern": f"^[a-z]{{1,{n}}}$"}, st.integers(1, 6)),
        st.lists(st.sampled_from(["red", "x y", 'q"t', 3, True, None]), min_size=1, max_size=3, unique=True).map(
            lambda values: {"enum": values}
        ),
    )

    def containers(inner):
        props = st.dictionaries(names, inner, min_size=1, max_size=3)
        return st.one_of(
            st.builds(
                lambda p, data: {
                    "type": "object",
                    "properties": p,
                    "additionalProperties": False,
                    "required": data.draw(st.lists(st.sampled_from(sorted(p)), unique=True)),
                },
                props,
                st.data(),
            ),
            st.builds(
                lambda item, lo, extra: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + extra},
                inner,
                st.integers(0, 2),
                st.integers(0, 1),
            ),
            st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
        )

    return st.recursive(leaves, containers, max_leaves=6)


def test_random_schemas_always_give_valid_json(llm):  # 210 schemas
    if llm.config.async_scheduling and not llm.config.grammar_process:
        pytest.skip("inline masks are the sync step's code; the other tests run them in the pipeline")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=7, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(_schemas(), min_size=30, max_size=30), st.integers(0, 2**16))
    def batch(schemas, seed):  # 30 schemas a batch, each sampled at temperature 1 with its own seed
        params = [
            SamplingParams(
                temperature=1.0,
                seed=seed + i,
                max_tokens=400,
                structured_outputs=SO(json=s, disable_any_whitespace=i % 2 == 0),
            )
            for i, s in enumerate(schemas)
        ]
        for schema, out in zip(schemas, llm.generate(["json:"] * len(schemas), params)):
            check_json([out], schema)

    batch()
    assert no_grammar_left(llm) and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_aborted_constrained_requests_leave_no_grammar_or_block(llm):
    seqs = [llm.add_request("a person:", p) for p in constrained(SO(json=SCHEMA), seeds=(1, 2, 3))]
    for _ in range(3):
        llm.step()
    assert llm.constrained == {s.seq_id for s in seqs}
    for s in seqs:
        llm.abort(s.seq_id)
    assert not llm.constrained
    for _ in range(2):  # the pipeline's launched steps drain, yielding nothing for the aborted requests
        if llm.has_unfinished():
            assert llm.step() == []
    assert not llm.has_unfinished()
    assert no_grammar_left(llm) and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


@pytest.mark.parametrize("grammar_process", [False, True])
def test_constrained_steps_overlap_under_async_scheduling(bpe_model, grammar_process):
    """A mask needs the previous token, but the next forward does not: each step's forward is launched
    before the previous step is sampled (its mask is filled while the next step is scheduled)."""
    shape = {"async_scheduling": True, "grammar_process": grammar_process}
    llm = LLM(bpe_model, max_model_len=512, num_kvcache_blocks=64, **shape)
    try:
        seq = llm.add_request("a person:", constrained(SO(json=SCHEMA))[0])
        assert llm.step() == [] and llm.unsampled is not None  # the prefill ran; its sampling waits
        assert llm.step() == [] and llm.in_flight is not None and llm.unsampled is not None  # sampled; next runs
        assert [s for s, _ in llm.step()] == [seq] and llm.unsampled is not None
        while llm.has_unfinished():
            llm.step()
        check_json([{"text": llm.decode(seq), "finish_reason": seq.finish_reason}])
    finally:
        llm.exit()


def test_a_dead_grammar_process_fails_the_step(bpe_model):
    """The grammar process killed mid-run: the next step that needs a mask raises (the engine core then fails
    every request with it) instead of waiting for a reply that never comes."""
    llm = LLM(bpe_model, max_model_len=512, num_kvcache_blocks=64, async_scheduling=True, grammar_process=True)
    try:
        for params in constrained(SO(json=SCHEMA), seeds=(1, 2)):
            llm.add_request("a person:", params)
        for _ in range(3):
            llm.step()
        llm.grammar_process.process.kill()
        with pytest.raises(GrammarProcessDied, match=r"exited \(signal SIGKILL\)"):
            for _ in range(3):
                llm.step()
    finally:
        llm.exit()  # no hang on the dead process either


def test_a_grammar_reply_never_read_is_not_taken_for_the_next(bpe_model):
    """A step that raised after it sent its grammar work leaves that reply unread: the next step reads past
    it, so the run goes on as if that step had never been (the same tokens as a run without it)."""
    params = constrained(SO(json=SCHEMA, disable_any_whitespace=True), seeds=(None, 3))
    llm = LLM(bpe_model, max_model_len=512, num_kvcache_blocks=64, async_scheduling=True, grammar_process=True)
    try:
        want = [o["token_ids"] for o in llm.generate(["a person:"] * 2, params)]
        seqs = [llm.add_request("a person:", p) for p in params]
        for _ in range(4):
            llm.step()
        llm._mask(seqs, [])  # its work sent, its reply never read (no token to accept: no state changes)
        while llm.has_unfinished():
            llm.step()
        assert [s.completion_token_ids for s in seqs] == want
    finally:
        llm.exit()


def test_the_grammar_process_keeps_as_many_grammars_as_the_cache(bpe_model, monkeypatch):
    """More distinct grammars than it keeps, in one step and then again: each evicted one is sent anew when a
    request needs it, its matchers outlive its eviction, and every output still matches its own regex."""
    import nanoserve.engine_pod.grammar_process as gp

    monkeypatch.setattr(gp, "CACHE_SIZE", 2)
    patterns = [f"[a-z]{{2}}-[0-9]{{{k}}}" for k in range(1, 6)]
    llm = LLM(bpe_model, max_model_len=512, num_kvcache_blocks=128, async_scheduling=True, grammar_process=True)
    try:
        for order in (patterns, patterns[::-1] + patterns[:1]):
            params = [
                SamplingParams(temperature=1.0, seed=i, n=2, max_tokens=40, structured_outputs=SO(regex=p))
                for i, p in enumerate(order)
            ]
            for pattern, out in zip(order, llm.generate(["code"] * len(order), params)):
                assert all(re.fullmatch(pattern, o["text"]) for o in out["outputs"]), (pattern, out)
        assert llm.grammar_process.held() == (0, 2)
    finally:
        llm.exit()
