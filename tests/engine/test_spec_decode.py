"""N-gram speculative decoding in the engine: greedy tokens equal transformers' and plain decoding's (prompts with
repeated spans and without, chunked prefill, no prefix caching, preemption), stops hold at every accepted token,
sampling features that cannot speculate still decode right beside speculating rows, and rejected tokens' KV
leaves no block behind (aborts and preemption too) and no wrong prefix-cache entry."""

import multiprocessing
from collections import Counter

import pytest
from parity import engine_greedy, hf_greedy, random_prompts

from nanoserve.engine_pod import LLM, SamplingParams, model_runner
from nanoserve.engine_pod.errors import ConfigError
from nanoserve.engine_pod.spec_decode import LookPacing
from nanoserve.engine_pod.spec_verify import shift_back

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
MAX_TOKENS = 16


def repetitive_prompts(seed: int) -> list[list[int]]:
    """Spans repeated (an n-gram match in the prompt from the start) and plain random prompts."""
    spans = random_prompts(240, [6, 11, 3], seed=seed)
    return [spans[0] * 3, spans[1] * 2 + spans[0], spans[2] * 5] + random_prompts(240, [9, 20], seed=seed + 1)


@pytest.fixture(scope="module")
def case(tiny_models):
    path = tiny_models["qwen3"]
    prompts = repetitive_prompts(3)
    return path, prompts, hf_greedy(path, prompts, MAX_TOKENS)


@pytest.mark.parametrize(
    "setup",
    [
        {},
        {"max_num_batched_tokens": 24, "kvcache_block_size": 8},  # chunked prefill beside verify steps
        {"enable_prefix_caching": False, "kvcache_block_size": 4},
        {"num_kvcache_blocks": 14, "kvcache_block_size": 8},  # preemption
        {"async_scheduling": True},  # verify steps in flight, paced by what they gain (spec_decode.LookPacing)
        {"async_scheduling": True, "num_kvcache_blocks": 14, "kvcache_block_size": 8, "max_num_batched_tokens": 24},
    ],
    ids=["plain", "chunked", "no-prefix-cache", "preemption", "async", "async-preemption-chunked"],
)
def test_greedy_equals_transformers(case, setup):
    path, prompts, expected = case
    llm = LLM(path, **{"num_kvcache_blocks": 256, **setup, "speculative_config": SPEC})
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert [o["token_ids"] for o in outs] == expected
        stats = llm.spec_stats
        assert stats.num_draft_tokens > stats.num_accepted_tokens  # some drafts rejected
        # Accepted ones too; with async scheduling fewer steps look for drafts (spec_decode.LookPacing).
        assert stats.num_accepted_tokens > 0 or setup.get("async_scheduling")
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        if "num_kvcache_blocks" in setup:
            assert llm.scheduler.num_preemptions > 0
    finally:
        llm.exit()


@pytest.mark.parametrize(
    "setup",
    [{}, {"num_kvcache_blocks": 14, "kvcache_block_size": 8, "max_num_batched_tokens": 24}],
    ids=["async", "async-preemption-chunked"],
)
def test_verify_steps_stay_in_flight(case, setup, monkeypatch):
    """Async scheduling, every step looking for drafts: each step is launched behind a verify step still in
    flight, laid out as if that one accepted its whole draft, and the device moves it back by what it rejected
    (spec_verify.shift_back); greedy tokens still equal transformers', and no block is left behind."""
    monkeypatch.setattr(LookPacing, "due", lambda self: True)
    shifts: list[int] = []

    def counted(t, shift, block_size):
        shifts.append(int(shift.sum()))
        shift_back(t, shift, block_size)

    monkeypatch.setattr(model_runner, "shift_back", counted)
    path, prompts, expected = case
    llm = LLM(path, **{"num_kvcache_blocks": 256, **setup, "async_scheduling": True, "speculative_config": SPEC})
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert [o["token_ids"] for o in outs] == expected
        assert max(shifts) > 0 and llm.spec_stats.num_accepted_tokens > 0
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        if setup:
            assert llm.scheduler.num_preemptions > 0
    finally:
        llm.exit()


def test_warmup_runs_a_verify_step_and_stores_nothing(case, monkeypatch):
    """With speculative decoding the warm-up (run on CUDA at start) also verifies drafts and moves a step
    back, so their kernels load before the first request; it stores nothing in the KV cache, and the
    engine's tokens afterwards still equal transformers'."""
    calls: list[str] = []

    def spied(name, fn):
        def inner(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        monkeypatch.setattr(model_runner, name, inner)

    spied("verify", model_runner.verify)
    spied("shift_back", model_runner.shift_back)
    path, prompts, expected = case
    llm = LLM(path, num_kvcache_blocks=256, async_scheduling=True, speculative_config=SPEC)
    try:
        kv_cache = llm.model_runner.kv_cache
        kv_cache.fill_(0.5)  # (allocated uninitialized: a NaN in it would never compare equal)
        llm.model_runner.warmup()
        assert calls == ["verify", "shift_back"]
        assert bool((kv_cache == 0.5).all())
        kv_cache.zero_()
        assert llm.model_runner.prev_tokens is None and llm.model_runner.prev_shift is None
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert [o["token_ids"] for o in outs] == expected
    finally:
        llm.exit()


def test_stops_hold_at_every_accepted_token(case):
    """Stop tokens, stop strings and max_tokens picked at each position of the plain outputs: speculation ends
    each request on the same token with the same reason and text (never a token past the stop)."""
    path, prompts, expected = case
    params, batch = [], []
    for i, (prompt, out) in enumerate(zip(prompts, expected)):
        for m in range(1, MAX_TOKENS, 2):
            stop = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop_token_ids=[out[m]])
            length = SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
            text = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=[f"w{out[m]}"])
            params += [stop, length, text] if i < 3 else [stop]
            batch += [prompt] * (3 if i < 3 else 1)
    plain = engine_greedy_outputs(path, batch, params, {})
    spec = engine_greedy_outputs(path, batch, params, {"speculative_config": SPEC, "max_num_seqs": 16})
    assert spec == plain


def engine_greedy_outputs(path, prompts, params, kwargs):
    llm = LLM(path, num_kvcache_blocks=256, **kwargs)
    try:
        outs = llm.generate(prompts, params)
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        return [(o["token_ids"], o["finish_reason"], o["text"]) for o in outs]
    finally:
        llm.exit()


def test_features_that_do_not_speculate_decode_right_beside_drafts(case):
    """Logprobs, penalties, min_tokens and n > 1 next to speculating rows in the same verify steps: the same
    tokens (and logprobs) as without speculation; seeded sampling with drafts repeats itself."""
    path, prompts, _ = case
    greedy = dict(temperature=0, max_tokens=10, ignore_eos=True)
    params = [
        SamplingParams(**greedy),
        SamplingParams(**greedy, logprobs=2),
        SamplingParams(**greedy, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(**greedy, n=2),
        SamplingParams(temperature=0.9, top_k=8, max_tokens=10, ignore_eos=True, seed=5),
    ]

    def run(**kwargs):
        llm = LLM(path, num_kvcache_blocks=128, **kwargs)
        try:
            outs = llm.generate(prompts[: len(params)], params)
            assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
            return outs, llm.spec_stats.num_drafts
        finally:
            llm.exit()

    plain, _ = run()
    spec, drafts = run(speculative_config=SPEC)
    again, _ = run(speculative_config=SPEC, async_scheduling=True)
    assert drafts > 0
    for i in range(4):
        assert spec[i]["token_ids"] == plain[i]["token_ids"], i
    assert [o["token_ids"] for o in spec[3]["outputs"]] == [o["token_ids"] for o in plain[3]["outputs"]]
    for a, b in zip(spec[1]["logprobs"], plain[1]["logprobs"]):
        assert a.rank == b.rank and abs(a.logprob - b.logprob) < 1e-4
    assert spec[4]["token_ids"] == again[4]["token_ids"] and len(spec[4]["token_ids"]) == 10


def test_rollback_frees_blocks_through_aborts_and_preemption(case):
    """A tiny cache, step by step: no sequence holds a block past its tokens after a step, aborts and
    preemptions give every block back, and blocks hashed from speculated output hold the right KV (a prompt
    that extends a finished request's output by prefix-cache hits continues it the same way)."""
    path, prompts, expected = case
    llm = LLM(path, num_kvcache_blocks=20, kvcache_block_size=4, speculative_config=SPEC, max_num_batched_tokens=32)
    try:
        bm = llm.block_manager
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        seqs = [llm.add_request(p, greedy) for p in prompts]
        steps = 0
        while llm.has_unfinished():
            llm.step()
            steps += 1
            if steps == 4:
                llm.abort(seqs[1].seq_id)
            for seq in llm.scheduler.running:
                assert len(seq.block_table) <= bm.blocks_for(seq.num_tokens) and not seq.draft_ids
        assert llm.scheduler.num_preemptions > 0 and llm.spec_stats.num_accepted_tokens > 0
        assert bm.num_free_blocks == bm.num_blocks
        done = [s for s in seqs if s.finish_reason == "length"]
        assert [s.completion_token_ids for s in done] == [e for s, e in zip(seqs, expected) if s in done]
    finally:
        llm.exit()
    # Blocks hashed from speculated output hold the right KV: a prompt that extends a finished request's output
    # hits them in the prefix cache and continues it the same way.
    llm = LLM(path, num_kvcache_blocks=64, kvcache_block_size=4, speculative_config=SPEC)
    try:
        llm.generate(prompts[0], greedy)
        extended = prompts[0] + expected[0][:12]
        seq = llm.add_request(extended, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        while llm.has_unfinished():
            llm.step()
        assert seq.num_cached_tokens >= len(prompts[0]) + 8 and seq.completion_token_ids == expected[0][12:16]
    finally:
        llm.exit()


def test_engine_core_reports_counts_and_one_finish_per_request(case):
    """A verify step's several tokens reach the server as rows in order with the finish on the last one only,
    and the step's spec counts (vllm:spec_decode_* counters) travel with it."""
    from nanoserve.engine_pod.engine_core import EngineCore
    from nanoserve.engine_pod.metrics import EngineMetrics

    path, prompts, _ = case
    llm = LLM(path, num_kvcache_blocks=64, speculative_config=SPEC)
    theirs, ours = multiprocessing.Pipe(duplex=False)
    try:
        core = EngineCore(llm, ours)
        llm.add_request(prompts[2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        rows, spec = [], [0, 0, 0]
        while llm.has_unfinished():
            core._step()
            while theirs.poll():
                kind, *payload = theirs.recv()
                if kind == "step":
                    rows += payload[0].rows
                    spec = [a + b for a, b in zip(spec, payload[0].spec)]
        assert len(rows) == MAX_TOKENS and [r[2] for r in rows] == [None] * (MAX_TOKENS - 1) + ["length"]
        stats = llm.spec_stats
        assert spec == [stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens] and spec[2] > 0
    finally:
        llm.exit()
    metrics = EngineMetrics("m")
    metrics.labeled("spec_decode_num_accepted_tokens").inc(spec[2])
    text = __import__("prometheus_client").generate_latest(metrics.registry).decode()
    assert f'vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} {float(spec[2])}' in text


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_disable_by_batch_size_around_the_batch(case, async_scheduling):
    """Five requests at once: a threshold below them proposes no draft in any step (plain decoding's tokens, the
    overlap kept); one equal to them speculates as without it."""
    path, prompts, expected = case
    below = _steps_with_limit(path, prompts, len(prompts) - 1, async_scheduling)
    assert below["tokens"] == expected and below["lookups"] == below["drafts"] == 0
    assert below["over"] == below["crowded"] >= MAX_TOKENS - 1
    assert below["overlapped"] == (below["crowded"] if async_scheduling else 0)  # no crowded step drained
    at = _steps_with_limit(path, prompts, len(prompts), async_scheduling)
    assert at["tokens"] == expected and at["drafts"] > 0 and at["over"] == 0


def _steps_with_limit(path, prompts, limit, async_scheduling) -> dict:
    """Greedy requests at once under disable_by_batch_size `limit`, step by step: their tokens, the steps that
    started with all of them running, those counted over the limit, those scheduled while the step before's
    tokens were on the way (overlapped, not drained), and the lookups and drafts in all steps."""
    spec = {**SPEC, "disable_by_batch_size": limit}
    llm = LLM(path, num_kvcache_blocks=256, speculative_config=spec, async_scheduling=async_scheduling)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        seqs = [llm.add_request(p, greedy) for p in prompts]
        schedule, overlapped = llm.scheduler.schedule, []

        def spy(drafts: bool = True):  # a drained step is scheduled with no token of the step before pending
            overlapped.append(any(seq.num_pending for seq in llm.scheduler.running))
            return schedule(drafts)

        llm.scheduler.schedule = spy
        crowded = lookups = 0
        while llm.has_unfinished():
            crowded += len(llm.scheduler.running) == len(prompts)
            llm.step()
            lookups += llm.scheduler.lookups
        stats = llm.spec_stats
        return {
            "tokens": [s.completion_token_ids for s in seqs],
            "crowded": crowded,
            "over": stats.num_steps_over_batch_size,
            "overlapped": sum(overlapped),
            "lookups": lookups,
            "drafts": stats.num_drafts,
        }
    finally:
        llm.exit()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_drafting_resumes_as_the_batch_shrinks(case, async_scheduling):
    """disable_by_batch_size 1: while the short requests run, no step looks for drafts; once they finish, the
    long one (a prompt the model continues with a run of one token) drafts again and has them accepted, and
    every request's tokens are plain decoding's."""
    path, prompts, _ = case
    short = 4
    greedy = dict(temperature=0, ignore_eos=True)
    params = [SamplingParams(**greedy, max_tokens=MAX_TOKENS)]
    params += [SamplingParams(**greedy, max_tokens=short)] * (len(prompts) - 1)
    llm = LLM(path, num_kvcache_blocks=256)
    try:
        span = random_prompts(240, [12], seed=5)[0]
        batch = [span + llm.generate([span], SamplingParams(**greedy, max_tokens=20))[0]["token_ids"]] + prompts[1:]
        plain = [o["token_ids"] for o in llm.generate(batch, params)]
    finally:
        llm.exit()
    spec = {**SPEC, "disable_by_batch_size": 1}
    llm = LLM(path, num_kvcache_blocks=256, speculative_config=spec, async_scheduling=async_scheduling)
    try:
        seqs = [llm.add_request(p, sp) for p, sp in zip(batch, params)]
        crowded_steps = 0
        while llm.has_unfinished():
            running, drafts = len(llm.scheduler.running), llm.spec_stats.num_drafts
            llm.step()
            if running > 1:  # (a step with drafts is applied within it: its count is this step's)
                assert llm.scheduler.lookups == 0 and llm.spec_stats.num_drafts == drafts
                crowded_steps += 1
        stats = llm.spec_stats
        assert stats.num_steps_over_batch_size == crowded_steps >= short - 1 and stats.num_accepted_tokens > 0
        assert [s.completion_token_ids for s in seqs] == plain
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    finally:
        llm.exit()


def test_bad_speculative_config_names_the_field(tiny_models):
    with pytest.raises(ConfigError, match="speculative_config.num_speculative_tokens"):
        LLM(tiny_models["qwen3"], speculative_config={"method": "ngram", "num_speculative_tokens": 0})


def test_flag_reaches_the_engine_config():
    from nanoserve.cli import build_parser
    from nanoserve.engine_pod.cli import engine_kwargs

    text = '{"method": "ngram", "num_speculative_tokens": 2}'
    for command in ("serve", "generate"):
        args = build_parser().parse_args([command, "--speculative-config", text])
        assert engine_kwargs(args)["speculative_config"] == text


def test_plain_engine_unchanged_without_config(case):
    path, prompts, expected = case
    assert engine_greedy(path, prompts[:2], MAX_TOKENS) == expected[:2]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_tensor_parallel_verify_steps(case, async_scheduling, monkeypatch):
    """TP=2 (a spawned gloo worker): verify steps' (1 + k)-token chunks run on both ranks, rank 0 accepts;
    with async scheduling rank 0 also sends what each verify step rejected (the worker moves the next back)."""
    monkeypatch.setattr(LookPacing, "due", lambda self: True)
    path, prompts, expected = case
    llm = LLM(
        path, tensor_parallel_size=2, num_kvcache_blocks=64, speculative_config=SPEC, async_scheduling=async_scheduling
    )
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert [o["token_ids"] for o in outs] == expected and llm.spec_stats.num_accepted_tokens > 0
    finally:
        llm.exit()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_constrained_requests_beside_drafts(bpe_model, async_scheduling):
    """Structured output does not speculate: a regex-constrained request beside a repetitive one that drafts
    still matches its regex, and the repetitive one's tokens are what plain decoding gives."""
    pytest.importorskip("xgrammar")
    from nanoserve.engine_pod.structured_params import StructuredOutputsParams

    regex = r"[a-z]{3}-[0-9]{2,4}"
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = "abc abc abc abc abc abc"
    params = [
        free,
        SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=regex)),
    ]
    llm = LLM(bpe_model, num_kvcache_blocks=128, max_model_len=512, async_scheduling=async_scheduling)
    try:
        (alone,) = llm.generate([prompt], free)
    finally:
        llm.exit()
    llm = LLM(
        bpe_model, num_kvcache_blocks=128, max_model_len=512, speculative_config=SPEC, async_scheduling=async_scheduling
    )
    try:
        outs = llm.generate([prompt, "pick one"], params)
        assert outs[0]["token_ids"] == alone["token_ids"] and llm.spec_stats.num_drafts > 0
        assert outs[1]["finish_reason"] == "stop" and __import__("re").fullmatch(regex, outs[1]["text"])
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    finally:
        llm.exit()


def _two_sample_chi2(a: list[int], b: list[int]) -> tuple[float, int]:
    """Equal-size samples of a token: sum over tokens seen 10+ times of (a - b)^2 / (a + b), and its df."""
    ca, cb = Counter(a), Counter(b)
    cells = [t for t in ca.keys() | cb.keys() if ca[t] + cb[t] >= 10]
    return sum((ca[t] - cb[t]) ** 2 / (ca[t] + cb[t]) for t in cells), len(cells) - 1


def test_sampling_with_drafts_keeps_the_distribution(tiny_models, monkeypatch):
    """Rejection sampling is lossless in the engine: over 400 seeded samples the tokens after the first (where
    drafts are verified, about half accepted) have the same distribution with and without speculation, by a
    two-sample chi-square; an engine that accepts every draft fails the same check by far."""
    import nanoserve.engine_pod.llm_engine as engine_module

    path = tiny_models["qwen3"]
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    n, kwargs = 400, dict(num_kvcache_blocks=256, max_num_batched_tokens=4096)

    def samples(speculative_config, offset):
        llm = LLM(path, speculative_config=speculative_config, **kwargs)
        try:
            span = random_prompts(240, [12], seed=5)[0]
            loop = llm.generate([span], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
            prompt = span + loop["token_ids"]  # the model's own greedy output: its tokens recur
            params = [
                SamplingParams(temperature=1.5, top_k=4, max_tokens=4, ignore_eos=True, seed=offset + i)
                for i in range(n)
            ]
            outs = [o["token_ids"] for o in llm.generate([prompt] * n, params)]
            return outs, llm.spec_stats
        finally:
            llm.exit()

    def statistic(a, b):
        stats = [_two_sample_chi2([x[j] for x in a], [x[j] for x in b]) for j in (1, 2, 3)]
        return sum(s for s, _ in stats), sum(df for _, df in stats)

    plain, _ = samples(None, 0)
    spec_out, stats = samples(spec, 10**6)
    assert stats.num_drafts > n / 2 and 0.2 < stats.acceptance_rate < 0.8  # the check has drafts to judge
    chi2, df = statistic(plain, spec_out)
    bound = df + 5 * (2 * df) ** 0.5  # about p < 1e-4 here (seeded: the same every run)
    assert chi2 < bound, (chi2, df)
    real = engine_module.spec_inputs

    def accept_everything(*args):
        out = real(*args)
        if out is not None:
            out.uniforms[:] = 0.0
        return out

    monkeypatch.setattr(engine_module, "spec_inputs", accept_everything)
    broken, _ = samples(spec, 2 * 10**6)
    assert statistic(plain, broken)[0] > 2 * bound


@pytest.mark.parametrize(
    "setup",
    [{"num_kvcache_blocks": 14, "kvcache_block_size": 8, "max_num_batched_tokens": 24}, {"async_scheduling": True}],
    ids=["preemption-chunked", "async"],
)
def test_verify_steps_in_the_graphs_padded_layout(case, setup, monkeypatch):
    """The verify graphs' layout (cuda_graphs.padded_rows: each sequence's tokens last in 1 + K rows, padding
    rows before them), run eagerly on the CPU where no graph can be captured: greedy tokens still equal
    transformers', beside prefill chunks and preemption, and with async scheduling."""
    from nanoserve.engine_pod.cuda_graphs import DecodeGraphs

    path, prompts, expected = case
    widths = []
    run = DecodeGraphs.run

    def counted(self, *args):
        widths.append(self.width)
        return run(self, *args)

    monkeypatch.setattr(DecodeGraphs, "run", counted)
    monkeypatch.setattr(LookPacing, "due", lambda self: True)  # (async: verify steps behind verify steps)
    llm = LLM(path, **{"num_kvcache_blocks": 256, **setup, "speculative_config": SPEC})
    try:
        runner = llm.model_runner
        runner.verify_graphs = runner.step_graphs(1 + SPEC["num_speculative_tokens"])
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        assert [o["token_ids"] for o in outs] == expected
        assert widths.count(4) > 0 and llm.spec_stats.num_accepted_tokens > 0
        if not setup.get("async_scheduling"):
            assert llm.scheduler.num_preemptions > 0
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    finally:
        llm.exit()
