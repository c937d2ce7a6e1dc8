"""Speculative decoding's parts on their own: the n-gram proposer (against a brute-force lookup), the
--speculative-config parsing, the verify step's acceptance rule against exact distributions, the pacing of
looks, and the scheduler's lookups behind a verify step in flight."""

import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoserve.engine_pod.block_manager import BlockManager
from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.errors import ConfigError
from nanoserve.engine_pod.sampler import SamplingInputs
from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.scheduler import Scheduler
from nanoserve.engine_pod.sequence import PLACEHOLDER, Sequence
from nanoserve.engine_pod.spec_config import SpeculativeConfig, parse_speculative_config
from nanoserve.engine_pod.spec_decode import LookPacing, SpecStats, TokenMirror, propose_ngram
from nanoserve.engine_pod.spec_verify import SpecInputs, verify


def brute_force(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """The definition: for n from hi down to lo, of the earlier ends of the last n tokens the most recent one
    followed by the most tokens (at most k)."""
    for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
        suffix = tokens[-n:]
        ends = [e for e in range(len(tokens) - 2, n - 2, -1) if tokens[e - n + 1 : e + 1] == suffix]
        if ends:
            best = max(ends, key=lambda e: (min(k, len(tokens) - 1 - e), e))
            return tokens[best + 1 : best + 1 + k]
    return []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 2, 3, 256, 65536, 1 << 24]), min_size=1, max_size=40),
    st.integers(1, 4),
    st.integers(0, 3),
    st.integers(1, 5),
)
def test_proposer_matches_brute_force(tokens, lo, extra, k):
    hi = lo + extra
    for dtype in (np.int64, np.int32):  # (a byte search: small ids' zero bytes match at offsets that are not ids)
        assert propose_ngram(np.asarray(tokens, dtype), lo, hi, k) == brute_force(tokens, lo, hi, k)


def test_proposer_cases():
    t = lambda *v: np.asarray(v, np.int64)
    assert propose_ngram(t(1, 2, 3, 9, 1, 2, 3), 1, 3, 4) == [9, 1, 2, 3]  # the longest match, its followers
    assert propose_ngram(t(1, 2, 3, 9, 1, 2, 3), 1, 3, 2) == [9, 1]  # at most k
    assert propose_ngram(t(5, 1, 7, 1), 1, 3, 3) == [7, 1]  # up to the end of the sequence
    assert propose_ngram(t(4, 4, 4), 1, 2, 3) == [4]  # overlapping its own suffix
    # A loop: the most recent occurrence would propose 1 token, an older one the loop's next 3.
    assert propose_ngram(t(9, 4, 4, 4, 4, 4), 1, 2, 3) == [4, 4, 4]
    assert propose_ngram(t(1, 2, 3, 1, 2, 3, 1, 2), 2, 2, 4) == [3, 1, 2, 3]
    assert propose_ngram(t(1, 2, 3, 1, 2, 3, 1, 2), 2, 2, 2) == [3, 1]  # (full at the most recent one)
    assert propose_ngram(t(1, 2, 8, 3, 2), 2, 3, 3) == []  # only a 1-gram matches: below prompt_lookup_min
    assert propose_ngram(t(7), 1, 3, 3) == [] and propose_ngram(t(1, 2, 1), 1, 3, 0) == []
    # Equally long matches: the most recent wins.
    assert propose_ngram(t(1, 5, 1, 6, 1), 1, 1, 1) == [6]
    # A byte match that straddles ids (256 is 00 01 00 00 in int32) is no match: the search skips it.
    assert propose_ngram(np.asarray([256, 0, 7, 1], np.int32), 1, 1, 2) == []
    assert propose_ngram(np.asarray([1, 9, 256, 0, 7, 1], np.int32), 1, 1, 2) == [9, 256]


def test_token_mirror_follows_appends():
    mirror, tokens = TokenMirror(), []
    for i in range(200):
        tokens.append(i % 7)
        assert mirror.view(tokens).tolist() == tokens
    assert mirror.view(tokens[:10]).tolist() == tokens[:10]  # dropped tokens: rebuilt


def test_speculative_config_parsing():
    full = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}'
    assert parse_speculative_config(full) == SpeculativeConfig("ngram", 4, 3, 2)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2}) == SpeculativeConfig(
        "ngram", 2, 5, 5
    )  # vLLM's defaults
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4}) == (
        SpeculativeConfig("ngram", 2, 4, 4)
    )
    assert parse_speculative_config(None) is None and parse_speculative_config("") is None
    capped = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 8})
    assert capped == SpeculativeConfig("ngram", 2, 5, 5, 8) and capped.drafts_at(8) and not capped.drafts_at(9)
    unset = parse_speculative_config(full)
    assert unset is not None and unset.disable_by_batch_size is None and unset.drafts_at(10**6)  # always drafts
    bad = {
        '{"method": "eagle", "num_speculative_tokens": 2}': "speculative_config.method",
        '{"method": "ngram"}': "speculative_config.num_speculative_tokens is required",
        '{"method": "ngram", "num_speculative_tokens": 0}': "speculative_config.num_speculative_tokens",
        '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}': (
            "prompt_lookup_min (4) must be <= prompt_lookup_max (2)"
        ),
        '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}': "prompt_lookup_min",
        '{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}': "unknown field(s) model",
        "{not json": "not valid JSON",
        **{
            f'{{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": {v}}}': (
                f"speculative_config.disable_by_batch_size must be an integer >= 1, got {r}"
            )
            for v, r in (("0", "0"), ("-3", "-3"), ('"4"', "'4'"), ("true", "True"), ("2.5", "2.5"))
        },
        "[1]": "must be a JSON object",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_speculative_config(text)


def _run_verify(row_logits: list[list[float]], drafts: list[int], copies: int, temperature: float, top_k: int = -1):
    """`copies` sequences, each with the same draft and the same logits rows (1 + len(drafts) of them), each with
    its own seeds and uniforms: their emitted tokens, [copies, len(drafts) + 2]."""
    k, rng = len(drafts), random.Random(0)
    sampling = SamplingInputs(
        temperatures=np.full(copies, temperature),
        top_k=np.full(copies, top_k),
        top_p=np.ones(copies),
        seeds=np.array([rng.getrandbits(63) for _ in range(copies)], np.int64),
        all_greedy=temperature == 0,
        needs_top=top_k > 0,
    )
    spec = SpecInputs(
        num_drafts=np.full(copies, k),
        drafts=np.tile(np.asarray(drafts, np.int64), (copies, 1)),
        row_seeds=np.array([rng.getrandbits(63) for _ in range(copies * (k + 1))], np.int64),
        uniforms=np.array([rng.random() for _ in range(copies * (k + 1))]),
    )
    dev = {name: torch.from_numpy(np.asarray(v)) for name, v in (sampling.arrays() | spec.arrays()).items()}
    logits = torch.tensor(row_logits, dtype=torch.float32).repeat(copies, 1)
    return verify(logits, sampling, spec, dev)


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    seen = expected > 0
    assert counts[~seen].sum() == 0, "a token outside the target's support was emitted"
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


CHI2_BOUND = 30.0  # df <= 5: p < 1e-4 under the right distribution (the draws are seeded: no flakes)


def test_rejection_sampling_is_lossless():
    """First emitted token ~ p0, and the second (given the first draft was accepted) ~ p1, whatever the draft;
    with top-k the residual stays inside the top-k set. A rule that forgets to remove the rejected draft from
    the residual (or accepts by the wrong probability) is far outside the bound."""
    rows = [[1.0, 0.2, -0.5, 0.8, 0.0, -1.0], [0.1, 1.5, 0.3, -0.2, 0.9, 0.0], [0.0] * 6]
    temperature, n = 0.8, 6000
    p = [torch.softmax(torch.tensor(r) / temperature, 0).numpy().astype(np.float64) for r in rows]
    out = _run_verify(rows, [3, 1], n, temperature).numpy()
    assert (out[:, 0] >= 1).all() and (out[:, 0] <= 3).all()
    first = np.bincount(out[:, 1], minlength=6)
    assert _chi2(first, p[0]) < CHI2_BOUND
    second = np.bincount(out[out[:, 1] == 3, 2], minlength=6)  # draft 3 accepted: the next comes from row 1
    assert _chi2(second, p[1]) < CHI2_BOUND
    # What a residual that keeps the rejected token would give: p(d) + (1 - p(d)) p(d) for the draft.
    broken = p[0] * (1 - p[0][3])
    broken[3] += p[0][3]
    assert _chi2(first, broken) > 10 * CHI2_BOUND
    # Accepted drafts are emitted as drafted, and nothing follows the token after the last accepted one.
    for row in out[:200]:
        count = row[0]
        assert list(row[1:count]) == [3, 1][: count - 1] and (row[count + 1 :] == -1).all()

    topk = _run_verify(rows[:2], [4], n, temperature, top_k=2).numpy()
    p_top = p[0].copy()
    p_top[np.argsort(-p_top)[2:]] = 0  # the draft (token 4) lies outside the top 2: always rejected
    assert (topk[:, 0] == 1).all()
    assert _chi2(np.bincount(topk[:, 1], minlength=6), p_top / p_top.sum()) < CHI2_BOUND


def test_greedy_verify_accepts_the_argmax_prefix():
    rows = [[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]]
    assert _run_verify(rows, [1, 2, 3], 1, 0.0).tolist() == [[3, 1, 2, 0, -1]]  # 1, 2 accepted; 3 is not row 2's
    assert _run_verify(rows, [1, 2, 0], 1, 0.0).tolist() == [[4, 1, 2, 0, 3]]  # all accepted, then the bonus
    assert _run_verify(rows, [2, 2, 0], 1, 0.0).tolist() == [[1, 1, -1, -1, -1]]  # the first rejected


def test_spec_stats():
    stats = SpecStats()
    stats.add(3, 2)
    stats.add(2, 0)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 5, 2)
    assert stats.accepted_per_pos == [1, 1, 0] and stats.acceptance_rate == 0.4
    assert stats.mean_acceptance_length == 2.0


def test_look_pacing_backs_off_while_nothing_matches_and_resets_on_a_draft():
    pace = LookPacing(most=4)
    assert pace.due()  # at once
    pace.observe(probed=True, drafted=False)  # looked, found nothing: 2 overlapped steps first
    assert [pace.due() for _ in range(3)] == [False, False, True]
    pace.observe(probed=True, drafted=False)
    assert [pace.due() for _ in range(5)] == [False] * 4 + [True]
    pace.observe(probed=True, drafted=False)  # capped at `most`
    assert [pace.due() for _ in range(5)] == [False] * 4 + [True]
    pace.observe(probed=False, drafted=False)  # an overlapped step: nothing learnt
    assert pace.due()
    pace.observe(probed=True, drafted=True)
    assert pace.due() and pace.interval == 1


def test_look_pacing_holds_drafts_to_the_overlapped_steps_rate():
    pace = LookPacing(most=4, smoothing=0.5)
    pace.observe(probed=False, drafted=False, tokens=16, seconds=0.010)  # overlapped: 1,600 tokens a second
    pace.observe(probed=False, drafted=False, tokens=16, seconds=0.010)
    assert pace.decode_rate == pytest.approx(1600)
    pace.observe(probed=True, drafted=True, tokens=30, seconds=0.020)  # accepted, but 1,500 a second: no gain
    assert [pace.due() for _ in range(3)] == [False, False, True]
    pace.observe(probed=True, drafted=True, tokens=40, seconds=0.020)  # 2,000 a second: look again at once
    assert pace.due() and pace.interval == 1
    pace.observe(probed=False, drafted=False, tokens=16, seconds=0.005)  # the overlapped steps got faster (3,200)
    assert pace.decode_rate == pytest.approx(2400)
    pace.observe(probed=True, drafted=True, tokens=40, seconds=0.020)  # 2,000 no longer pays
    assert not pace.due() and pace.interval == 2
    pace.observe(probed=False, drafted=False)  # a step that gave no tokens (the one after a drain) moves nothing
    assert pace.decode_rate == pytest.approx(2400)


def test_lookups_behind_a_verify_step_in_flight(tiny_models):
    """Async scheduling: a draft proposed while the step before is in flight assumes that step accepts its
    whole draft (the placeholders say so too); when the step's tokens show otherwise, the rejected
    placeholders and their KV go and the next lookup assumes the step behind it emits one token."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    config = Config(tiny_models["qwen3"], device="cpu", speculative_config=json.dumps(spec))
    scheduler = Scheduler(config, BlockManager(64, 4, True))
    seq = Sequence([1, 2, 3, 4, 5, 6, 1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    scheduler.add(seq)

    def launch() -> list[int]:
        batch = scheduler.schedule()
        draft = list(seq.draft_ids)
        scheduler.advance(batch, [seq])
        return draft

    assert launch() == []  # A: the prompt
    assert launch() == [5, 6, 1]  # B, behind A in flight: [4] is A's token guessed, not drafted
    scheduler.resolve(seq, 9, 4)  # A's token, as guessed
    scheduler.settle(seq, 9, [4], 1)
    assert launch() == [3, 4, 5]  # C, behind B: as if B accepted [5, 6, 1] and then emitted 2
    scheduler.resolve(seq, 10, 5)  # B: 5 accepted, 6 rejected; the model's token is 1
    scheduler.resolve(seq, 11, 1)
    scheduler.settle(seq, 10, [5, 1], 4)
    assert seq.token_ids == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 1] + [PLACEHOLDER] * 4  # C's placeholders moved up
    assert seq.num_pending == 4 and seq.num_computed_tokens == 15  # C computes positions 11-14
    assert len(seq.block_table) == 4  # (16 tokens)
    # D, behind C: C's draft assumed B emitted [5, 6, 1, 2], so it is taken as rejected, and the lookup runs on
    # the ids known ([1] -> [2, 3, 4, 5]); trusting C's draft it would have proposed [1, 2, 3] after [3, 4, 5].
    assert launch() == [3, 4, 5]
