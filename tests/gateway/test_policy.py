"""Routing policies: pure ranking of candidates."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoserve.gateway.config import RoutingConfig
from nanoserve.gateway.policy import CacheAwarePolicy, Candidate, LeastLoadedPolicy, RoundRobinPolicy, make_policy


def names(cands):
    return [c.name for c in cands]


def test_round_robin_cycles_over_every_engine():
    cands = [Candidate(f"e{i}", load=i) for i in range(3)]
    policy = RoundRobinPolicy()
    firsts = [policy.rank(cands).ranked[0] for _ in range(6)]
    assert Counter(firsts) == {n: 2 for n in names(cands)}
    assert sorted(policy.rank(cands).ranked) == names(cands)


def test_least_loaded_picks_min_load_and_rotates_ties():
    policy = LeastLoadedPolicy()
    cands = [Candidate("a", 3), Candidate("b", 1), Candidate("c", 2)]
    d = policy.rank(cands)
    assert d.ranked == ["b", "c", "a"] and d.reason == "least_loaded"
    idle = [Candidate(n, 0) for n in "abc"]
    assert {policy.rank(idle).ranked[0] for _ in range(3)} == {"a", "b", "c"}


def test_cache_aware_prefers_longest_match():
    d = CacheAwarePolicy().rank(
        [
            Candidate("a", 0, matched=2, total=10),
            Candidate("b", 1, matched=8, total=10),
            Candidate("c", 0, matched=5, total=10),
        ]
    )
    assert d.ranked[0] == "b" and d.reason == "cache_hit" and d.matched == 8
    assert d.ranked[1] == "c"  # retry order: next-best match


def test_cache_aware_equal_matches_go_to_lower_load():
    d = CacheAwarePolicy().rank([Candidate("a", 5, 6, 8), Candidate("b", 2, 6, 8)])
    assert d.ranked[0] == "b"


def test_match_below_threshold_falls_back_to_load():
    cfg = RoutingConfig(cache_threshold=0.5)
    total = 10
    weak = int(cfg.cache_threshold * total) - 1
    d = CacheAwarePolicy(cfg).rank([Candidate("a", 3, weak, total), Candidate("b", 1, 0, total)])
    assert d.ranked[0] == "b" and d.reason == "fallback"
    d = CacheAwarePolicy(cfg).rank([Candidate("a", 3, weak + 1, total), Candidate("b", 1, 0, total)])
    assert d.ranked[0] == "a" and d.reason == "cache_hit"


def test_overloaded_best_match_is_passed_over():
    cfg = RoutingConfig(cache_threshold=0.1, balance_abs_threshold=4, balance_rel_threshold=1.5)
    base = 10
    heavy = max(base + cfg.balance_abs_threshold + 1, int(base * cfg.balance_rel_threshold) + 1)
    # Best match overloaded -> second-best match, still a cache hit.
    d = CacheAwarePolicy(cfg).rank(
        [Candidate("a", heavy, 9, 10), Candidate("b", base + 1, 5, 10), Candidate("c", base, 0, 10)]
    )
    assert d.ranked == ["b", "a", "c"] and d.reason == "cache_hit"
    # Only match overloaded -> least loaded, reason "load".
    d = CacheAwarePolicy(cfg).rank([Candidate("a", heavy, 9, 10), Candidate("c", base, 0, 10)])
    assert d.ranked == ["c", "a"] and d.reason == "load" and d.matched == 0


@pytest.mark.parametrize("extra_abs, extra_rel", [(0, 10), (10, 0)])
def test_both_balance_thresholds_must_be_exceeded(extra_abs, extra_rel):
    """Overloaded means beyond the absolute AND the relative threshold (small fleets stay sticky)."""
    cfg = RoutingConfig(cache_threshold=0.1, balance_abs_threshold=4, balance_rel_threshold=2.0)
    base = 4
    # Load exceeding only one of the two thresholds: at most abs (or rel) over the minimum.
    load = base + cfg.balance_abs_threshold if extra_abs == 0 else int(base * cfg.balance_rel_threshold)
    assert load <= base + cfg.balance_abs_threshold or load <= base * cfg.balance_rel_threshold
    d = CacheAwarePolicy(cfg).rank([Candidate("a", load, 9, 10), Candidate("b", base, 0, 10)])
    assert d.ranked[0] == "a"


def test_cold_prompts_spread_to_emptier_caches():
    d = CacheAwarePolicy().rank([Candidate("a", 0, 0, 4, cached=100), Candidate("b", 0, 0, 4, cached=3)])
    assert d.ranked[0] == "b" and d.reason == "fallback"


def test_make_policy_names():
    assert isinstance(make_policy("round-robin"), RoundRobinPolicy)
    assert isinstance(make_policy("least-loaded"), LeastLoadedPolicy)
    assert make_policy("cache-aware", RoutingConfig(cache_threshold=0.7)).config.cache_threshold == 0.7
    with pytest.raises(ValueError):
        make_policy("random")


candidates = st.lists(
    st.tuples(st.integers(0, 50), st.integers(0, 12), st.integers(0, 500)), min_size=1, max_size=6
).map(lambda rows: [Candidate(f"e{i}", load, min(m, 12), 12, cached) for i, (load, m, cached) in enumerate(rows)])


@settings(max_examples=200, deadline=None)
@given(candidates, st.floats(0.0, 1.0), st.integers(0, 20), st.floats(1.0, 3.0))
def test_cache_aware_invariants(cands, threshold, abs_t, rel_t):
    cfg = RoutingConfig(threshold, abs_t, rel_t)
    d = CacheAwarePolicy(cfg).rank(cands)
    assert sorted(d.ranked) == sorted(names(cands))  # every engine once: the retry order is complete
    by_name = {c.name: c for c in cands}
    chosen = by_name[d.ranked[0]]
    min_load = min(c.load for c in cands)
    overloaded = lambda c: c.load > min_load + abs_t and c.load > min_load * rel_t  # noqa: E731
    assert not overloaded(chosen)
    hits = [c for c in cands if c.matched > 0 and c.matched >= threshold * c.total]
    eligible = [c for c in hits if not overloaded(c)]
    if eligible:
        assert d.reason == "cache_hit" and chosen.matched == max(c.matched for c in eligible)
    else:  # by load: "load" when every real match was overloaded, "fallback" when there was none
        assert chosen.load == min_load and d.reason == ("load" if hits else "fallback")
