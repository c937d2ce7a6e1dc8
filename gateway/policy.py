"""Routing policies: pure classes that rank candidate engines for one request.

The router turns each routable engine into a `Candidate` (its load and how many leading blocks of the
prompt it holds); a policy ranks them. The first engine of the ranking gets the request, the rest are
the order in which it is retried if that engine fails before answering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nanoserve.gateway.config import POLICIES, RoutingConfig


@dataclass(frozen=True)
class Candidate:
    name: str  # engine base URL
    load: int  # requests in flight (see Endpoint.load)
    matched: int = 0  # leading blocks of the prompt the engine holds
    total: int = 0  # full blocks in the prompt (at this engine's block size)
    cached: int = 0  # blocks the engine holds in all (less means more room for new prefixes)


@dataclass(frozen=True)
class Decision:
    ranked: list[str]  # chosen engine first, then the retry order
    reason: str  # cache_hit | load | fallback | round_robin | least_loaded
    matched: int  # matched blocks on the chosen engine


class RoundRobinPolicy:
    uses_cache = False

    def __init__(self) -> None:
        self._next = 0

    def rank(self, candidates: Sequence[Candidate]) -> Decision:
        n = len(candidates)
        start = self._next % n
        self._next += 1
        order = [candidates[(start + i) % n] for i in range(n)]
        return Decision([c.name for c in order], "round_robin", order[0].matched)


class LeastLoadedPolicy:
    uses_cache = False

    def __init__(self) -> None:
        self._turn = 0  # rotates ties so an idle fleet still spreads sequential requests

    def rank(self, candidates: Sequence[Candidate]) -> Decision:
        order = _by_load(candidates, self._turn)
        self._turn += 1
        return Decision([c.name for c in order], "least_loaded", order[0].matched)


class CacheAwarePolicy:
    """Best cache match unless that engine is overloaded relative to the least-loaded one.

    Matches below `cache_threshold` of the prompt do not count. Among real matches, the longest wins (ties:
    lower load); an overloaded one is passed over for the next, and when none is left the request goes to
    the least-loaded engine (reason "load"). Without any match it also goes by load, ties going to the engine
    holding the fewest blocks, so that new prefixes spread over the fleet (reason "fallback").
    """

    uses_cache = True

    def __init__(self, config: RoutingConfig | None = None) -> None:
        self.config = config or RoutingConfig()
        self._turn = 0

    def rank(self, candidates: Sequence[Candidate]) -> Decision:
        cfg = self.config
        by_load = _by_load(candidates, self._turn)
        self._turn += 1
        min_load = by_load[0].load
        hits = [c for c in candidates if c.matched > 0 and c.matched >= cfg.cache_threshold * c.total]
        hits.sort(key=lambda c: (-c.matched, c.load))
        chosen = next((c for c in hits if not self._overloaded(c.load, min_load)), None)
        if chosen is not None:
            reason = "cache_hit"
        else:
            chosen, reason = by_load[0], ("load" if hits else "fallback")
        ranked = [chosen.name]
        for c in hits + by_load:
            if c.name not in ranked:
                ranked.append(c.name)
        return Decision(ranked, reason, chosen.matched)

    def _overloaded(self, load: int, min_load: int) -> bool:
        cfg = self.config
        return load > min_load + cfg.balance_abs_threshold and load > min_load * cfg.balance_rel_threshold


Policy = RoundRobinPolicy | LeastLoadedPolicy | CacheAwarePolicy


def make_policy(name: str, config: RoutingConfig | None = None) -> Policy:
    if name == "cache-aware":
        return CacheAwarePolicy(config)
    if name == "round-robin":
        return RoundRobinPolicy()
    if name == "least-loaded":
        return LeastLoadedPolicy()
    raise ValueError(f"unknown policy {name!r} ({', '.join(POLICIES)})")


def _by_load(candidates: Sequence[Candidate], turn: int) -> list[Candidate]:
    """Least load first; ties go to the emptier cache, then rotate with `turn`."""
    n = len(candidates)
    keyed = [(c.load, c.cached, (i - turn) % n, c) for i, c in enumerate(candidates)]
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]
