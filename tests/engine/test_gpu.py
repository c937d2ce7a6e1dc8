"""On a GPU (skipped without CUDA): the engine in bf16 with Triton kernels and CUDA graphs against
Hugging Face transformers on the same random Qwen3 weights, and its fast paths against its slow ones."""

import dataclasses
import random

import pytest
import torch
from tiny_models import GPU_QWEN3

from nanoserve.engine_pod import LLM, SamplingParams
from nanoserve.engine_pod.random_model import save_random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIG = GPU_QWEN3
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_random_model(str(tmp_path_factory.mktemp("gpu") / "qwen3"), CONFIG, seed=3, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(5)
    return [[rng.randrange(1000) for _ in range(n)] for n in (1, 9, 16, 100, 300)]


def engine_tokens(path, prompts, **kw):
    llm = LLM(path, **{"max_model_len": 1024, "num_kvcache_blocks": 512, **kw})
    try:
        assert llm.config.device == "cuda" and llm.config.dtype == "bfloat16"
        return [o["token_ids"] for o in llm.generate(prompts, GREEDY)]
    finally:
        llm.exit()


def test_first_tokens_and_logprobs_match_transformers(model_path, prompts):
    """The first token's top-20 logprobs (the engine's raw logits, through the public API) against
    transformers' bf16 forward on the same weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(model_path, max_model_len=1024, num_kvcache_blocks=512)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=20))
        for p, out in zip(prompts, outs):
            with torch.inference_mode():
                ref = hf(torch.tensor([p], device="cuda")).logits[0, -1].float().log_softmax(-1)
            first = out["logprobs"][0]
            assert out["token_ids"][0] == ref.argmax().item() and first.rank == 1
            ids = [t for t, _ in first.top]
            ours = torch.tensor([lp for _, lp in first.top])
            assert (ours - ref[ids].cpu()).abs().max().item() < 0.1
    finally:
        llm.exit()


def test_graphs_eager_and_reference_backends_agree(model_path, prompts):
    graphs = engine_tokens(model_path, prompts)
    eager = engine_tokens(model_path, prompts, enforce_eager=True)
    reference = engine_tokens(model_path, prompts, attention_backend="torch")
    # bf16 rounding differs between kernels: the first tokens must agree, later ones may drift.
    assert [g[:2] for g in graphs] == [e[:2] for e in eager] == [r[:2] for r in reference]
    agree = sum(a == b for g, e in zip(graphs, eager) for a, b in zip(g, e))
    assert agree >= 0.9 * sum(map(len, graphs))


def test_async_and_sync_scheduling_agree_on_gpu(model_path, prompts):
    assert engine_tokens(model_path, prompts) == engine_tokens(model_path, prompts, async_scheduling=False)


def test_seeded_sampling_on_gpu_ignores_the_batch(model_path, prompts):
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    llm = LLM(model_path, max_model_len=1024, num_kvcache_blocks=512)
    try:
        alone = llm.generate([prompts[3]], seeded)[0]["token_ids"]
        others = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)
        batch = llm.generate(prompts, [seeded if i == 3 else others for i in range(len(prompts))])
        assert batch[3]["token_ids"] == alone
        assert len({tuple(o["token_ids"]) for o in batch}) == len(prompts)
    finally:
        llm.exit()


def test_chunked_prefill_and_small_blocks_on_gpu(model_path, prompts):
    base = engine_tokens(model_path, prompts)
    chunked = engine_tokens(model_path, prompts, max_num_batched_tokens=64, kvcache_block_size=32)
    assert [g[:2] for g in base] == [c[:2] for c in chunked]


def test_sampling_options_on_gpu(model_path, prompts):
    """Logprobs are lossless and close to transformers'; penalties and bad words read the newest token on the
    device under async scheduling exactly as the host has it under sync; n equals seeded requests."""
    from transformers import AutoModelForCausalLM

    processed = SamplingParams(
        temperature=0,
        max_tokens=16,
        ignore_eos=True,
        repetition_penalty=1.5,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        bad_words=["w1 w2"],
        min_p=0.1,
    )
    outs = {}
    for async_scheduling in (True, False):
        llm = LLM(model_path, max_model_len=1024, num_kvcache_blocks=512, async_scheduling=async_scheduling)
        try:
            outs[async_scheduling] = [o["token_ids"] for o in llm.generate(prompts, processed)]
            if not async_scheduling:
                continue
            plain = [o["token_ids"] for o in llm.generate(prompts, GREEDY)]
            scored = llm.generate(
                prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=1)
            )
            assert [o["token_ids"] for o in scored] == plain  # logprobs change nothing
            seeded = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=7)
            fanned = llm.generate(
                [prompts[2]], SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=7, n=3)
            )[0]["outputs"]
            single = [llm.generate([prompts[2]], dataclasses.replace(seeded, seed=7 + j))[0] for j in range(3)]
            assert [o["token_ids"] for o in fanned] == [o["token_ids"] for o in single]
        finally:
            llm.exit()
    assert outs[True] == outs[False]
    assert outs[True] != plain
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    for prompt, out in zip(prompts[1:3], scored[1:3]):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt + out["token_ids"]])).logits[0].log_softmax(-1)
        first = expected[len(prompt) - 1, out["token_ids"][0]].item()
        assert out["logprobs"][0].logprob == pytest.approx(first, abs=0.1)  # bf16 against float32
        assert out["logprobs"][0].rank == 1 and out["logprobs"][0].top[0][0] == out["token_ids"][0]
        assert len(out["prompt_logprobs"]) == len(prompt)
        second = expected[0, prompt[1]].item()
        assert out["prompt_logprobs"][1].logprob == pytest.approx(second, abs=0.1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "graphs"])  # eager first: tells a
def test_tp2_matches_tp1_on_gpu(model_path, prompts, enforce_eager):  # capture hang apart
    one = engine_tokens(model_path, prompts)
    two = engine_tokens(model_path, prompts, tensor_parallel_size=2, enforce_eager=enforce_eager)
    assert [o[:2] for o in one] == [t[:2] for t in two]


def test_json_schema_on_gpu_is_valid_json(bpe_model):
    """Structured output with the mask applied on the GPU (bf16 logits, CUDA graphs, async scheduling on for
    the unconstrained neighbour before and after): valid JSON, and the neighbour's tokens unchanged."""
    pytest.importorskip("xgrammar")
    import json
    import re

    from nanoserve.engine_pod.structured_params import StructuredOutputsParams

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    so = StructuredOutputsParams(json=schema)
    params = [GREEDY] + [
        SamplingParams(temperature=t, seed=s, max_tokens=300, structured_outputs=so)
        for t, s in ((0, None), (1.0, 1), (1.0, 2))
    ]
    llm = LLM(bpe_model, max_model_len=512, num_kvcache_blocks=256)
    try:
        assert llm.config.device == "cuda" and llm.config.async_scheduling
        alone = llm.generate(["hello"], GREEDY)[0]["token_ids"]
        outs = llm.generate(["hello"] + ["a person:"] * 3, params)
        assert outs[0]["token_ids"] == alone
        for o in outs[1:]:
            assert o["finish_reason"] == "stop", o
            value = json.loads(o["text"])  # the schema, checked by hand (the GPU image has no jsonschema)
            assert set(value) == {"name", "age"} and re.fullmatch("[a-z]{1,8}", value["name"]), value
            assert type(value["age"]) is int and 0 <= value["age"] <= 120, value
        assert not llm.constrained and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    finally:
        llm.exit()


def test_speculative_decoding_on_gpu(model_path, prompts):
    """n-gram drafts verified in their CUDA graphs beside graph-replayed decode steps, sync and async: greedy
    tokens agree with plain decoding (bf16: the verify chunk runs the prefill kernel, so later tokens may drift
    as between graphs and eager), drafts are proposed, seeded sampling with drafts repeats itself (sync),
    nothing leaks."""
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    repeated = [p[:40] * 3 for p in prompts[3:]] + prompts[:3]  # spans repeated: matches from the first step
    plain = engine_tokens(model_path, repeated)
    for async_scheduling in (False, True):
        llm = LLM(
            model_path,
            max_model_len=1024,
            num_kvcache_blocks=512,
            speculative_config=spec,
            async_scheduling=async_scheduling,
        )
        try:
            ours = [o["token_ids"] for o in llm.generate(repeated, GREEDY)]
            assert [o[:2] for o in ours] == [p[:2] for p in plain]
            agree = sum(a == b for o, p in zip(ours, plain) for a, b in zip(o, p))
            assert agree >= 0.9 * sum(map(len, plain))
            assert llm.spec_stats.num_drafts > 0
            assert llm.model_runner.verify_graphs is not None and len(llm.model_runner.verify_graphs.graphs) > 1
            seeded = SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=16, ignore_eos=True)
            first, again = (llm.generate(repeated, seeded) for _ in range(2))
            if not async_scheduling:  # (async: which steps look for drafts depends on the run before)
                assert [o["token_ids"] for o in first] == [o["token_ids"] for o in again]
            assert all(len(o["token_ids"]) == 16 for o in first)
            assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        finally:
            llm.exit()


def test_engines_one_after_another_in_one_process_get_the_memory_back(model_path, prompts):
    # The KV cache is sized from the free memory (gpu_memory_utilization): each exit must hand its cache,
    # weights and graphs back, or the next engine finds no memory (bench/fp8_kv_accuracy.py did).
    sizes = []
    for _ in range(2):
        llm = LLM(model_path, max_model_len=1024, gpu_memory_utilization=0.6)
        try:
            sizes.append(llm.block_manager.num_blocks)
            assert [o["token_ids"] for o in llm.generate(prompts[:2], GREEDY)]
        finally:
            llm.exit()
    assert sizes[1] >= 0.95 * sizes[0]


def test_a_worker_forked_by_the_forkserver_can_use_cuda_after_rank_0_did():
    # TP workers fork from a forkserver that imported the model code: that import must not initialize CUDA
    # (a forked child could not use it), whatever rank 0 has done with CUDA by then.
    from nanoserve.engine_pod.tp_workers import worker_context

    torch.ones(1, device="cuda")
    proc = worker_context().Process(target=torch.cuda.init)  # raises in a child that cannot use CUDA
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0
